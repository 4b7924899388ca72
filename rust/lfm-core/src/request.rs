//! What a request carries in and what a generation gives back.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::preproc::RgbImage;

/// One image of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    /// A file: EXIF orientation applied.
    Path(PathBuf),
    /// An encoded file in memory: EXIF orientation applied.
    Bytes(Vec<u8>),
    /// The caller's pixels, taken as they are.
    Pixels(RgbImage),
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The grammar completed.
    Grammar,
    /// Cancelled or timed out.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Grammar => "grammar",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens, image tokens included.
    pub prompt_tokens: usize,
    /// `<image>` tokens in the prompt.
    pub image_tokens: usize,
    pub completion_tokens: usize,
}

/// Wall-clock seconds per stage.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Admission, image decode and preprocessing, template, tokenization.
    pub preprocess_s: f64,
    pub vision_s: f64,
    /// Token embedding and the prompt's decoder pass.
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// Who closed a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closer {
    /// The model chose to end the string: the grammar allowed more.
    Model,
    /// The grammar forced the closing quote.
    Grammar,
}

/// One top-level string member of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldEnd {
    pub key: String,
    /// The decoded string value.
    pub text: String,
    pub closed_by: Closer,
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    /// New tokens, EOS excluded.
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// With a JSON Schema grammar: how each top-level string member ended.
    pub field_ends: Vec<FieldEnd>,
}

impl Generation {
    /// A request cancelled (or timed out) before it generated anything: `usage` and
    /// `timings` say how far it got (all zero before any model work).
    pub fn cancelled(usage: Usage, timings: Timings) -> Generation {
        Generation {
            text: String::new(),
            token_ids: Vec::new(),
            finish_reason: FinishReason::Cancelled,
            usage,
            timings,
            field_ends: Vec::new(),
        }
    }
}

/// Set once the host process is exiting (`shut_down`): every request counts as cancelled.
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// Cancels every request of every engine in the process, running or to come: at the host
/// process's exit, so that no scheduler thread still runs ONNX Runtime while the process
/// tears it down (it printed kernel errors then). See `scheduler::wait_idle`.
pub fn shut_down() {
    SHUTTING_DOWN.store(true, Ordering::Relaxed);
}

/// A handle that stops a running request between decode steps.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    deadline: Option<Instant>,
}

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Also cancels once `seconds` have passed from now (a span too long for the clock, or
    /// not a positive number, sets no deadline; `RequestOptions::validate` refuses those).
    pub fn with_timeout(mut self, seconds: Option<f64>) -> Cancel {
        self.deadline = seconds
            .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
            .and_then(|d| Instant::now().checked_add(d));
        self
    }

    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
            || SHUTTING_DOWN.load(Ordering::Relaxed)
            || self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}
