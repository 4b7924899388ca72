//! Decoder steps for several sequences at once.
//!
//! Rows are right-padded: the key/value tensors of all rows share one padded width, and
//! each row's attention-mask row has ones for its own past plus the new position. That
//! is exact for graphs whose attention takes each row's length from its mask row
//! (ONNX Runtime's GroupQueryAttention, as the official export uses); graphs that derive
//! positions from the cache width are not batched (see `BatchSemantics`).

use crate::error::{Error, Result};

use ort::value::DynValue;

use super::model::{HybridCache, LayerCache, LayerKind, Model};
use super::tensor::{FloatType, float_value, i64_value, read_floats};

/// How a decoder graph places a row's new token: this decides how rows may be batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSemantics {
    /// Attention reads each row's length from its mask row (GroupQueryAttention):
    /// right-padded rows of different lengths batch exactly.
    MaskLengths,
    /// Positions come from the cache width, the same for every row: only rows of equal
    /// length batch exactly, so the engine decodes sequences one at a time.
    CacheWidth,
}

/// The per-layer caches of a batch of sequences, right-padded to `width` positions.
pub struct BatchCache {
    layers: Vec<LayerCache>,
    /// Valid positions of each row.
    pub lens: Vec<usize>,
    /// Positions allocated per row: the longest row when every step returns new tensors;
    /// more, with room to grow, when the decoder updates the cache in place.
    width: usize,
}

/// Positions added beyond the longest row when a cache updated in place is (re)allocated:
/// it is copied once per this many steps instead of every step.
const IN_PLACE_HEADROOM: usize = 128;

impl BatchCache {
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }
}

const STAGE: &str = "decoder";

/// One row of a batch being built: the tensor it is copied from, which row of it, how
/// many positions that tensor holds per row, and how many of them are valid.
struct Part<'a> {
    src: &'a DynValue,
    row: usize,
    src_width: usize,
    len: usize,
}

