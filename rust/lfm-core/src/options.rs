//! Options and limits, with the one place their ranges are defined.
//!
//! Every type deserialises from a plain JSON object (unknown keys are refused with the
//! list of allowed ones) and validates itself; the Python option classes round-trip
//! through these.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The tokenizer defines row/column markers up to 10x10.
pub const MAX_TILES_CAP: usize = 10;
/// Upper bound on the tokens of one resized (single-tile or thumbnail) image.
pub const MAX_IMAGE_TOKENS_CAP: usize = 1024;
/// Upper bound on `max_new_tokens`.
pub const MAX_NEW_TOKENS_CAP: usize = 32_768;
/// Upper bound on `repetition_penalty`.
pub const MAX_REPETITION_PENALTY: f32 = 100.0;
/// Most ONNX Runtime threads per session (`intra_threads`, `inter_threads`).
pub const MAX_THREADS: u16 = 256;
/// Upper bound on `temperature`.
pub const MAX_TEMPERATURE: f32 = 100.0;
/// Temperatures in (0, this) overflow the scaled logits; 0 means greedy.
pub const MIN_POSITIVE_TEMPERATURE: f32 = 1e-3;
/// At most this many stop strings, each at most [`MAX_STOP_BYTES`] long.
pub const MAX_STOP_STRINGS: usize = 64;
pub const MAX_STOP_BYTES: usize = 1024;
/// Upper bound on `timeout_s` (a year): longer spans overflow some platforms' clocks.
pub const MAX_TIMEOUT_S: f64 = 365.0 * 24.0 * 3600.0;

/// How many image tokens an image may become, and how it is tiled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageBudget {
    pub min_image_tokens: usize,
    pub max_image_tokens: usize,
    pub min_tiles: usize,
    pub max_tiles: usize,
    pub use_thumbnail: bool,
    pub max_pixels_tolerance: f64,
}

impl Default for ImageBudget {
    fn default() -> Self {
        Self::quality()
    }
}

impl ImageBudget {
    /// The model's own preprocessing defaults.
    pub const fn quality() -> Self {
        ImageBudget {
            min_image_tokens: 64,
            max_image_tokens: 256,
            min_tiles: 2,
            max_tiles: 10,
            use_thumbnail: true,
            max_pixels_tolerance: 2.0,
        }
    }

    /// Fewer tokens per image: at most 4 tiles, no thumbnail, 64-token single tiles.
    pub const fn fast() -> Self {
        ImageBudget {
            min_image_tokens: 32,
            max_image_tokens: 64,
            min_tiles: 2,
            max_tiles: 4,
            use_thumbnail: false,
            max_pixels_tolerance: 2.0,
        }
    }

    /// Never tiles: every image becomes one smart-resized tile of about `max_image_tokens`
    /// (small images upscaled to the minimum may get a few more, as in transformers).
    pub fn single_tile(max_image_tokens: usize) -> Self {
        ImageBudget {
            min_image_tokens: max_image_tokens.clamp(1, 64),
            max_image_tokens,
            min_tiles: 1,
            max_tiles: 1,
            use_thumbnail: false,
            max_pixels_tolerance: 2.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let f = |n: &str| format!("image_budget.{n}");
        if self.min_image_tokens == 0 {
            return Err(Error::option(f("min_image_tokens"), 0, "at least 1"));
        }
        if self.max_image_tokens < self.min_image_tokens {
            return Err(Error::option(
                f("max_image_tokens"),
                self.max_image_tokens,
                format!("at least min_image_tokens={}", self.min_image_tokens),
            ));
        }
        if self.max_image_tokens > MAX_IMAGE_TOKENS_CAP {
            return Err(Error::option(
                f("max_image_tokens"),
                self.max_image_tokens,
                format!("at most {MAX_IMAGE_TOKENS_CAP}"),
            ));
        }
        if self.min_tiles == 0 {
            return Err(Error::option(f("min_tiles"), 0, "at least 1"));
        }
        if self.max_tiles < self.min_tiles {
            return Err(Error::option(
                f("max_tiles"),
                self.max_tiles,
                format!("at least min_tiles={}", self.min_tiles),
            ));
        }
        if self.max_tiles > MAX_TILES_CAP {
            return Err(Error::option(
                f("max_tiles"),
                self.max_tiles,
                format!("at most {MAX_TILES_CAP} (the tokenizer has row/column markers up to 10)"),
            ));
        }
        if !(self.max_pixels_tolerance.is_finite() && self.max_pixels_tolerance > 0.0) {
            return Err(Error::option(f("max_pixels_tolerance"), self.max_pixels_tolerance, "a finite number above 0"));
        }
        Ok(())
    }
}

/// Limits checked before any image is decoded or any template rendered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_messages: usize,
    pub max_content_parts: usize,
    pub max_text_bytes: usize,
    pub max_image_side: u32,
    pub max_decoded_image_bytes: u64,
    pub context_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_messages: 1024,
            max_content_parts: 8192,
            max_text_bytes: 2_048_000,
            max_image_side: 16_384,
            max_decoded_image_bytes: 256 * 1024 * 1024,
            context_tokens: 128_000,
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<()> {
        let positive: [(&str, u64); 6] = [
            ("max_messages", self.max_messages as u64),
            ("max_content_parts", self.max_content_parts as u64),
            ("max_text_bytes", self.max_text_bytes as u64),
            ("max_image_side", self.max_image_side as u64),
            ("max_decoded_image_bytes", self.max_decoded_image_bytes),
            ("context_tokens", self.context_tokens as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::option(format!("limits.{name}"), 0, "at least 1"));
            }
        }
        Ok(())
    }
}

