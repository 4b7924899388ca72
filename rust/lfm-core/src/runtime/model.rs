//! The three graphs of LFM2-VL as one model: contracts checked at load time, widths read
//! from the graphs, and the hybrid (conv state / key-value) decoder cache.

use std::path::{Path, PathBuf};

use ort::session::SessionInputValue;
use ort::value::DynValue;

use crate::error::{Error, Result};
use crate::preproc::PreprocessedImage;

use super::graph::{Graph, Memory, Port, SessionConfig, Stop};
use super::tensor::{FloatType, check_finite, float_dims, float_value, i64_value, read_floats};

/// Prompt positions per decoder call during prefill (see `Model::prefill`).
const PREFILL_CHUNK: usize = 512;

/// Where the three graph files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphPaths {
    pub vision_encoder: PathBuf,
    pub embed_tokens: PathBuf,
    pub decoder: PathBuf,
}

/// The two kinds of decoder layer in the LFM2 hybrid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Gated short convolution; its cache is the last `conv_width` columns.
    Conv,
    /// Grouped-query attention; its cache is keys and values of every past position.
    Attention,
}

/// What the graphs say about the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Hidden width of the language model.
    pub hidden: usize,
    /// Logits per position.
    pub vocab: usize,
    /// Values per vision patch (16 * 16 * 3).
    pub patch_dim: usize,
    /// Layer kinds in layer order, as the decoder's cache inputs declare them.
    pub layers: Vec<LayerKind>,
    /// Conv state: `[batch, conv_channels, conv_width]`.
    pub conv_channels: usize,
    pub conv_width: usize,
    /// Attention cache: `[batch, kv_heads, positions, head_dim]`.
    pub kv_heads: usize,
    pub head_dim: usize,
    /// How rows of a batch may be padded (from the decoder's attention operator).
    pub batching: super::batch::BatchSemantics,
    /// Whether the attention layers can update a pre-sized key/value cache in place.
    pub kv_in_place: bool,
    /// How prompts longer than a chunk go through the decoder.
    pub prefill: Prefill,
    /// Whether the vision encoder quantizes activations with scales taken from its input
    /// (dynamic int8): then its output depends on which tiles share a call, so all of an
    /// image's tiles go in one call, as the model card runs it.
    pub vision_activation_quant: bool,
    /// Whether the vision encoder runs with fused attention and GELU (`vision_fusion`).
    pub vision_fused: bool,
    /// How many of the decoder's operators run for the last position only
    /// (`last_position`); 0 when the graph runs as exported.
    pub last_position_ops: usize,
    /// How many run for a window of the prompt's last positions (the operators feeding
    /// only a last convolution layer; `last_position`); 0 without the window.
    pub prefill_window_ops: usize,
    /// Positions (prompt and generated) the decoder can take, where its graph bounds them.
    pub max_positions: Option<usize>,
    pub vision_float: FloatType,
    pub embeds_float: FloatType,
    /// Element types of the conv states and of the key/value caches.
    pub conv_float: FloatType,
    pub kv_float: FloatType,
}

/// How a prompt longer than `PREFILL_CHUNK` positions goes through the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefill {
    /// In one run: decoders that place positions by the cache width, and decoders that
    /// quantize activations with scales of the whole call (their results depend on which
    /// positions share a call; the model card runs the whole prompt at once).
    OneRun,
    /// In chunks, each returning a new cache one chunk longer.
    Chunked,
    /// In chunks appended in place to one cache sized for the prompt (`kv_in_place`, and
    /// a check at load found it equal to one run).
    InPlace,
}

/// One layer's cache.
pub enum LayerCache {
    Conv { state: DynValue },
    Attention { key: DynValue, value: DynValue },
}

/// The per-layer hybrid cache of one sequence, and how many positions it holds.
pub struct HybridCache {
    pub layers: Vec<LayerCache>,
    pub past_len: usize,
}

/// `(past input, present output)` names of layer `i`'s cache tensors: `past_conv.i` /
/// `present_conv.i`, or `past_key_values.i.key` / `present.i.key` and the same for `.value`.
pub(crate) fn cache_names(i: usize, kind: LayerKind) -> Vec<(String, String)> {
    match kind {
        LayerKind::Conv => vec![(past_conv(i), present_conv(i))],
        LayerKind::Attention => {
            vec![(past_kv(i, "key"), present_kv(i, "key")), (past_kv(i, "value"), present_kv(i, "value"))]
        }
    }
}

