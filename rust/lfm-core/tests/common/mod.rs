//! Shared helpers for the integration tests: fixture paths and the test-image formula.

#![allow(dead_code)]

use std::path::PathBuf;

/// `tests/fixtures` at the repository root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn golden(name: &str) -> serde_json::Value {
    let path = fixtures().join("golden").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The "grad" test image (tests/fixtures/README.md): HxWx3 RGB bytes.
pub fn grad(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h as u64 {
        for x in 0..w as u64 {
            out.push(((x * 255) / (w as u64 - 1).max(1)) as u8);
            out.push(((y * 255) / (h as u64 - 1).max(1)) as u8);
            out.push((((x * 7 + y * 13) ^ (x * y)) & 255) as u8);
        }
    }
    out
}

/// Loads ONNX Runtime from `ORT_DYLIB_PATH`; `None` (test skipped) when it is unset.
pub fn ort_available() -> bool {
    if std::env::var_os("ORT_DYLIB_PATH").is_none() {
        #[allow(clippy::print_stderr)] // a skipped test says why
        {
            eprintln!("ORT_DYLIB_PATH unset: skipping a test that needs ONNX Runtime");
        }
        return false;
    }
    lfm_core::runtime::init(None).unwrap();
    true
}

/// Standard base64 (with padding) to bytes.
pub fn b64decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 byte {c}"),
    } as u32;
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        for i in 0..n {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}