/// Per-request decoding options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestOptions {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub timeout_s: Option<f64>,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions {
            max_new_tokens: 512,
            min_new_tokens: 0,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.05,
            seed: None,
            stop: Vec::new(),
            timeout_s: None,
        }
    }
}

impl RequestOptions {
    /// The model card's sampling preset.
    pub fn model_card() -> Self {
        RequestOptions { temperature: 0.1, min_p: 0.15, repetition_penalty: 1.05, ..Self::default() }
    }

    /// Greedy decoding, the sampling options are unused.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 || self.max_new_tokens > MAX_NEW_TOKENS_CAP {
            return Err(Error::option("max_new_tokens", self.max_new_tokens, format!("1 to {MAX_NEW_TOKENS_CAP}")));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(Error::option(
                "min_new_tokens",
                self.min_new_tokens,
                format!("0 to max_new_tokens={}", self.max_new_tokens),
            ));
        }
        let t = self.temperature;
        if !t.is_finite() || !(0.0..=MAX_TEMPERATURE).contains(&t) || (t > 0.0 && t < MIN_POSITIVE_TEMPERATURE) {
            return Err(Error::option(
                "temperature",
                t,
                format!("0 (greedy) or {MIN_POSITIVE_TEMPERATURE} to {MAX_TEMPERATURE}"),
            ));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::option("top_p", self.top_p, "above 0 and at most 1"));
        }
        if !(self.min_p.is_finite() && (0.0..=1.0).contains(&self.min_p)) {
            return Err(Error::option("min_p", self.min_p, "0 to 1"));
        }
        // Bounded both ways: a penalty of 1e-39 multiplies a logit by 1e39, past f32.
        let r = self.repetition_penalty;
        let min = 1.0 / MAX_REPETITION_PENALTY;
        if !(r.is_finite() && (min..=MAX_REPETITION_PENALTY).contains(&r)) {
            return Err(Error::option(
                "repetition_penalty",
                r,
                format!("{min} to {MAX_REPETITION_PENALTY} (1.0 = off)"),
            ));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(Error::option(
                "stop",
                format!("{} strings", self.stop.len()),
                format!("at most {MAX_STOP_STRINGS}"),
            ));
        }
        for s in &self.stop {
            if s.is_empty() || s.len() > MAX_STOP_BYTES {
                return Err(Error::option(
                    "stop",
                    format!("{s:?}"),
                    format!("non-empty strings of at most {MAX_STOP_BYTES} bytes"),
                ));
            }
        }
        if let Some(t) = self.timeout_s
            && !(t > 0.0 && t <= MAX_TIMEOUT_S)
        {
            return Err(Error::option(
                "timeout_s",
                t,
                format!("seconds above 0 and at most {MAX_TIMEOUT_S} (a year), or None"),
            ));
        }
        Ok(())
    }
}

/// The precision of one graph file, as the official repository names its variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
    Q4,
    Q8,
}

impl Precision {
    /// File-name suffix: `decoder_model_merged{suffix}.onnx`.
    pub fn file_suffix(self) -> &'static str {
        match self {
            Precision::Fp32 => "",
            Precision::Fp16 => "_fp16",
            Precision::Q4 => "_q4",
            Precision::Q8 => "_q8",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Q4 => "q4",
            Precision::Q8 => "q8",
        }
    }
}