/// Cache input names in layer order.
pub(crate) fn cache_input_names(layers: &[LayerKind]) -> Vec<String> {
    layers.iter().enumerate().flat_map(|(i, &k)| cache_names(i, k)).map(|(past, _)| past).collect()
}

/// The decoder's inputs: embeddings, mask, then each layer's cache under its input name.
pub(crate) fn decoder_inputs<'a>(
    embeds: DynValue,
    mask: DynValue,
    layers: &'a [LayerCache],
    names: &'a [String],
) -> Vec<(&'a str, SessionInputValue<'a>)> {
    let mut inputs: Vec<(&str, SessionInputValue<'_>)> =
        vec![("inputs_embeds", embeds.into()), ("attention_mask", mask.into())];
    let mut name = names.iter().map(String::as_str);
    for layer in layers {
        match layer {
            LayerCache::Conv { state } => inputs.push((name.next().unwrap_or_default(), state.into())),
            LayerCache::Attention { key, value } => {
                inputs.push((name.next().unwrap_or_default(), key.into()));
                inputs.push((name.next().unwrap_or_default(), value.into()));
            }
        }
    }
    inputs
}

fn past_conv(i: usize) -> String {
    format!("past_conv.{i}")
}
fn present_conv(i: usize) -> String {
    format!("present_conv.{i}")
}
fn past_kv(i: usize, part: &str) -> String {
    format!("past_key_values.{i}.{part}")
}
fn present_kv(i: usize, part: &str) -> String {
    format!("present.{i}.{part}")
}

/// Reads the layer layout from the decoder's cache inputs (`past_conv.N`,
/// `past_key_values.N.key/value`): every index from 0 must be exactly one kind.
fn discover_layers(dec: &Graph) -> Result<Vec<LayerKind>> {
    let mut kinds: Vec<Option<LayerKind>> = Vec::new();
    let mut set = |i: usize, k: LayerKind, name: &str| -> Result<()> {
        if kinds.len() <= i {
            kinds.resize(i + 1, None);
        }
        match kinds[i] {
            Some(prev) if prev != k => Err(dec.error(format!("layer {i} is both conv and attention (`{name}`)"))),
            _ => {
                kinds[i] = Some(k);
                Ok(())
            }
        }
    };
    for p in &dec.inputs {
        let n = p.name.as_str();
        if n == "inputs_embeds" || n == "attention_mask" {
            continue;
        }
        let parsed = if let Some(i) = n.strip_prefix("past_conv.") {
            i.parse().ok().map(|i| (i, LayerKind::Conv))
        } else if let Some(rest) = n.strip_prefix("past_key_values.") {
            rest.strip_suffix(".key")
                .or_else(|| rest.strip_suffix(".value"))
                .and_then(|i| i.parse().ok())
                .map(|i| (i, LayerKind::Attention))
        } else {
            None
        };
        match parsed {
            Some((i, k)) => set(i, k, n)?,
            None => {
                return Err(dec.error(format!(
                    "unexpected input `{n}`: the decoder takes inputs_embeds, attention_mask, past_conv.N and \
                     past_key_values.N.key/value (positions come from the cache length, so no position_ids)"
                )));
            }
        }
    }
    if kinds.is_empty() {
        return Err(
            dec.error("no cache inputs (past_conv.N / past_key_values.N.key): not an LFM2 decoder with a cache")
        );
    }
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, k)| k.ok_or_else(|| dec.error(format!("layer {i} has no cache input"))))
        .collect()
}

/// Whether every attention layer's present key/value comes straight out of a
/// GroupQueryAttention node that reads the same layer's past key/value. Such a node
/// writes only the new positions when past and present are one buffer (as
/// onnxruntime-genai runs it), so batched decoding can keep a pre-sized cache instead of
/// copying the whole cache into new tensors every step.
fn kv_in_place(layers: &[LayerKind], nodes: &[super::onnx_proto::GraphNode]) -> bool {
    let attention: Vec<usize> = (0..layers.len()).filter(|&i| layers[i] == LayerKind::Attention).collect();
    !attention.is_empty()
        && attention.iter().all(|&i| {
            let (pk, pv, k, v) = (past_kv(i, "key"), past_kv(i, "value"), present_kv(i, "key"), present_kv(i, "value"));
            nodes.iter().any(|n| {
                n.op == "GroupQueryAttention"
                    && n.inputs.get(3) == Some(&pk)
                    && n.inputs.get(4) == Some(&pv)
                    && n.outputs.get(1) == Some(&k)
                    && n.outputs.get(2) == Some(&v)
            })
        })
}

