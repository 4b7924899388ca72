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
use super::tensor::{float_value, i64_value, read_floats};

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

/// One row of one layer, trimmed to its valid positions: conv `[C, K]`, or key and value
/// `[H, len, D]` each.
enum RowLayer {
    Conv(Vec<f32>),
    Attention(Vec<f32>, Vec<f32>),
}

const STAGE: &str = "decoder";

impl Model {
    /// Splits batched layers (rows of `lens` valid positions, padded to `width`) into
    /// trimmed rows.
    fn rows_of(&self, layers: &[LayerCache], lens: &[usize], width: usize) -> Result<Vec<Vec<RowLayer>>> {
        let s = &self.spec;
        let b = lens.len();
        let mut rows: Vec<Vec<RowLayer>> = (0..b).map(|_| Vec::with_capacity(s.layers.len())).collect();
        for layer in layers {
            match layer {
                LayerCache::Conv { state } => {
                    let (_, data) = read_floats(STAGE, state, None)?;
                    let n = s.conv_channels * s.conv_width;
                    for (r, row) in rows.iter_mut().enumerate() {
                        row.push(RowLayer::Conv(data[r * n..(r + 1) * n].to_vec()));
                    }
                }
                LayerCache::Attention { key, value } => {
                    let (_, k) = read_floats(STAGE, key, None)?;
                    let (_, v) = read_floats(STAGE, value, None)?;
                    let (h, d, w) = (s.kv_heads, s.head_dim, width);
                    for (r, row) in rows.iter_mut().enumerate() {
                        let len = lens[r];
                        let trim = |src: &[f32]| {
                            let mut out = Vec::with_capacity(h * len * d);
                            for hh in 0..h {
                                let base = (r * h + hh) * w * d;
                                out.extend_from_slice(&src[base..base + len * d]);
                            }
                            out
                        };
                        row.push(RowLayer::Attention(trim(&k), trim(&v)));
                    }
                }
            }
        }
        Ok(rows)
    }

    /// Positions to allocate for rows of `lens`, with `extra` more needed right away.
    fn width_for(&self, lens: &[usize], extra: usize) -> usize {
        let longest = lens.iter().copied().max().unwrap_or(0) + extra;
        if self.spec.kv_in_place { longest + IN_PLACE_HEADROOM } else { longest }
    }

    /// Builds a batch of `width` positions per row from trimmed rows with their lengths.
    fn assemble(&self, rows: Vec<Vec<RowLayer>>, lens: Vec<usize>, width: usize) -> Result<BatchCache> {
        let s = &self.spec;
        let b = rows.len();
        let mut layers = Vec::with_capacity(s.layers.len());
        for (li, kind) in s.layers.iter().enumerate() {
            match kind {
                LayerKind::Conv => {
                    let mut data = Vec::with_capacity(b * s.conv_channels * s.conv_width);
                    for row in &rows {
                        if let RowLayer::Conv(c) = &row[li] {
                            data.extend_from_slice(c);
                        }
                    }
                    let state = float_value(STAGE, s.conv_float, &[b, s.conv_channels, s.conv_width], data)?;
                    layers.push(LayerCache::Conv { state });
                }
                LayerKind::Attention => {
                    let (h, d) = (s.kv_heads, s.head_dim);
                    let mut kd = vec![0f32; b * h * width * d];
                    let mut vd = vec![0f32; b * h * width * d];
                    for (r, row) in rows.iter().enumerate() {
                        if let RowLayer::Attention(k, v) = &row[li] {
                            let len = lens[r];
                            for hh in 0..h {
                                let dst = (r * h + hh) * width * d;
                                let src = hh * len * d;
                                kd[dst..dst + len * d].copy_from_slice(&k[src..src + len * d]);
                                vd[dst..dst + len * d].copy_from_slice(&v[src..src + len * d]);
                            }
                        }
                    }
                    layers.push(LayerCache::Attention {
                        key: float_value(STAGE, s.kv_float, &[b, h, width, d], kd)?,
                        value: float_value(STAGE, s.kv_float, &[b, h, width, d], vd)?,
                    });
                }
            }
        }
        Ok(BatchCache { layers, lens, width })
    }

    fn batch_rows(&self, batch: &BatchCache) -> Result<Vec<Vec<RowLayer>>> {
        self.rows_of(&batch.layers, &batch.lens, batch.width)
    }

    fn single_rows(&self, cache: &HybridCache) -> Result<Vec<RowLayer>> {
        Ok(self.rows_of(&cache.layers, &[cache.past_len], cache.past_len)?.pop().unwrap_or_default())
    }

    /// An empty batch.
    pub fn batch_new(&self) -> BatchCache {
        BatchCache { layers: Vec::new(), lens: Vec::new(), width: 0 }
    }

    /// Adds a prefilled sequence as the last row.
    pub fn batch_join(&self, batch: &mut BatchCache, cache: HybridCache) -> Result<()> {
        let mut rows = if batch.is_empty() { Vec::new() } else { self.batch_rows(batch)? };
        rows.push(self.single_rows(&cache)?);
        let mut lens = std::mem::take(&mut batch.lens);
        lens.push(cache.past_len);
        let width = self.width_for(&lens, 0);
        *batch = self.assemble(rows, lens, width)?;
        Ok(())
    }

    /// Removes the rows at `remove` (sorted or not); the width shrinks to the longest left.
    pub fn batch_remove(&self, batch: &mut BatchCache, remove: &[usize]) -> Result<()> {
        if remove.is_empty() {
            return Ok(());
        }
        let rows = self.batch_rows(batch)?;
        let (rows, lens): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .zip(batch.lens.iter().copied())
            .enumerate()
            .filter(|(i, _)| !remove.contains(i))
            .map(|(_, x)| x)
            .unzip();
        *batch = if rows.is_empty() {
            self.batch_new()
        } else {
            let width = self.width_for(&lens, 0);
            self.assemble(rows, lens, width)?
        };
        Ok(())
    }

    /// Row `r` as a sequence cache of its own.
    pub fn batch_row(&self, batch: &BatchCache, r: usize) -> Result<HybridCache> {
        let rows = self.batch_rows(batch)?;
        let row = rows.into_iter().nth(r).ok_or_else(|| Error::Internal(format!("no batch row {r}")))?;
        let one = self.assemble(vec![row], vec![batch.lens[r]], batch.lens[r])?;
        Ok(HybridCache { layers: one.layers, past_len: batch.lens[r] })
    }

    /// One decoder step for every row: `ids[r]` is row r's new token embedding input
    /// (`embeds` is `[rows * hidden]`). Returns each row's logits.
    pub fn decode_batch(&self, embeds: Vec<f32>, batch: &mut BatchCache) -> Result<Vec<Vec<f32>>> {
        let s = &self.spec;
        let b = batch.len();
        let total = batch.lens.iter().copied().max().unwrap_or(0) + 1;
        if s.kv_in_place && total > batch.width {
            let rows = self.batch_rows(batch)?;
            let lens = std::mem::take(&mut batch.lens);
            let width = self.width_for(&lens, 1);
            *batch = self.assemble(rows, lens, width)?;
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