/// The three graphs of the official export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GraphKind {
    VisionEncoder,
    EmbedTokens,
    Decoder,
}

impl GraphKind {
    pub const ALL: [GraphKind; 3] = [GraphKind::VisionEncoder, GraphKind::EmbedTokens, GraphKind::Decoder];

    /// Base file name (fp32 variant) without `.onnx`.
    pub fn stem(self) -> &'static str {
        match self {
            GraphKind::VisionEncoder => "vision_encoder",
            GraphKind::EmbedTokens => "embed_tokens",
            GraphKind::Decoder => "decoder_model_merged",
        }
    }
}

/// Which precision to load for each graph: a preset name or one entry per graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a preset (fp32, fp16, q4, q8) or a map from graph name to precision")]
pub enum Variant {
    Preset(Precision),
    PerGraph(BTreeMap<String, Precision>),
}

impl Default for Variant {
    fn default() -> Self {
        Variant::Preset(Precision::Fp32)
    }
}

impl Variant {
    /// The precision of one graph. `embed_tokens` has no q4/q8 files upstream, so quantised
    /// presets use fp32 for it.
    pub fn precision(&self, graph: GraphKind) -> Precision {
        match self {
            Variant::Preset(p) => match (graph, p) {
                (GraphKind::EmbedTokens, Precision::Q4 | Precision::Q8) => Precision::Fp32,
                _ => *p,
            },
            Variant::PerGraph(m) => m.get(graph.stem()).copied().unwrap_or(Precision::Fp32),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if let Variant::PerGraph(m) = self {
            for (k, p) in m {
                if !GraphKind::ALL.iter().any(|g| g.stem() == k) {
                    return Err(Error::option("variant", k, "keys vision_encoder, embed_tokens, decoder_model_merged"));
                }
                if k == "embed_tokens" && matches!(p, Precision::Q4 | Precision::Q8) {
                    return Err(Error::option("variant.embed_tokens", p.as_str(), "fp32 or fp16"));
                }
            }
        }
        Ok(())
    }
}

/// Whether decoder steps of concurrent requests run batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Batching {
    /// Batch when the decoder's attention takes row lengths from the mask (checked on
    /// first use); otherwise one sequence at a time.
    #[default]
    Auto,
    /// Always try batching (still checked on first use, with a fallback).
    On,
    /// One sequence at a time.
    Off,
}

/// Execution providers the engine may register, in the user's order.
pub const KNOWN_PROVIDERS: [&str; 6] = ["cpu", "cuda", "tensorrt", "rocm", "directml", "coreml"];

/// Options fixed when an engine is loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineOptions {
    pub variant: Variant,
    pub providers: Vec<String>,
    pub intra_threads: Option<u16>,
    pub inter_threads: Option<u16>,
    pub image_budget: ImageBudget,
    pub limits: Limits,
    pub max_batch_size: usize,
    pub batching: Batching,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            variant: Variant::default(),
            providers: vec!["cpu".to_string()],
            intra_threads: None,
            inter_threads: None,
            image_budget: ImageBudget::default(),
            limits: Limits::default(),
            max_batch_size: 8,
            batching: Batching::Auto,
        }
    }
}

impl EngineOptions {
    pub fn validate(&self) -> Result<()> {
        self.variant.validate()?;
        if self.providers.is_empty() {
            return Err(Error::option("providers", "()", format!("one or more of {}", KNOWN_PROVIDERS.join(", "))));
        }
        for p in &self.providers {
            if !KNOWN_PROVIDERS.contains(&p.as_str()) {
                return Err(Error::option("providers", p, format!("one of {}", KNOWN_PROVIDERS.join(", "))));
            }
        }
        // ONNX Runtime starts that many threads for each of the three sessions: 65,535 is
        // ~196,000 threads, past the system's limit (a crash inside session creation).
        for (name, v) in [("intra_threads", self.intra_threads), ("inter_threads", self.inter_threads)] {
            if let Some(n) = v
                && !(1..=MAX_THREADS).contains(&n)
            {
                return Err(Error::option(name, n, format!("1 to {MAX_THREADS}, or None for ONNX Runtime's choice")));
            }
        }
        if self.max_batch_size == 0 || self.max_batch_size > 256 {
            return Err(Error::option("max_batch_size", self.max_batch_size, "1 to 256"));
        }
        self.image_budget.validate()?;
        self.limits.validate()
    }
}

