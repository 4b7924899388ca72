#![no_main]
//! Image bytes through header probe, decode, tile plan, pixels and placeholders.

libfuzzer_sys::fuzz_target!(|data: &[u8]| lfm_core::fuzzing::decode_preprocess(data));
