//! The engine: admission, preprocessing, vision, prefill, and the decode loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde_json::Value;

use crate::admission::check_messages;
use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::files::{ModelFiles, bundled};
use crate::grammar::{Constraint, Grammar, GrammarCompiler};
use crate::options::{EngineOptions, RequestOptions};
use crate::preproc::decode::{DecodeLimits, decode, probe};
use crate::preproc::pixels::{Padding, preprocess_padded};
use crate::preproc::{Preprocessor, RgbImage, TileGrid, expand_placeholders};
use crate::request::{Cancel, Generation, ImageSource, Timings, Usage};
use crate::runtime::graph::{self, Stop};
use crate::runtime::{HybridCache, Model, ModelSpec, SessionConfig};
use crate::sequence::{Sequence, Step, TextSink};
use crate::tokenizer::TextTokenizer;

/// An image that passed admission: its source (file contents read once) and its plan.
struct PlannedImage {
    source: ImageSource,
    grid: TileGrid,
    width: u32,
    height: u32,
}

/// A request ready for the model: prompt ids and planned images.
pub struct Prepared {
    images: Vec<PlannedImage>,
    pub prompt_ids: Vec<u32>,
    pub image_tokens: usize,
    preprocess_s: f64,
}

/// A loaded model with its tokenizer, chat template and preprocessing.
pub struct Engine {
    model: Model,
    tokenizer: TextTokenizer,
    template: ChatTemplate,
    preprocessor: Preprocessor,
    options: EngineOptions,
    seeds: AtomicU64,
    grammars: OnceLock<Arc<GrammarCompiler>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("spec", &self.model.spec).finish()
    }
}

/// A model folder's text file; bytes that are not UTF-8 make it a file lfm cannot load
/// (not an I/O failure).
fn read_text(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => Error::model_load(path, "not UTF-8 text"),
        _ => Error::io(path, e),
    })
}

fn read_json(path: &std::path::Path) -> Result<Value> {
    serde_json::from_str(&read_text(path)?).map_err(|e| Error::model_load(path, format!("not valid JSON: {e}")))
}