/// Options sections that are also fields of [`EngineOptions`]: their fields are named
/// `section.field` whether the section is parsed alone or inside an engine's options (as
/// [`ImageBudget::validate`] and [`Limits::validate`] name them). Fields of the top-level
/// sections (`"request"`, `"engine"`) have bare names.
const NESTED_SECTIONS: [&str; 2] = ["image_budget", "limits"];

/// Parses an options object of type `T` from JSON text. A key or value serde refuses (an
/// unknown key, a negative or fractional count, a string for a number, ...) is reported
/// with the field's path (`seed`, `limits.context_tokens`, `image_budget.max_tiles`) and its
/// value; JSON that is not an object names the section (`"request"`, `"engine"`, ...).
pub fn from_json<T: serde::de::DeserializeOwned>(section: &str, json: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(json);
    let parsed: std::result::Result<T, _> = serde_path_to_error::deserialize(&mut de);
    let err = match parsed {
        Ok(v) => {
            return de.end().map(|()| v).map_err(|e| Error::option(section, json_excerpt(json), serde_message(&e)));
        }
        Err(err) => err,
    };
    let msg = serde_message(err.inner());
    let mut keys: Vec<&str> = Vec::new();
    for segment in err.path() {
        match segment {
            serde_path_to_error::Segment::Map { key } => keys.push(key),
            // `stop[3]` is reported as `stop`, as `validate` names it.
            serde_path_to_error::Segment::Seq { .. } | serde_path_to_error::Segment::Enum { .. } => {}
            serde_path_to_error::Segment::Unknown => break,
        }
    }
    let prefix: Vec<&str> = if NESTED_SECTIONS.contains(&section) { vec![section] } else { Vec::new() };
    // serde's message names the bad key and, for unknown keys, the allowed ones.
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some((key, allowed)) = rest.split_once("`, expected ")
    {
        if keys.last() != Some(&key) {
            keys.push(key);
        }
        let field = [prefix, keys].concat().join(".");
        let allowed = allowed.replace('`', "");
        return Err(Error::option(field, key, format!("a known key ({allowed})")));
    }
    if keys.is_empty() {
        return Err(Error::option(section, json_excerpt(json), msg));
    }
    let value = serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|root| {
            err.path().iter().try_fold(root, |v, segment| match (segment, v) {
                (serde_path_to_error::Segment::Map { key }, serde_json::Value::Object(mut m)) => m.remove(key),
                (serde_path_to_error::Segment::Seq { index }, serde_json::Value::Array(mut a)) if *index < a.len() => {
                    Some(a.swap_remove(*index))
                }
                _ => None,
            })
        })
        .map_or_else(|| json_excerpt(json), |v| json_excerpt(&v.to_string()));
    Err(Error::option([prefix, keys].concat().join("."), value, expected_of(&msg)))
}

/// serde_json's message without its `at line L column C` suffix.
fn serde_message(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    msg.split(" at line ").next().unwrap_or(&msg).to_string()
}

/// What a serde type error expected, in words: `invalid value: integer `-1`, expected u64`
/// becomes `a non-negative integer`.
fn expected_of(msg: &str) -> String {
    let Some((_, expected)) = msg.rsplit_once(", expected ") else {
        return msg.to_string();
    };
    match expected {
        "usize" | "u64" => "a non-negative integer".to_string(),
        "u32" => format!("an integer from 0 to {}", u32::MAX),
        "u16" => format!("an integer from 0 to {}", u16::MAX),
        "u8" => format!("an integer from 0 to {}", u8::MAX),
        "f32" | "f64" => "a number".to_string(),
        "a boolean" => "true or false".to_string(),
        "a sequence" => "a list".to_string(),
        other => other.replace('`', ""),
    }
}