/// Whether a graph quantizes activations with scales computed from each call's values
/// (`DynamicQuantizeLinear` and its fused forms): its results then depend on what shares a
/// call.
fn quantizes_activations(nodes: &[super::onnx_proto::GraphNode]) -> bool {
    nodes.iter().any(|n| n.op.starts_with("DynamicQuantize"))
}

/// How many positions the decoder's rotary tables cover, where its attention reads them
/// from constant tables (GroupQueryAttention's `cos_cache`: a position past its rows fails
/// the whole decoder call, every sequence batched with it included).
fn rotary_positions(path: &Path, nodes: &[super::onnx_proto::GraphNode]) -> Result<Option<usize>> {
    let Some(table) = nodes.iter().find(|n| n.op == "GroupQueryAttention").and_then(|n| n.inputs.get(7)) else {
        return Ok(None);
    };
    let Some(parts) = super::onnx_proto::ModelParts::read(path)? else { return Ok(None) };
    let view = super::graph_view::View::new(&parts);
    Ok(view.initializers.get(table).and_then(|dims| dims.first()).map(|&rows| rows.max(0) as usize))
}

/// The loaded graphs.
pub struct Model {
    pub spec: ModelSpec,
    /// What loading could not honour (e.g. an unavailable execution provider).
    pub warnings: Vec<String>,
    vision: Graph,
    embed: Graph,
    decoder: Graph,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("spec", &self.spec).finish()
    }
}

impl Model {
    pub fn load(paths: &GraphPaths, config: &SessionConfig) -> Result<Model> {
        let mut warnings = Vec::new();
        let vision_activation_quant = quantizes_activations(&super::onnx_proto::graph_nodes(&paths.vision_encoder)?);
        let (vision, vision_fused) = Self::load_vision(paths, config, &mut warnings, vision_activation_quant)?;
        let embed = Graph::load(&paths.embed_tokens, config, &mut warnings)?;
        let (decoder, rewrite) = Self::load_decoder(paths, config, &mut warnings, true)?;
        let mut spec = Self::check_contracts(&vision, &embed, &decoder)?;
        (spec.last_position_ops, spec.prefill_window_ops) = rewrite;
        // GroupQueryAttention takes each row's length from its mask row; anything else is
        // assumed to derive positions from the cache width.
        let nodes = super::onnx_proto::graph_nodes(&paths.decoder)?;
        if nodes.iter().any(|n| n.op == "GroupQueryAttention") {
            spec.batching = super::batch::BatchSemantics::MaskLengths;
        }
        spec.kv_in_place = kv_in_place(&spec.layers, &nodes);
        spec.max_positions = rotary_positions(&paths.decoder, &nodes)?;
        let decoder_activation_quant = quantizes_activations(&nodes);
        if spec.batching == super::batch::BatchSemantics::MaskLengths && !decoder_activation_quant {
            spec.prefill = Prefill::Chunked;
        }
        spec.vision_activation_quant = vision_activation_quant;
        spec.vision_fused = vision_fused;
        let mut model = Model { spec, warnings, vision, embed, decoder };
        model.check_vision_width()?;
        if model.spec.prefill_window_ops > 0
            && let Err(e) = model.check_prefill_window()
        {
            model.warnings.push(format!("prompts run every position through the last layers: {e}"));
            let (decoder, rewrite) = Self::load_decoder(paths, config, &mut model.warnings, false)?;
            model.decoder = decoder;
            (model.spec.last_position_ops, model.spec.prefill_window_ops) = rewrite;
        }
        if model.spec.kv_in_place && model.spec.prefill == Prefill::Chunked {
            match model.check_prefill_in_place() {
                Ok(()) => model.spec.prefill = Prefill::InPlace,
                Err(e) => model.warnings.push(format!("long prompts are prefilled without the in-place cache: {e}")),
            }
        }
        Ok(model)
    }

