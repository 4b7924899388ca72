//! The scheduler: one thread per engine that admits requests (vision and prefill, one at
//! a time) between decoder steps of the running ones, and runs those steps batched.
//! Sequences join and leave the batch between steps and keep their own sampler, seed and
//! grammar state. The first batched step on a model, and the first whose rows differ in
//! length, are checked against the same rows run alone; if they differ, the engine decodes
//! sequences one at a time from then on and says why once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;

use crate::engine::{Engine, Started};
use crate::error::{Error, Result, catch_panic};
use crate::grammar::Grammar;
use crate::options::{Batching, RequestOptions};
use crate::request::{Cancel, Generation, ImageSource, Timings, Usage};
use crate::runtime::tensor::check_finite;
use crate::runtime::{BatchCache, BatchSemantics, HybridCache};
use crate::sequence::{Sequence, Step, TextSink};

/// Called once with the request's outcome.
pub type Reply = Box<dyn FnOnce(Result<Generation>) + Send>;

/// A request for the scheduler.
pub struct Job {
    pub messages: Value,
    pub images: Vec<ImageSource>,
    pub options: RequestOptions,
    pub grammar: Option<Grammar>,
    pub cancel: Cancel,
    pub sink: Option<TextSink>,
    pub reply: Reply,
}

/// Counters of what the scheduler did.
#[derive(Debug, Default)]
pub struct Stats {
    /// Decoder steps run (a batched step counts once).
    pub steps: AtomicUsize,
    /// Sequence-steps run (a batched step of 4 rows counts 4).
    pub rows: AtomicUsize,
    /// The largest batch run in one decoder call.
    pub max_batch: AtomicUsize,
}

/// Threads with model work (a scheduler with running or waiting requests, a `Busy`
/// holder), in the whole process.
static BUSY: AtomicUsize = AtomicUsize::new(0);