fn json_excerpt(json: &str) -> String {
    if json.len() <= 200 { json.to_string() } else { format!("{}…", &json[..json.floor_char_boundary(200)]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        ImageBudget::quality().validate().unwrap();
        ImageBudget::fast().validate().unwrap();
        ImageBudget::single_tile(64).validate().unwrap();
        RequestOptions::default().validate().unwrap();
        RequestOptions::model_card().validate().unwrap();
        EngineOptions::default().validate().unwrap();
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let cases: Vec<(RequestOptions, &str)> = vec![
            (RequestOptions { max_new_tokens: 0, ..Default::default() }, "max_new_tokens"),
            (RequestOptions { temperature: f32::NAN, ..Default::default() }, "temperature"),
            (RequestOptions { temperature: 1e-4, ..Default::default() }, "temperature"),
            (RequestOptions { top_p: 0.0, ..Default::default() }, "top_p"),
            (RequestOptions { min_p: 1.5, ..Default::default() }, "min_p"),
            (RequestOptions { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
            (RequestOptions { min_new_tokens: 600, ..Default::default() }, "min_new_tokens"),
            (RequestOptions { stop: vec![String::new()], ..Default::default() }, "stop"),
        ];
        for (opts, field) in cases {
            match opts.validate() {
                Err(Error::InvalidOption { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_keys_list_the_allowed_ones() {
        let err = from_json::<RequestOptions>("request", r#"{"temperatur": 1}"#).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("temperatur") && msg.contains("max_new_tokens"), "{msg}");
    }

    #[test]
    fn type_and_sign_errors_name_the_field_and_its_value() {
        fn field_value<T: serde::de::DeserializeOwned + std::fmt::Debug>(
            section: &str,
            json: &str,
        ) -> (String, String) {
            match from_json::<T>(section, json) {
                Err(Error::InvalidOption { field, value, .. }) => (field, value),
                other => panic!("{json}: {other:?}"),
            }
        }
        let request = |json| field_value::<RequestOptions>("request", json);
        assert_eq!(request(r#"{"seed": -1}"#), ("seed".into(), "-1".into()));
        assert_eq!(request(r#"{"max_new_tokens": -1}"#), ("max_new_tokens".into(), "-1".into()));
        assert_eq!(request(r#"{"top_k": 2.5}"#), ("top_k".into(), "2.5".into()));
        assert_eq!(request(r#"{"temperature": "0.5"}"#), ("temperature".into(), r#""0.5""#.into()));
        assert_eq!(request(r#"{"stop": ["a", 1]}"#), ("stop".into(), "1".into()));
        assert_eq!(request(r#"{"temperatur": 1}"#), ("temperatur".into(), "temperatur".into()));
        let engine = |json| field_value::<EngineOptions>("engine", json);
        assert_eq!(engine(r#"{"intra_threads": 70000}"#), ("intra_threads".into(), "70000".into()));
        assert_eq!(engine(r#"{"limits": {"bogus": 1}}"#), ("limits.bogus".into(), "bogus".into()));
        assert_eq!(engine(r#"{"limits": {"context_tokens": -5}}"#), ("limits.context_tokens".into(), "-5".into()));
        assert_eq!(engine(r#"{"image_budget": {"max_tiles": 2.5}}"#), ("image_budget.max_tiles".into(), "2.5".into()));
        assert_eq!(engine(r#"{"variant": "q3"}"#), ("variant".into(), r#""q3""#.into()));
        assert_eq!(engine(r#"{"batching": "maybe"}"#), ("batching".into(), r#""maybe""#.into()));
        // Alone, a nested section names its fields the same way.
        assert_eq!(field_value::<Limits>("limits", r#"{"bogus": 1}"#), ("limits.bogus".into(), "bogus".into()));
        let budget = field_value::<ImageBudget>("image_budget", r#"{"use_thumbnail": 1}"#);
        assert_eq!(budget, ("image_budget.use_thumbnail".into(), "1".into()));
        // Not an object, or not JSON: the section is the field.
        assert_eq!(request("true").0, "request");
        assert_eq!(request(r#"{"seed": 1} x"#).0, "request");
        let msg = from_json::<RequestOptions>("request", r#"{"seed": -1}"#).unwrap_err().to_string();
        assert!(msg.contains("`seed`") && msg.contains("-1") && msg.contains("non-negative integer"), "{msg}");
    }

    #[test]
    fn variant_presets_and_per_graph() {
        let v: Variant = serde_json::from_str(r#""q4""#).unwrap();
        assert_eq!(v.precision(GraphKind::Decoder), Precision::Q4);
        assert_eq!(v.precision(GraphKind::EmbedTokens), Precision::Fp32);
        let v: Variant = serde_json::from_str(r#"{"decoder_model_merged": "q8", "vision_encoder": "fp16"}"#).unwrap();
        assert_eq!(v.precision(GraphKind::VisionEncoder), Precision::Fp16);
        assert_eq!(v.precision(GraphKind::EmbedTokens), Precision::Fp32);
        let bad: Variant = serde_json::from_str(r#"{"decoder": "q8"}"#).unwrap();
        assert!(bad.validate().is_err());
    }
}