    /// The decoder, rewritten where the graph allows (`last_position`): its position-wise
    /// tail behind a slice of the last position (the prompt's other logits are never used)
    /// and, with `window`, the operators feeding only a last convolution layer behind a
    /// slice of its window. A rewritten graph ONNX Runtime refuses falls back to the next
    /// simpler one, down to the file as it is. Also returns how many operators each
    /// rewrite moved.
    fn load_decoder(
        paths: &GraphPaths,
        config: &SessionConfig,
        warnings: &mut Vec<String>,
        window: bool,
    ) -> Result<(Graph, (usize, usize))> {
        let switched_off = |name: &str| std::env::var_os(name).is_some();
        if !switched_off("LFM_NO_LOGITS_SLICE") {
            let window = window && !switched_off("LFM_NO_PREFILL_WINDOW");
            for window in if window { vec![true, false] } else { vec![false] } {
                let Some(r) = super::last_position::slice_to_last_position(&paths.decoder, window)? else { break };
                if let Ok(graph) = Graph::load_with(&paths.decoder, config, warnings, Some(&r.bytes)) {
                    return Ok((graph, (r.tail_ops, r.window_ops)));
                }
                // Without a window this was already the plain tail rewrite.
                if r.window_ops == 0 {
                    break;
                }
            }
        }
        Ok((Graph::load(&paths.decoder, config, warnings)?, (0, 0)))
    }

    /// Runs the vision encoder on one token's patches (2x2, zero pixels): its features must
    /// be as wide as the decoder. The exported graph leaves that width symbolic, so a vision
    /// encoder from another model would otherwise load and fail at the first image.
    fn check_vision_width(&self) -> Result<()> {
        let pd = self.spec.patch_dim;
        self.run_vision(vec![0.0; 4 * pd], vec![1; 4], vec![2, 2], [1, 4, pd], Memory::Release).map(|_| ()).map_err(
            |e| Error::model_load(&self.vision.path, format!("a one-token image does not fit the decoder: {e}")),
        )
    }

    /// Runs a short prompt through the decoder once, with the window of
    /// `load_decoder` cutting it, and in pieces no longer than the window, which the cut
    /// leaves whole, then one more position after each; fails unless the logits agree to
    /// rounding. The window rests on the last layer reading only that many trailing
    /// positions for its last output and its new state, which the graph rewrite assumes
    /// but does not prove. A few small decoder runs at load.
    fn check_prefill_window(&self) -> Result<()> {
        let width = self.spec.conv_width.max(1);
        let positions = 3 * width + 1;
        let ids: Vec<u32> = (0..=positions).map(|i| ((i * 7919 + 3) % self.spec.vocab) as u32).collect();
        let embeds = self.embed(&ids)?;
        let (prompt, next) = embeds.split_at(positions * self.spec.hidden);
        let mut whole = self.new_cache()?;
        let mut want = self.run_positions(prompt.to_vec(), positions, &mut whole, Memory::Keep)?;
        want.extend(self.run_positions(next.to_vec(), 1, &mut whole, Memory::Keep)?);
        let mut pieces = self.new_cache()?;
        let mut got = Vec::new();
        for piece in prompt.chunks(width * self.spec.hidden) {
            got = self.run_positions(piece.to_vec(), piece.len() / self.spec.hidden, &mut pieces, Memory::Keep)?;
        }
        got.extend(self.run_positions(next.to_vec(), 1, &mut pieces, Memory::Keep)?);
        self.check_logits_agree(&want, &got, "a prompt's last positions alone give logits", "the whole prompt")
    }

    /// Fails unless `got` equals `want` to rounding (a few half-precision steps for fp16
    /// caches), saying `what` and apart from `reference` how far (relative).
    fn check_logits_agree(&self, want: &[f32], got: &[f32], what: &str, reference: &str) -> Result<()> {
        let diff = relative_difference(want, got);
        let tolerance = if self.spec.kv_float == FloatType::F16 { 4e-3 } else { 1e-4 };
        if diff > tolerance {
            return Err(Error::inference("decoder", format!("{what} {diff:.2e} apart from {reference} (relative)")));
        }
        Ok(())
    }

    /// Prefills a short prompt in place in chunks of a few positions and in one ordinary
    /// run, and fails unless the last logits agree to rounding: the in-place chunks rely
    /// on the attention appending each chunk after a cache that is wider than the mask,
    /// which a graph or provider could implement differently (as for batched steps, the
    /// engine checks rather than trusts it). Two decoder runs on ~24 positions.
    fn check_prefill_in_place(&self) -> Result<()> {
        const POSITIONS: usize = 24;
        let ids: Vec<u32> = (0..POSITIONS).map(|i| ((i * 7919 + 1) % self.spec.vocab) as u32).collect();
        let embeds = self.embed(&ids)?;
        let mut whole = self.new_cache()?;
        let want = self.run_positions(embeds.clone(), POSITIONS, &mut whole, Memory::Keep)?;
        let mut chunked = self.new_cache()?;
        let got = self
            .prefill_in_place(&embeds, POSITIONS / 3, &mut chunked, &|| false)?
            .ok_or_else(|| Error::Internal("an in-place prefill that cannot stop stopped".into()))?;
        self.check_logits_agree(&want, &got, "chunks prefilled in place give logits", "one run")
    }