/// Copies `parts` into a new tensor of `shape` (`[rows, heads, width, head_dim]`, or
/// `[rows, channels, width]` seen as one head of `channels * width` positions of size 1),
/// each row's valid positions first, zeros after. Elements stay in the graph's type.
fn gather<T>(parts: &[Part<'_>], heads: usize, dim: usize, width: usize, shape: Vec<i64>) -> Result<DynValue>
where
    T: ort::value::PrimitiveTensorElementType + Copy + Default + std::fmt::Debug + 'static,
{
    let mut out = vec![T::default(); parts.len() * heads * width * dim];
    for (r, p) in parts.iter().enumerate() {
        let (_, src) = p.src.try_extract_tensor::<T>().map_err(|e| Error::inference(STAGE, e))?;
        for h in 0..heads {
            let from = (p.row * heads + h) * p.src_width * dim;
            let to = (r * heads + h) * width * dim;
            let n = p.len * dim;
            let row = src
                .get(from..from + n)
                .ok_or_else(|| Error::Internal(format!("cache row {} is shorter than {} positions", p.row, p.len)))?;
            out[to..to + n].copy_from_slice(row);
        }
    }
    Ok(ort::value::Tensor::from_array((shape, out)).map_err(|e| Error::inference(STAGE, e))?.into_dyn())
}

/// Where a row of a new batch comes from.
enum Source<'a> {
    /// Row `r` of the current batch.
    Row(usize),
    /// A sequence's own cache.
    Alone(&'a HybridCache),
}

impl Model {
    /// Positions to allocate for rows of `lens`, with `extra` more needed right away.
    fn width_for(&self, lens: &[usize], extra: usize) -> usize {
        let longest = lens.iter().copied().max().unwrap_or(0) + extra;
        if self.spec.kv_in_place { longest + IN_PLACE_HEADROOM } else { longest }
    }

    /// A new batch of `width` positions per row whose rows are copied from `sources`
    /// (rows of `batch`, or single caches), straight from tensor to tensor.
    fn regather<'a>(&self, batch: &'a BatchCache, sources: &[Source<'a>], width: usize) -> Result<BatchCache> {
        let s = &self.spec;
        let lens: Vec<usize> = sources
            .iter()
            .map(|src| match src {
                Source::Row(r) => batch.lens[*r],
                Source::Alone(c) => c.past_len,
            })
            .collect();
        let b = sources.len() as i64;
        fn layer<'a>(batch: &'a BatchCache, src: &Source<'a>, li: usize) -> &'a LayerCache {
            match src {
                Source::Row(_) => &batch.layers[li],
                Source::Alone(c) => &c.layers[li],
            }
        }
        let layer_of = |src: &Source<'a>, li: usize| layer(batch, src, li);
        let mut layers = Vec::with_capacity(s.layers.len());
        for (li, kind) in s.layers.iter().enumerate() {
            match kind {
                LayerKind::Conv => {
                    let n = s.conv_channels * s.conv_width;
                    let parts = sources
                        .iter()
                        .map(|src| match layer_of(src, li) {
                            LayerCache::Conv { state } => {
                                let row = if let Source::Row(r) = src { *r } else { 0 };
                                Ok(Part { src: state, row, src_width: n, len: n })
                            }
                            LayerCache::Attention { .. } => Err(Error::Internal(format!("layer {li} is not conv"))),
                        })
                        .collect::<Result<Vec<_>>>()?;
                    let shape = vec![b, s.conv_channels as i64, s.conv_width as i64];
                    let state = match s.conv_float {
                        FloatType::F32 => gather::<f32>(&parts, 1, 1, n, shape)?,
                        FloatType::F16 => gather::<half::f16>(&parts, 1, 1, n, shape)?,
                    };
                    layers.push(LayerCache::Conv { state });
                }
                LayerKind::Attention => {
                    let pick = |value: bool| -> Result<DynValue> {
                        let parts = sources
                            .iter()
                            .zip(&lens)
                            .map(|(src, &len)| match layer_of(src, li) {
                                LayerCache::Attention { key, value: v } => {
                                    let (row, src_width) = match src {
                                        Source::Row(r) => (*r, batch.width),
                                        Source::Alone(c) => (0, c.past_len),
                                    };
                                    Ok(Part { src: if value { v } else { key }, row, src_width, len })
                                }
                                LayerCache::Conv { .. } => Err(Error::Internal(format!("layer {li} is not attention"))),
                            })
                            .collect::<Result<Vec<_>>>()?;
                        let (h, d) = (s.kv_heads, s.head_dim);
                        let shape = vec![b, h as i64, width as i64, d as i64];
                        match s.kv_float {
                            FloatType::F32 => gather::<f32>(&parts, h, d, width, shape),
                            FloatType::F16 => gather::<half::f16>(&parts, h, d, width, shape),
                        }
                    };
                    let (key, value) = (pick(false)?, pick(true)?);
                    layers.push(LayerCache::Attention { key, value });
                }
            }
        }
        Ok(BatchCache { layers, lens, width })
    }

    /// An empty batch.
    pub fn batch_new(&self) -> BatchCache {
        BatchCache { layers: Vec::new(), lens: Vec::new(), width: 0 }
    }

    /// Adds a prefilled sequence as the last row.
    pub fn batch_join(&self, batch: &mut BatchCache, cache: HybridCache) -> Result<()> {
        let mut sources: Vec<Source<'_>> = (0..batch.len()).map(Source::Row).collect();
        sources.push(Source::Alone(&cache));
        let mut lens = batch.lens.clone();
        lens.push(cache.past_len);
        let width = self.width_for(&lens, 0);
        *batch = self.regather(batch, &sources, width)?;
        Ok(())
    }

    /// Removes the rows at `remove` (sorted or not); the width shrinks to fit the longest left.
    pub fn batch_remove(&self, batch: &mut BatchCache, remove: &[usize]) -> Result<()> {
        if remove.is_empty() {
            return Ok(());
        }
        let keep: Vec<usize> = (0..batch.len()).filter(|i| !remove.contains(i)).collect();
        *batch = if keep.is_empty() {
            self.batch_new()
        } else {
            let lens: Vec<usize> = keep.iter().map(|&r| batch.lens[r]).collect();
            let sources: Vec<Source<'_>> = keep.into_iter().map(Source::Row).collect();
            self.regather(batch, &sources, self.width_for(&lens, 0))?
        };
        Ok(())
    }

    /// Row `r` as a sequence cache of its own.
    pub fn batch_row(&self, batch: &BatchCache, r: usize) -> Result<HybridCache> {
        let len = *batch.lens.get(r).ok_or_else(|| Error::Internal(format!("no batch row {r}")))?;
        let one = self.regather(batch, &[Source::Row(r)], len)?;
        Ok(HybridCache { layers: one.layers, past_len: len })
    }

    /// One decoder step for every row: `ids[r]` is row r's new token embedding input
    /// (`embeds` is `[rows * hidden]`). Returns each row's logits.
    pub fn decode_batch(&self, embeds: Vec<f32>, batch: &mut BatchCache) -> Result<Vec<Vec<f32>>> {
        let s = &self.spec;
        let b = batch.len();
        let total = batch.lens.iter().copied().max().unwrap_or(0) + 1;
        if s.kv_in_place && total > batch.width {
            let sources: Vec<Source<'_>> = (0..b).map(Source::Row).collect();
            *batch = self.regather(batch, &sources, self.width_for(&batch.lens, 1))?;
        }
        let x = float_value(STAGE, s.embeds_float, &[b, 1, s.hidden], embeds)?;
        let mut mask = vec![0i64; b * total];
        for (r, &len) in batch.lens.iter().enumerate() {
            mask[r * total..r * total + len + 1].fill(1);
        }
        let mask = i64_value(STAGE, &[b, total], mask)?;
        let logits = if s.kv_in_place {
            self.decode_in_place(x, mask, batch)?
        } else {
            let names = super::model::cache_input_names(&s.layers);
            let (logits, presents) = self.run_decoder(super::model::decoder_inputs(x, mask, &batch.layers, &names))?;
            batch.layers = presents;
            batch.width = total;
            logits
        };
        let (shape, all) = read_floats(STAGE, &logits, None)?;
        if shape.len() != 3 || shape[0] as usize != b || shape[2] as usize != s.vocab {
            return Err(Error::inference(
                STAGE,
                format!("logits have shape {shape:?}, expected [{b}, 1, {}]", s.vocab),
            ));
        }
        let per_row = shape[1] as usize * s.vocab;
        let rows: Vec<Vec<f32>> =
            (0..b).map(|r| all[(r + 1) * per_row - s.vocab..(r + 1) * per_row].to_vec()).collect();
        for row in &rows {
            super::tensor::check_finite(STAGE, row)?;
        }
        for len in &mut batch.lens {
            *len += 1;
        }
        Ok(rows)
    }

    /// A decoder step whose key/value outputs are bound to the key/value inputs, so the
    /// attention writes each row's new position into the batch's own buffers. Returns the
    /// logits; the conv states are replaced by the step's.
    fn decode_in_place(&self, x: DynValue, mask: DynValue, batch: &mut BatchCache) -> Result<DynValue> {
        let names = super::model::cache_input_names(&self.spec.layers);
        let mut outputs: Vec<(String, Option<DynValue>)> = vec![("logits".to_string(), None)];
        let mut inputs: Vec<(&str, &DynValue)> = vec![("inputs_embeds", &x), ("attention_mask", &mask)];
        let mut name = names.iter();
        for layer in &mut batch.layers {
            match layer {
                LayerCache::Conv { state } => {
                    let past = name.next().map_or("", String::as_str);
                    outputs.push((past.replacen("past_conv", "present_conv", 1), None));
                    inputs.push((past, state));
                }
                LayerCache::Attention { key, value } => {
                    for tensor in [key, value] {
                        let past = name.next().map_or("", String::as_str);
                        outputs.push((past.replacen("past_key_values", "present", 1), Some(shared(tensor)?)));
                        inputs.push((past, tensor));
                    }
                }
            }
        }
        let mut out = self.run_bound_decoder(&inputs, outputs)?.into_iter();
        let logits = out.next().map(|(_, v)| v).ok_or_else(|| Error::inference(STAGE, "no logits"))?;
        let mut convs = out.filter(|(n, _)| n.starts_with("present_conv"));
        for layer in &mut batch.layers {
            if let LayerCache::Conv { state } = layer {
                *state = convs.next().map(|(_, v)| v).ok_or_else(|| Error::inference(STAGE, "conv state missing"))?;
            }
        }
        Ok(logits)
    }
}

/// A second handle on the same ONNX Runtime tensor (no copy), to bind it as an output.
fn shared(value: &mut DynValue) -> Result<DynValue> {
    value.view_mut().try_upgrade().map_err(|_| Error::Internal("cache tensor cannot be shared".into()))
}
