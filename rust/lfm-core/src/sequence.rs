//! One request's decoding state: sampler, grammar, stop strings, streamed text. The same
//! state advances whether its decoder steps run alone or batched with other requests.

use std::time::Instant;

use crate::error::Result;
use crate::field_ends::FieldTracker;
use crate::grammar::{Constraint, Grammar};
use crate::options::RequestOptions;
use crate::request::{Cancel, FinishReason, Generation, Timings, Usage};
use crate::sampling::Sampler;
use crate::stream::TextDeltas;
use crate::tokenizer::TextTokenizer;

/// Receives text as it is produced; returns `false` to stop the request.
pub type TextSink = Box<dyn FnMut(&str) -> bool + Send>;

/// What one decode step decided for a sequence.
pub enum Step {
    /// Feed this token to the decoder next.
    Continue(u32),
    /// The sequence is done.
    Finished(FinishReason),
}

pub struct Sequence {
    opts: RequestOptions,
    sampler: Sampler,
    constraint: Option<Constraint>,
    tracker: Option<FieldTracker>,
    deltas: TextDeltas,
    sink: Option<TextSink>,
    cancel: Cancel,
    eos: u32,
    pub ids: Vec<u32>,
    stop_cut: Option<usize>,
    pub usage: Usage,
    pub timings: Timings,
    decode_started: Option<Instant>,
}

impl Sequence {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        opts: RequestOptions,
        seed: u64,
        tokenizer: &TextTokenizer,
        prompt: &[u32],
        image_tokens: usize,
        grammar: Option<(&Grammar, Constraint)>,
        cancel: Cancel,
        sink: Option<TextSink>,
        timings: Timings,
    ) -> Sequence {
        let eos = tokenizer.special.eos;
        let sampler = Sampler::new(&opts, seed, eos, prompt, tokenizer.vocab_size);
        let tracker = matches!(grammar, Some((Grammar::JsonSchema(_), _))).then(FieldTracker::new);
        Sequence {
            deltas: TextDeltas::new(&opts.stop),
            sampler,
            constraint: grammar.map(|(_, c)| c),
            tracker,
            sink,
            cancel,
            eos,
            ids: Vec::new(),
            stop_cut: None,
            usage: Usage { prompt_tokens: prompt.len(), image_tokens, completion_tokens: 0 },
            timings,
            decode_started: None,
            opts,
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Chooses the next token from `logits` (the row for this sequence) and updates the
    /// request's state; `Finished` when the sequence must not take another step.
    pub fn advance(&mut self, logits: &mut [f32], tokenizer: &TextTokenizer) -> Result<Step> {
        self.decode_started.get_or_insert_with(Instant::now);
        if self.cancel.is_cancelled() {
            return Ok(Step::Finished(FinishReason::Cancelled));
        }
        if self.constraint.as_ref().is_some_and(|c| c.is_stopped()) {
            return Ok(Step::Finished(FinishReason::Grammar));
        }
        if self.ids.len() >= self.opts.max_new_tokens {
            return Ok(Step::Finished(FinishReason::Length));
        }
        let mask = match self.constraint.as_mut() {
            Some(c) => Some(c.apply(logits)?),
            None => None,
        };
        self.sampler.process(logits, self.ids.len());
        let id = self.sampler.choose(logits)?;
        if let (Some(c), Some(tr), Some(m)) = (self.constraint.as_ref(), self.tracker.as_mut(), mask.as_ref()) {
            let bytes = c.token_bytes(id);
            let trie = c.tok_env().tok_trie();
            tr.observe(&bytes, |prefix| {
                (0..m.len() as u32).any(|t| {
                    m.is_allowed(t) && {
                        let tb = trie.token(t);
                        tb.len() > prefix.len()
                            && tb.starts_with(prefix)
                            && tb[prefix.len()] != b'"'
                            && tb[prefix.len()] != 0xFF
                    }
                })
            });
        }
        if let Some(c) = self.constraint.as_mut() {
            c.commit(id)?;
        }
        if id == self.eos {
            return Ok(Step::Finished(if self.constraint.is_some() {
                FinishReason::Grammar
            } else {
                FinishReason::Stop
            }));
        }
        self.ids.push(id);
        self.sampler.observe(id);
        if self.sink.is_some() || !self.opts.stop.is_empty() {
            let text = tokenizer.decode(&self.ids)?;
            if let Some(cut) = self.opts.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                self.stop_cut = Some(cut);
                return Ok(Step::Finished(FinishReason::Stop));
            }
            if let (Some(sink), Some(delta)) = (self.sink.as_mut(), self.deltas.push(&text))
                && !sink(&delta)
            {
                return Ok(Step::Finished(FinishReason::Cancelled));
            }
        }
        if self.constraint.as_ref().is_some_and(|c| c.is_stopped()) {
            return Ok(Step::Finished(FinishReason::Grammar));
        }
        if self.ids.len() >= self.opts.max_new_tokens {
            return Ok(Step::Finished(FinishReason::Length));
        }
        Ok(Step::Continue(id))
    }

    /// The finished generation.
    pub fn finish(mut self, reason: FinishReason, tokenizer: &TextTokenizer) -> Result<Generation> {
        self.timings.decode_s = self.decode_started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let mut text = tokenizer.decode(&self.ids)?;
        if let Some(cut) = self.stop_cut {
            text.truncate(cut);
        }
        if let (Some(sink), Some(rest)) = (self.sink.as_mut(), self.deltas.finish(&text)) {
            sink(&rest);
        }
        let field_ends = match (reason, self.tracker) {
            (FinishReason::Grammar, Some(tr)) => tr.ends,
            _ => Vec::new(),
        };
        self.usage.completion_tokens = self.ids.len();
        Ok(Generation {
            text,
            token_ids: self.ids,
            finish_reason: reason,
            usage: self.usage,
            timings: self.timings,
            field_ends,
        })
    }
}