    /// The vision encoder, with its attention and GELU fused into ONNX Runtime's kernels
    /// where `vision_fusion` recognises them (second value: whether it did). Fusion drops
    /// the padding mask, which is sound because `encode_image` gives such graphs one entry
    /// per call without padding; graphs that take all entries in one (padded) call keep
    /// their own attention. A fused graph ONNX Runtime refuses falls back to the file.
    fn load_vision(
        paths: &GraphPaths,
        config: &SessionConfig,
        warnings: &mut Vec<String>,
        padded_calls: bool,
    ) -> Result<(Graph, bool)> {
        let path = &paths.vision_encoder;
        if !padded_calls
            && std::env::var_os("LFM_NO_VISION_FUSION").is_none()
            && let Some((bytes, _)) = super::vision_fusion::fuse_vision_graph(path)?
            && let Ok(graph) = Graph::load_with(path, config, warnings, Some(&bytes))
        {
            return Ok((graph, true));
        }
        Ok((Graph::load(path, config, warnings)?, false))
    }

    fn check_contracts(vision: &Graph, embed: &Graph, dec: &Graph) -> Result<ModelSpec> {
        // vision_encoder
        let pv = vision.expect_float(vision.input("pixel_values"), "pixel_values", 3, "[batch, patches, patch_dim]")?;
        vision.expect_int64(vision.input("pixel_attention_mask"), "pixel_attention_mask", 2, "[batch, patches]")?;
        vision.expect_int64(vision.input("spatial_shapes"), "spatial_shapes", 2, "[batch, 2]")?;
        let feats =
            vision.expect_float(vision.output("image_features"), "image_features", 2, "[image_tokens, hidden]")?;
        let patch_dim = vision.width(&pv, 2, "patch values")?;
        // Checked against the decoder's width below when declared, else at run time.
        let vision_hidden = feats.fixed(1);
        if vision.inputs.len() != 3 {
            return Err(
                vision.error(format!("expected 3 inputs, found {}: is this the vision encoder?", vision.inputs.len()))
            );
        }

        // embed_tokens
        embed.expect_int64(embed.input("input_ids"), "input_ids", 2, "[batch, sequence]")?;
        let emb = embed.expect_float(embed.output("inputs_embeds"), "inputs_embeds", 3, "[batch, sequence, hidden]")?;
        let embed_hidden = embed.width(&emb, 2, "hidden size")?;
        if embed.inputs.len() != 1 {
            return Err(embed.error(format!("expected 1 input (input_ids), found {}", embed.inputs.len())));
        }

        // decoder
        let din = dec.expect_float(dec.input("inputs_embeds"), "inputs_embeds", 3, "[batch, sequence, hidden]")?;
        dec.expect_int64(dec.input("attention_mask"), "attention_mask", 2, "[batch, total_sequence]")?;
        let logits = dec.expect_float(dec.output("logits"), "logits", 3, "[batch, sequence, vocab]")?;
        let hidden = dec.width(&din, 2, "hidden size")?;
        let vocab = dec.width(&logits, 2, "vocabulary")?;
        let layers = discover_layers(dec)?;

        let mut conv: Option<(usize, usize)> = None;
        let mut kv: Option<(usize, usize)> = None;
        let (mut conv_float, mut kv_float): (Option<FloatType>, Option<FloatType>) = (None, None);
        let agree = |port: &Port, got: (usize, usize), slot: &mut Option<(usize, usize)>| -> Result<()> {
            match *slot {
                Some(want) if want != got => {
                    Err(dec.error(format!("`{}` has widths {got:?}, other layers {want:?}", port.name)))
                }
                _ => {
                    *slot = Some(got);
                    Ok(())
                }
            }
        };
        for (i, kind) in layers.iter().enumerate() {
            for (past, present) in cache_names(i, *kind) {
                let (rank, doc) = match kind {
                    LayerKind::Conv => (3, "[batch, channels, width]"),
                    LayerKind::Attention => (4, "[batch, kv_heads, positions, head_dim]"),
                };
                let p = dec.expect_float(dec.input(&past), &past, rank, doc)?;
                let q = dec.expect_float(dec.output(&present), &present, rank, doc)?;
                if p.float_type() != q.float_type() {
                    return Err(dec.error(format!("`{past}` and `{present}` differ in element type")));
                }
                let slot = if *kind == LayerKind::Conv { &mut conv_float } else { &mut kv_float };
                match (*slot, p.float_type()) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(dec.error(format!("`{past}` is {b:?} but other layers of its kind are {a:?}")));
                    }
                    (_, t) => *slot = t,
                }
                let widths = match kind {
                    LayerKind::Conv => (dec.width(&p, 1, "conv channels")?, dec.width(&p, 2, "conv width")?),
                    LayerKind::Attention => (dec.width(&p, 1, "kv heads")?, dec.width(&p, 3, "head dim")?),
                };
                match kind {
                    LayerKind::Conv => agree(&p, widths, &mut conv)?,
                    LayerKind::Attention => agree(&p, widths, &mut kv)?,
                }
            }
        }
        if embed_hidden != hidden || vision_hidden.is_some_and(|v| v != hidden) {
            return Err(dec.error(format!(
                "hidden sizes disagree: decoder {hidden}, embed_tokens {embed_hidden}, vision_encoder {vision_hidden:?} \
                 (graphs from different models?)"
            )));
        }
        let float = |p: &Port| p.float_type().unwrap_or(FloatType::F32);
        Ok(ModelSpec {
            hidden,
            vocab,
            patch_dim,
            conv_channels: conv.map_or(0, |c| c.0),
            conv_width: conv.map_or(0, |c| c.1),
            kv_heads: kv.map_or(0, |k| k.0),
            head_dim: kv.map_or(0, |k| k.1),
            layers,
            batching: super::batch::BatchSemantics::CacheWidth,
            kv_in_place: false,
            prefill: Prefill::OneRun,
            vision_activation_quant: false,
            vision_fused: false,
            last_position_ops: 0,
            prefill_window_ops: 0,
            max_positions: None,
            vision_float: float(&pv),
            embeds_float: float(&din),
            conv_float: conv_float.unwrap_or(FloatType::F32),
            kv_float: kv_float.unwrap_or(FloatType::F32),
        })
    }

    /// Image features `[image_tokens * hidden]` of one image. Each tile (and the
    /// thumbnail) goes through the encoder alone and without padding: a tile attends only
    /// to its own real patches, so the features are the same, the encoder does no work on
    /// padding, and its working memory (attention scores grow with patches^2) stays that
    /// of one tile. One tile per call also measured fastest (better cache use).
    pub fn encode_image(&self, pre: &PreprocessedImage) -> Result<Vec<f32>> {
        const STAGE: &str = "vision_encoder";
        if pre.patch_dim != self.spec.patch_dim {
            return Err(Error::inference(
                STAGE,
                format!("patches have {} values, the graph takes {}", pre.patch_dim, self.spec.patch_dim),
            ));
        }
        let (n, p, pd) = (pre.num_entries, pre.patches_per_entry, pre.patch_dim);
        let feats = if self.spec.vision_activation_quant {
            let (pixels, mask, shapes) =
                (pre.pixel_values.clone(), pre.pixel_attention_mask.clone(), pre.spatial_shapes.clone());
            self.run_vision(pixels, mask, shapes, [n, p, pd], Memory::Release)?
        } else {
            let mut feats = Vec::with_capacity(pre.grid.num_image_tokens() * self.spec.hidden);
            for entry in 0..n {
                // Real patches come first; the padding after them is left out.
                let mask = &pre.pixel_attention_mask[entry * p..(entry + 1) * p];
                let real = mask.iter().take_while(|&&m| m != 0).count();
                if real == 0 || mask[real..].iter().any(|&m| m != 0) {
                    return Err(Error::Internal(format!("entry {entry}: padding is not after the real patches")));
                }
                let pixels = pre.pixel_values[entry * p * pd..(entry * p + real) * pd].to_vec();
                let shape = pre.spatial_shapes[entry * 2..entry * 2 + 2].to_vec();
                // The working memory of one entry serves the next; it goes back after the last.
                let memory = if entry + 1 == n { Memory::Release } else { Memory::Keep };
                feats.extend(self.run_vision(pixels, vec![1; real], shape, [1, real, pd], memory)?);
            }
            feats
        };
        let want = pre.grid.num_image_tokens();
        if feats.len() != want * self.spec.hidden {
            return Err(Error::inference(
                STAGE,
                format!("image_features has {} rows, expected {want}", feats.len() / self.spec.hidden),
            ));
        }
        check_finite(STAGE, &feats)?;
        Ok(feats)
    }

    /// One vision-encoder call on `[entries, patches, patch_dim]` pixels: the features.
    fn run_vision(
        &self,
        pixels: Vec<f32>,
        mask: Vec<i64>,
        shapes: Vec<i64>,
        dims: [usize; 3],
        memory: Memory,
    ) -> Result<Vec<f32>> {
        const STAGE: &str = "vision_encoder";
        let pv = float_value(STAGE, self.spec.vision_float, &dims, pixels)?;
        let mask = i64_value(STAGE, &dims[..2], mask)?;
        let shapes = i64_value(STAGE, &[dims[0], 2], shapes)?;
        let out = self.vision.run(
            STAGE,
            vec![("pixel_values", pv.into()), ("pixel_attention_mask", mask.into()), ("spatial_shapes", shapes.into())],
            memory,
        )?;
        let (shape, feats) = read_floats(STAGE, &out[0].1, None)?;
        if shape.len() != 2 || shape[1] as usize != self.spec.hidden {
            return Err(Error::inference(
                STAGE,
                format!("image_features has shape {shape:?}, expected [tokens, {}]", self.spec.hidden),
            ));
        }
        Ok(feats)
    }

    /// Token embeddings `[ids.len() * hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        const STAGE: &str = "embed_tokens";
        let input = i64_value(STAGE, &[1, ids.len()], ids.iter().map(|&i| i as i64).collect())?;
        let memory = if ids.len() > 1 { Memory::Release } else { Memory::Keep };
        let out = self.embed.run(STAGE, vec![("input_ids", input.into())], memory)?;
        let (shape, emb) = read_floats(STAGE, &out[0].1, None)?;
        if emb.len() != ids.len() * self.spec.hidden {
            return Err(Error::inference(STAGE, format!("inputs_embeds has shape {shape:?} for {} ids", ids.len())));
        }
        check_finite(STAGE, &emb)?;
        Ok(emb)
    }

    /// An empty cache: zero conv states, zero-length key/value tensors.
    pub fn new_cache(&self) -> Result<HybridCache> {
        const STAGE: &str = "decoder";
        let s = &self.spec;
        let layers = s
            .layers
            .iter()
            .map(|k| {
                Ok(match k {
                    LayerKind::Conv => LayerCache::Conv {
                        state: float_value(
                            STAGE,
                            s.conv_float,
                            &[1, s.conv_channels, s.conv_width],
                            vec![0.0; s.conv_channels * s.conv_width],
                        )?,
                    },
                    LayerKind::Attention => LayerCache::Attention {
                        key: float_value(STAGE, s.kv_float, &[1, s.kv_heads, 0, s.head_dim], Vec::new())?,
                        value: float_value(STAGE, s.kv_float, &[1, s.kv_heads, 0, s.head_dim], Vec::new())?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(HybridCache { layers, past_len: 0 })
    }

    /// Runs the decoder: the logits output and the new per-layer cache.
    pub(crate) fn run_decoder(
        &self,
        inputs: Vec<(&str, SessionInputValue<'_>)>,
        memory: Memory,
    ) -> Result<(DynValue, Vec<LayerCache>)> {
        const STAGE: &str = "decoder";
        let outputs = self.decoder.run(STAGE, inputs, memory)?;
        let mut logits = None;
        let mut by_name: std::collections::HashMap<String, DynValue> = std::collections::HashMap::new();
        for (name, v) in outputs {
            if name == "logits" {
                logits = Some(v);
            } else {
                by_name.insert(name, v);
            }
        }
        let logits = logits.ok_or_else(|| Error::inference(STAGE, "no logits"))?;
        let mut take = |name: String| {
            by_name.remove(&name).ok_or_else(|| Error::inference(STAGE, format!("output `{name}` missing")))
        };
        let layers = self
            .spec
            .layers
            .iter()
            .enumerate()
            .map(|(i, kind)| {
                Ok(match kind {
                    LayerKind::Conv => LayerCache::Conv { state: take(present_conv(i))? },
                    LayerKind::Attention => {
                        LayerCache::Attention { key: take(present_kv(i, "key"))?, value: take(present_kv(i, "value"))? }
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((logits, layers))
    }

    /// Runs the decoder through an I/O binding (see `Graph::run_bound`).
    pub(crate) fn run_bound_decoder(
        &self,
        inputs: &[(&str, &DynValue)],
        outputs: Vec<(String, Option<DynValue>)>,
        memory: Memory,
    ) -> Result<Vec<(String, DynValue)>> {
        self.decoder.run_bound("decoder", inputs, outputs, memory)
    }

    /// Runs a prompt (`embeds` is `[positions * hidden]`) into `cache` and returns the
    /// logits after its last position. On GroupQueryAttention decoders, which take new
    /// positions after a cache for one sequence, long prompts go in chunks (`Prefill`):
    /// the same result, with the attention scores of a chunk (not the whole prompt) in
    /// memory.
    pub fn prefill(&self, embeds: Vec<f32>, cache: &mut HybridCache) -> Result<Vec<f32>> {
        self.prefill_until(embeds, cache, &|| false)?
            .ok_or_else(|| Error::Internal("a prefill that cannot stop stopped".into()))
    }

    /// `prefill`, asking `stop` before each chunk of a long prompt: `None` (and `cache`
    /// unusable) once it says yes, so a cancelled request does not wait for its whole
    /// prompt.
    pub fn prefill_until(&self, embeds: Vec<f32>, cache: &mut HybridCache, stop: Stop<'_>) -> Result<Option<Vec<f32>>> {
        let hidden = self.spec.hidden;
        let positions = embeds.len() / hidden;
        if stop() {
            return Ok(None);
        }
        if self.spec.prefill == Prefill::OneRun || positions <= PREFILL_CHUNK {
            return self.decode(embeds, positions, cache).map(Some);
        }
        if self.spec.prefill == Prefill::InPlace && cache.past_len == 0 {
            return self.prefill_in_place(&embeds, PREFILL_CHUNK, cache, stop);
        }
        let mut logits = Vec::new();
        let chunks = positions.div_ceil(PREFILL_CHUNK);
        for (i, part) in embeds.chunks(PREFILL_CHUNK * hidden).enumerate() {
            if i > 0 && stop() {
                return Ok(None);
            }
            // One chunk's working memory serves the next; it goes back after the last.
            let memory = if i + 1 == chunks { Memory::Release } else { Memory::Keep };
            logits = self.run_positions(part.to_vec(), part.len() / hidden, cache, memory)?;
        }
        Ok(Some(logits))
    }

    /// Runs the decoder on `seq` new positions (`embeds` is `[seq * hidden]`), advances
    /// `cache`, and returns the logits of the last position.
    pub fn decode(&self, embeds: Vec<f32>, seq: usize, cache: &mut HybridCache) -> Result<Vec<f32>> {
        // A prompt's working set (attention over it) is not needed by the one-position
        // steps that follow.
        let memory = if seq > 1 { Memory::Release } else { Memory::Keep };
        self.run_positions(embeds, seq, cache, memory)
    }

    fn run_positions(&self, embeds: Vec<f32>, seq: usize, cache: &mut HybridCache, memory: Memory) -> Result<Vec<f32>> {
        const STAGE: &str = "decoder";
        let s = &self.spec;
        let total = cache.past_len + seq;
        let x = float_value(STAGE, s.embeds_float, &[1, seq, s.hidden], embeds)?;
        let mask = i64_value(STAGE, &[1, total], vec![1; total])?;
        let names = cache_input_names(&s.layers);
        let (logits, layers) = self.run_decoder(decoder_inputs(x, mask, &cache.layers, &names), memory)?;
        let row = self.last_logits(&logits, seq)?;
        cache.layers = layers;
        cache.past_len = total;
        Ok(row)
    }

    /// The last position's row of one sequence's logits output for `seq` new positions.
    pub(crate) fn last_logits(&self, logits: &DynValue, seq: usize) -> Result<Vec<f32>> {
        const STAGE: &str = "decoder";
        let vocab = self.spec.vocab;
        // All positions, or only the last one when the LM head was moved behind a slice.
        let rows = float_dims(STAGE, logits)?.get(1).copied().unwrap_or(0).max(0) as usize;
        let (shape, row) = read_floats(STAGE, logits, Some(rows.saturating_sub(1) * vocab..rows * vocab))?;
        if shape.len() != 3 || shape[0] != 1 || !(rows == seq || rows == 1) || shape[2] as usize != vocab {
            return Err(Error::inference(STAGE, format!("logits have shape {shape:?}, expected [1, {seq}, {vocab}]")));
        }
        check_finite(STAGE, &row)?;
        Ok(row)
    }
}

/// Largest absolute difference between `a` and `b`, relative to `a`'s largest magnitude
/// (at least 1).
pub(crate) fn relative_difference(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
}
