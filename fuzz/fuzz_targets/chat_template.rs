#![no_main]
//! Arbitrary JSON messages and tools through the chat template and the admission checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| lfm_core::fuzzing::chat_template(data));