/// Waits until no scheduler thread (or `Busy` holder) has work, for at most `timeout`:
/// whether they all went idle. With `request::shut_down`, for the host process's exit.
pub fn wait_idle(timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while BUSY.load(Ordering::Acquire) > 0 {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Counts its holder as running model work until dropped (see `wait_idle`): a scheduler
/// thread with requests, or work on a caller's own thread (`Engine::next_token_logits`).
pub struct Busy(());

impl Busy {
    pub fn start() -> Busy {
        BUSY.fetch_add(1, Ordering::AcqRel);
        Busy(())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Handle to an engine's scheduler thread; dropping it ends the thread once idle.
pub struct Scheduler {
    tx: Sender<Job>,
    /// Set when batching was found to change results on this model.
    pub fallback_reason: Arc<Mutex<Option<String>>>,
    pub stats: Arc<Stats>,
}

impl Scheduler {
    pub fn start(engine: Arc<Engine>) -> Scheduler {
        let (tx, rx) = crossbeam_channel::unbounded();
        let fallback_reason = Arc::new(Mutex::new(None));
        let stats = Arc::new(Stats::default());
        let (reason, counters) = (fallback_reason.clone(), stats.clone());
        std::thread::Builder::new()
            .name("lfm-scheduler".into())
            // Grammar matchers run here too; as deep as their compile may go.
            .stack_size(crate::deep_stack::STACK_BYTES)
            .spawn(move || Worker::new(engine, reason, counters).run(rx))
            .ok();
        Scheduler { tx, fallback_reason, stats }
    }

    pub fn submit(&self, job: Job) {
        if let Err(e) = self.tx.send(job) {
            (e.0.reply)(Err(Error::Internal("the scheduler thread has stopped".into())));
        }
    }
}

/// Decoder state of the running sequences.
enum Caches {
    /// One batched cache, rows in the order of `Worker::active`.
    Batched(BatchCache),
    /// One cache per sequence, stepped one at a time.
    Single(Vec<HybridCache>),
}

struct Running {
    seq: Sequence,
    logits: Vec<f32>,
    reply: Reply,
}

/// Which batched steps have been checked against their rows run alone.
#[derive(Default)]
struct Checked {
    /// A step of two or more rows.
    batch: bool,
    /// A step whose rows differ in length (some padded).
    padding: bool,
}

struct Worker {
    engine: Arc<Engine>,
    active: Vec<Running>,
    caches: Caches,
    checked: Checked,
    fallback_reason: Arc<Mutex<Option<String>>>,
    stats: Arc<Stats>,
}

impl Worker {
    fn new(engine: Arc<Engine>, fallback_reason: Arc<Mutex<Option<String>>>, stats: Arc<Stats>) -> Worker {
        let batched = match engine.options().batching {
            Batching::On => true,
            Batching::Off => false,
            Batching::Auto => engine.spec().batching == BatchSemantics::MaskLengths,
        };
        let caches = if batched { Caches::Batched(engine.model().batch_new()) } else { Caches::Single(Vec::new()) };
        Worker { engine, active: Vec::new(), caches, checked: Checked::default(), fallback_reason, stats }
    }

    fn run(mut self, rx: Receiver<Job>) {
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let max = self.engine.options().max_batch_size.max(1);
        // Busy for the exit's wait from a request's arrival until the work runs out;
        // dropped however the thread ends (unwinding too).
        let mut busy: Option<Busy> = None;
        loop {
            if self.active.is_empty() && waiting.is_empty() {
                drop(busy.take());
                let job = rx.recv();
                busy = Some(Busy::start());
                match job {
                    Ok(job) => waiting.push_back(job),
                    Err(_) => break,
                }
            }
            waiting.extend(rx.try_iter());
            // Requests cancelled (Ctrl-C, a timeout, a dropped stream) while they waited
            // end now, before any model work, rather than when their turn comes.
            if waiting.iter().any(|job| job.cancel.is_cancelled()) {
                let (cancelled, kept): (VecDeque<Job>, VecDeque<Job>) =
                    waiting.drain(..).partition(|job| job.cancel.is_cancelled());
                waiting = kept;
                for job in cancelled {
                    (job.reply)(Ok(Generation::cancelled(Usage::default(), Timings::default())));
                }
            }
            // Admit one request per step, so running sequences keep flowing while new ones
            // are encoded and prefilled.
            if self.active.len() < max
                && let Some(job) = waiting.pop_front()
            {
                self.admit(job);
            }
            if !self.active.is_empty()
                && let Err(e) = catch_panic("decode step", || self.step())
            {
                self.fail_all(e);
            }
        }
        drop(busy);
    }

    fn admit(&mut self, job: Job) {
        let Job { messages, images, options, grammar, cancel, sink, reply } = job;
        if cancel.is_cancelled() {
            return reply(Ok(Generation::cancelled(Usage::default(), Timings::default())));
        }
        let started =
            catch_panic("prefill", || self.engine.start(&messages, images, &options, grammar.as_ref(), cancel, sink));
        let (seq, cache, logits) = match started {
            Ok(Started::Ready(p)) => (p.seq, p.cache, p.logits),
            Ok(Started::Cancelled(g)) => return reply(Ok(g)),
            Err(e) => return reply(Err(e)),
        };
        let joined = match &mut self.caches {
            // A panic here must not end the scheduler thread (and with it the engine).
            Caches::Batched(b) => catch_panic("batch join", || self.engine.model().batch_join(b, cache)),
            Caches::Single(v) => {
                v.push(cache);
                Ok(())
            }
        };
        match joined {
            Ok(()) => self.active.push(Running { seq, logits, reply }),
            Err(e) => {
                // A failed join may leave the batch's cache incomplete: its rows fail too
                // rather than decode from it.
                let broken = matches!(self.caches, Caches::Batched(_)) && !self.active.is_empty();
                let msg = e.to_string();
                reply(Err(e));
                if broken {
                    self.fail_all(Error::Internal(format!("a sequence could not join the batch: {msg}")));
                }
            }
        }
    }

    fn fail_all(&mut self, e: Error) {
        let msg = e.to_string();
        for r in self.active.drain(..) {
            (r.reply)(Err(Error::inference("decoder", format!("batched step failed: {msg}"))));
        }
        self.caches = match self.caches {
            Caches::Batched(_) => Caches::Batched(self.engine.model().batch_new()),
            Caches::Single(_) => Caches::Single(Vec::new()),
        };
    }

    /// One decoder step for every running sequence: each picks its next token (or
    /// finishes and leaves), then the decoder runs once for those still going.
    fn step(&mut self) -> Result<()> {
        let engine = self.engine.clone();
        let (tok, model) = (engine.tokenizer(), engine.model());
        let mut outcomes: Vec<Result<Step>> =
            self.active.iter_mut().map(|r| r.seq.advance(&mut r.logits, tok)).collect();
        let leaving: Vec<usize> =
            (0..outcomes.len()).rev().filter(|&i| !matches!(outcomes[i], Ok(Step::Continue(_)))).collect();
        match &mut self.caches {
            Caches::Batched(b) => model.batch_remove(b, &leaving)?,
            Caches::Single(v) => {
                for &i in &leaving {
                    v.remove(i);
                }
            }
        }
        for &i in &leaving {
            let r = self.active.remove(i);
            let result = match outcomes.remove(i) {
                Ok(Step::Finished(reason)) => r.seq.finish(reason, tok),
                Ok(Step::Continue(_)) => Err(Error::Internal("a continuing sequence was retired".into())),
                Err(e) => Err(e),
            };
            (r.reply)(result);
        }
        if self.active.is_empty() {
            return Ok(());
        }
        let next: Vec<u32> =
            outcomes.into_iter().map(|o| if let Ok(Step::Continue(id)) = o { id } else { 0 }).collect();
        let batched = matches!(self.caches, Caches::Batched(_));
        self.stats.steps.fetch_add(if batched { 1 } else { next.len() }, Ordering::Relaxed);
        self.stats.rows.fetch_add(next.len(), Ordering::Relaxed);
        self.stats.max_batch.fetch_max(if batched { next.len() } else { 1 }, Ordering::Relaxed);
        // A row whose step fails (its token embeds to non-finite values, its logits are not
        // finite, or, one sequence at a time, its own decoder call fails) leaves alone with
        // its error; the others go on.
        let hidden = engine.spec().hidden;
        let embeds: Vec<Result<Vec<f32>>> = match model.embed(&next) {
            Ok(all) => all.chunks(hidden).map(|row| Ok(row.to_vec())).collect(),
            Err(_) => next.iter().map(|&id| model.embed(&[id])).collect(),
        };
        let embeds = self.retire_failed(embeds)?;
        if self.active.is_empty() {
            return Ok(());
        }
        let rows = self.decode_rows(embeds)?;
        let rows = rows.into_iter().map(|row| row.and_then(|l| check_finite("decoder", &l).map(|()| l))).collect();
        let logits = self.retire_failed(rows)?;
        for (r, l) in self.active.iter_mut().zip(logits) {
            r.logits = l;
        }
        Ok(())
    }

    /// Ends the running sequences whose result failed, each with its error, and returns
    /// the others' results in order (`results` holds one per running sequence).
    fn retire_failed<T>(&mut self, results: Vec<Result<T>>) -> Result<Vec<T>> {
        let mut kept = Vec::with_capacity(results.len());
        let mut failed = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(v) => kept.push(v),
                Err(e) => failed.push((i, e)),
            }
        }
        let gone: Vec<usize> = failed.iter().rev().map(|(i, _)| *i).collect();
        match &mut self.caches {
            Caches::Batched(b) => self.engine.model().batch_remove(b, &gone)?,
            Caches::Single(v) => {
                for &i in &gone {
                    v.remove(i);
                }
            }
        }
        for (i, e) in failed.into_iter().rev() {
            (self.active.remove(i).reply)(Err(e));
        }
        Ok(kept)
    }

    /// The next logits of every running sequence, given the embedding of the token each
    /// took: an error for the whole step where the batch's call failed (its cache is then
    /// in an unknown state), else one result per row.
    fn decode_rows(&mut self, embeds: Vec<Vec<f32>>) -> Result<Vec<Result<Vec<f32>>>> {
        let engine = self.engine.clone();
        let model = engine.model();
        let hidden = engine.spec().hidden;
        match &mut self.caches {
            Caches::Single(caches) => {
                Ok(caches.iter_mut().zip(embeds).map(|(cache, emb)| model.decode(emb, 1, cache)).collect())
            }
            Caches::Batched(batch) => {
                let emb = embeds.concat();
                // Checked twice: on the first batched step (rows sharing a call can change
                // each other's results, e.g. activation scales of the whole call), and on
                // the first whose rows differ in length: rows of one length are not padded,
                // so only such a step shows what the graph does with padding.
                let padded = batch.lens.iter().any(|&l| l != batch.lens[0]);
                let check = (!self.checked.batch && batch.len() > 1) || (padded && !self.checked.padding);
                if !check {
                    return Ok(model.decode_batch(emb, batch)?.into_iter().map(Ok).collect());
                }
                self.checked.batch = true;
                self.checked.padding |= padded;
                let alone: Vec<(HybridCache, Vec<f32>)> = (0..batch.len())
                    .map(|i| {
                        let mut c = model.batch_row(batch, i)?;
                        let l = model.decode(emb[i * hidden..(i + 1) * hidden].to_vec(), 1, &mut c)?;
                        Ok((c, l))
                    })
                    .collect::<Result<_>>()?;
                let batched = model.decode_batch(emb, batch)?;
                let worst = alone
                    .iter()
                    .zip(&batched)
                    .map(|((_, a), b)| crate::runtime::model::relative_difference(a, b))
                    .fold(0f32, f32::max);
                // fp32 rows agree to rounding; fp16 ones to a few half-precision steps.
                let spec = engine.spec();
                let half = [spec.embeds_float, spec.conv_float, spec.kv_float]
                    .contains(&crate::runtime::tensor::FloatType::F16);
                let tolerance = if half { 4e-3 } else { 1e-4 };
                if worst <= tolerance {
                    return Ok(batched.into_iter().map(Ok).collect());
                }
                if let Ok(mut slot) = self.fallback_reason.lock() {
                    *slot = Some(format!(
                        "batched decoder steps differ from single-sequence steps on this model (relative logits \
                         difference {worst:.2e}); decoding one sequence at a time"
                    ));
                }
                let (caches, logits): (Vec<_>, Vec<_>) = alone.into_iter().unzip();
                self.caches = Caches::Single(caches);
                Ok(logits.into_iter().map(Ok).collect())
            }
        }
    }
}