impl Engine {
    /// Loads the graphs, tokenizer and chat template named by `files`.
    pub fn load(files: &ModelFiles, options: EngineOptions) -> Result<Engine> {
        options.validate()?;
        let tokenizer_config = match &files.tokenizer_config {
            Some(p) => Some(read_json(p)?),
            None => None,
        };
        let template_source =
            match (&files.chat_template, tokenizer_config.as_ref().and_then(|c| c.get("chat_template"))) {
                (Some(p), _) => read_text(p)?,
                (None, Some(Value::String(s))) => s.clone(),
                _ => bundled::CHAT_TEMPLATE_JINJA.to_string(),
            };
        let template = ChatTemplate::new(&template_source).map_err(|e| {
            let detail = match e {
                Error::InvalidOption { value, .. } => value,
                other => other.to_string(),
            };
            let path = files.chat_template.clone().or_else(|| files.tokenizer_config.clone()).unwrap_or_default();
            Error::model_load(path, format!("the chat template does not compile: {detail}"))
        })?;
        let tokenizer_config = match tokenizer_config {
            Some(c) => Some(c),
            None if files.tokenizer.is_none() => serde_json::from_str(bundled::TOKENIZER_CONFIG_JSON).ok(),
            None => None,
        };
        let tokenizer = match &files.tokenizer {
            Some(p) => TextTokenizer::from_file(p, tokenizer_config.as_ref())?,
            None => TextTokenizer::from_bytes(
                std::path::Path::new("<bundled tokenizer.json>"),
                bundled::TOKENIZER_JSON,
                tokenizer_config.as_ref(),
            )?,
        };
        let config = SessionConfig {
            intra_threads: options.intra_threads.map(usize::from),
            inter_threads: options.inter_threads.map(usize::from),
            providers: options.providers.clone(),
        };
        let model = Model::load(&files.graphs, &config)?;
        if tokenizer.vocab_size > model.spec.vocab {
            return Err(Error::model_load(
                files.tokenizer.clone().unwrap_or_else(|| "<bundled tokenizer.json>".into()),
                format!(
                    "the tokenizer has {} tokens but the decoder only {} logits",
                    tokenizer.vocab_size, model.spec.vocab
                ),
            ));
        }
        let preprocessor = Preprocessor::new(options.image_budget)?;
        let seed0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed);
        Ok(Engine {
            model,
            tokenizer,
            template,
            preprocessor,
            options,
            seeds: AtomicU64::new(seed0),
            grammars: OnceLock::new(),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.model.spec
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Renders messages with the model's chat template (no admission checks).
    pub fn render(&self, messages: &Value, tools: Option<&Value>, add_generation_prompt: bool) -> Result<String> {
        self.template.render(messages, tools, add_generation_prompt, &self.tokenizer.special.bos_token)
    }

    /// The denylist for user text: the tokenizer's special tokens.
    fn specials(&self) -> &[String] {
        &self.tokenizer.special_strings
    }

    /// Admission, image planning (headers only), template, placeholder expansion and
    /// tokenization, with the context checked against `max_new_tokens`.
    pub fn prepare(&self, messages: &Value, images: Vec<ImageSource>, max_new_tokens: usize) -> Result<Prepared> {
        let t0 = Instant::now();
        let limits = &self.options.limits;
        let stats = check_messages(messages, limits, self.specials())?;
        if stats.image_parts != images.len() {
            return Err(Error::rejected(
                "images",
                images.len(),
                stats.image_parts,
                format!(
                    "the messages have {} image placeholders but {} images were given",
                    stats.image_parts,
                    images.len()
                ),
            ));
        }
        let dl = DecodeLimits::from(limits);
        let mut planned = Vec::with_capacity(images.len());
        for source in images {
            let source = match source {
                ImageSource::Path(p) => ImageSource::Bytes(dl.read_file(&p)?),
                other => other,
            };
            let (width, height) = match &source {
                ImageSource::Bytes(b) => {
                    let h = probe(b, &dl)?;
                    (h.width, h.height)
                }
                ImageSource::Pixels(img) => {
                    dl.check_size(img.width, img.height)?;
                    (img.width, img.height)
                }
                ImageSource::Path(_) => unreachable!("paths were read above"),
            };
            let grid = self.preprocessor.plan(width, height)?;
            planned.push(PlannedImage { source, grid, width, height });
        }
        let image_tokens: usize = planned.iter().map(|p| p.grid.num_image_tokens()).sum();
        let structural: usize = planned.iter().map(|p| p.grid.num_structural_tokens()).sum();
        // The graph's own bound too: past it the decoder call fails mid-generation. Checked
        // on the images' tokens before the template renders (a lower bound on the prompt),
        // then on the whole prompt once tokenized.
        let context = limits.context_tokens.min(self.model.spec.max_positions.unwrap_or(usize::MAX));
        if !planned.is_empty() && image_tokens + structural + max_new_tokens > context {
            return Err(Error::PromptTooLong {
                prompt_tokens: image_tokens + structural,
                max_new_tokens,
                limit: context,
            });
        }
        let rendered = self.render(messages, None, true)?;
        let grids: Vec<TileGrid> = planned.iter().map(|p| p.grid).collect();
        let text = expand_placeholders(&rendered, &grids).ok_or_else(|| {
            Error::rejected("messages", "", "", "the chat template did not place one <image> per image")
        })?;
        let prompt_ids = self.tokenizer.encode(&text)?;
        if prompt_ids.len() + max_new_tokens > context {
            return Err(Error::PromptTooLong { prompt_tokens: prompt_ids.len(), max_new_tokens, limit: context });
        }
        let counted = prompt_ids.iter().filter(|&&i| i == self.tokenizer.special.image).count();
        if counted != image_tokens {
            return Err(Error::Internal(format!("prompt has {counted} image tokens, the plan {image_tokens}")));
        }
        Ok(Prepared { images: planned, prompt_ids, image_tokens, preprocess_s: t0.elapsed().as_secs_f64() })
    }

    /// Full prompt ids after image expansion.
    pub fn encode_prompt(&self, messages: &Value, images: Vec<ImageSource>) -> Result<Vec<u32>> {
        Ok(self.prepare(messages, images, 0)?.prompt_ids)
    }

    /// Decodes and preprocesses each image, runs the vision encoder once per image, and
    /// returns the prompt embeddings with image features spliced in at `<image>` positions;
    /// `None` when `stop` says so before an image.
    fn prompt_embeddings(
        &self,
        prepared: &Prepared,
        timings: &mut Timings,
        stop: Stop<'_>,
    ) -> Result<Option<Vec<f32>>> {
        let hidden = self.model.spec.hidden;
        let dl = DecodeLimits::from(&self.options.limits);
        let mut features: Vec<f32> = Vec::with_capacity(prepared.image_tokens * hidden);
        for img in &prepared.images {
            if stop() {
                return Ok(None);
            }
            let t = Instant::now();
            let decoded;
            let pixels: &RgbImage = match &img.source {
                ImageSource::Pixels(p) => p,
                ImageSource::Bytes(b) => {
                    decoded = decode(b, &dl)?;
                    &decoded
                }
                ImageSource::Path(_) => return Err(Error::Internal("unread image path".into())),
            };
            if (pixels.width, pixels.height) != (img.width, img.height) {
                return Err(Error::ImageDecode {
                    detail: format!(
                        "decoded {}x{} pixels but the header said {}x{}",
                        pixels.width, pixels.height, img.width, img.height
                    ),
                });
            }
            let pre = preprocess_padded(pixels, &img.grid, Padding::Tight)?;
            timings.preprocess_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            features.extend(self.model.encode_image(&pre)?);
            timings.vision_s += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        let mut embeds = self.model.embed(&prepared.prompt_ids)?;
        let image_id = self.tokenizer.special.image;
        let mut rows = features.chunks_exact(hidden);
        for (pos, _) in prepared.prompt_ids.iter().enumerate().filter(|(_, id)| **id == image_id) {
            let row = rows.next().ok_or_else(|| Error::Internal("fewer image features than <image> tokens".into()))?;
            embeds[pos * hidden..(pos + 1) * hidden].copy_from_slice(row);
        }
        timings.prefill_s += t.elapsed().as_secs_f64();
        Ok(Some(embeds))
    }

    /// Runs the prompt through the decoder: the cache and the next-token logits, or `None`
    /// once `stop` says so (a cancelled request): between images or prompt chunks, and
    /// within a vision or decoder run (`graph::until`).
    fn prefill(
        &self,
        prepared: &Prepared,
        timings: &mut Timings,
        stop: Stop<'_>,
    ) -> Result<Option<(HybridCache, Vec<f32>)>> {
        graph::until(stop, || {
            let Some(embeds) = self.prompt_embeddings(prepared, timings, stop)? else { return Ok(None) };
            let t = Instant::now();
            let mut cache = self.model.new_cache()?;
            let logits = self.model.prefill_until(embeds, &mut cache, stop)?;
            timings.prefill_s += t.elapsed().as_secs_f64();
            Ok(logits.map(|l| (cache, l)))
        })
    }

    /// The raw logits row for the token after the prompt.
    pub fn next_token_logits(&self, messages: &Value, images: Vec<ImageSource>) -> Result<Vec<f32>> {
        // Runs on the caller's thread: counted for the exit's wait, and stopped by it.
        let _busy = crate::scheduler::Busy::start();
        let exiting = Cancel::new();
        let prepared = self.prepare(messages, images, 0)?;
        let (_, logits) = self
            .prefill(&prepared, &mut Timings::default(), &|| exiting.is_cancelled())?
            .ok_or_else(|| Error::inference("prefill", "stopped: the process is exiting"))?;
        Ok(logits)
    }

    fn next_seed(&self, opts: &RequestOptions) -> u64 {
        opts.seed.unwrap_or_else(|| self.seeds.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed))
    }

    /// The grammar compiler for this engine's tokenizer, built on first use.
    fn grammar_compiler(&self) -> Result<&Arc<GrammarCompiler>> {
        if let Some(c) = self.grammars.get() {
            return Ok(c);
        }
        let built = GrammarCompiler::new(self.tokenizer.inner(), self.model.spec.vocab, self.tokenizer.special.eos)?;
        Ok(self.grammars.get_or_init(|| built))
    }

    /// Compiles `grammar` for this engine (the check `generate` does before model work).
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint> {
        self.grammar_compiler()?.constraint(grammar)
    }

    /// Checks options, compiles the grammar, admits and prefills a request: a sequence
    /// ready for its first decode step, its cache, and the logits of that step; or, when
    /// `cancel` fires between its images or prompt chunks, its cancelled generation.
    pub fn start(
        &self,
        messages: &Value,
        images: Vec<ImageSource>,
        opts: &RequestOptions,
        grammar: Option<&Grammar>,
        cancel: Cancel,
        sink: Option<TextSink>,
    ) -> Result<Started> {
        opts.validate()?;
        // A stop string would end constrained output wherever it appears, complete or not;
        // the grammar decides where such output ends.
        if grammar.is_some() && !opts.stop.is_empty() {
            return Err(Error::option(
                "stop",
                format!("{:?}", opts.stop),
                "no stop strings with a grammar (the grammar decides where the output ends)",
            ));
        }
        let constraint = grammar.map(|g| self.constraint(g)).transpose()?;
        let prepared = self.prepare(messages, images, opts.max_new_tokens)?;
        let mut timings = Timings { preprocess_s: prepared.preprocess_s, ..Timings::default() };
        let stop = || cancel.is_cancelled();
        let Some((cache, logits)) = self.prefill(&prepared, &mut timings, &stop)? else {
            let usage = Usage {
                prompt_tokens: prepared.prompt_ids.len(),
                image_tokens: prepared.image_tokens,
                completion_tokens: 0,
            };
            return Ok(Started::Cancelled(Generation::cancelled(usage, timings)));
        };
        let seq = Sequence::new(
            opts.clone(),
            self.next_seed(opts),
            &self.tokenizer,
            &prepared.prompt_ids,
            prepared.image_tokens,
            grammar.zip(constraint),
            cancel,
            sink,
            timings,
        );
        Ok(Started::Ready(Box::new(Prefilled { seq, cache, logits })))
    }

    /// Generates a reply to `messages` on the calling thread, alone (no batching),
    /// constrained by `grammar` when given; `sink` receives the text as it is produced.
    pub fn generate(
        &self,
        messages: &Value,
        images: Vec<ImageSource>,
        opts: &RequestOptions,
        grammar: Option<&Grammar>,
        cancel: &Cancel,
        sink: Option<TextSink>,
    ) -> Result<Generation> {
        let (mut seq, mut cache, mut logits) =
            match self.start(messages, images, opts, grammar, cancel.clone(), sink)? {
                Started::Ready(p) => (p.seq, p.cache, p.logits),
                Started::Cancelled(g) => return Ok(g),
            };
        let reason = loop {
            match seq.advance(&mut logits, &self.tokenizer)? {
                Step::Finished(r) => break r,
                Step::Continue(id) => {
                    let emb = self.model.embed(&[id])?;
                    logits = self.model.decode(emb, 1, &mut cache)?;
                }
            }
        };
        seq.finish(reason, &self.tokenizer)
    }
}

/// What [`Engine::start`] gives.
pub enum Started {
    Ready(Box<Prefilled>),
    /// Cancelled (or timed out) before its prompt was through: nothing generated.
    Cancelled(Generation),
}

/// A prefilled request: the sequence, its cache, and the logits of its first decode step.
pub struct Prefilled {
    pub seq: Sequence,
    pub cache: HybridCache,
    pub logits: Vec<f32>,
}
