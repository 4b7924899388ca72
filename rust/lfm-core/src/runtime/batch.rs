//! Decoder steps for several sequences at once.
//!
//! Rows are right-padded: the key/value tensors of all rows share one padded width, and
//! each row's attention-mask row has ones for its own past plus the new position. That
//! is exact for graphs whose attention takes each row's length from its mask row
//! (ONNX Runtime's GroupQueryAttention, as the official export uses); graphs that derive
//! positions from the cache width are not batched (see `BatchSemantics`).

use crate::error::{Error, Result};

use ort::value::DynValue;

use super::graph::Memory;
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
///
/// Sequences ("rows", in the scheduler's order) live in tensor rows ("slots"). When the
/// decoder updates the cache in place, the tensors hold a power of two of slots: a
/// sequence joins by copying its own cache into a free slot and leaves by freeing its
/// slot, so the whole batch is copied only when it outgrows its slots or width. Free
/// slots run along as one-position rows whose outputs are ignored (the attention reads
/// each row's length from its mask row). Otherwise slot `i` is row `i`.
pub struct BatchCache {
    layers: Vec<LayerCache>,
    /// Valid positions of each row.
    pub lens: Vec<usize>,
    /// The tensor row of each row.
    slots: Vec<usize>,
    /// Tensor rows (slots) the layers hold.
    capacity: usize,
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

    /// Tensor rows (slots) the layers hold: the batch is rebuilt when this changes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions allocated per row.
    pub fn width(&self) -> usize {
        self.width
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

/// Copies `parts` into the first rows of a new tensor of `shape` (`[rows, heads, width,
/// head_dim]`, or `[rows, channels, width]` seen as one head of `channels * width`
/// positions of size 1), each row's valid positions first, zeros after and in the rows
/// beyond the parts. Elements stay in the graph's type.
fn gather<T>(parts: &[Part<'_>], heads: usize, dim: usize, width: usize, shape: Vec<i64>) -> Result<DynValue>
where
    T: ort::value::PrimitiveTensorElementType + Copy + Default + std::fmt::Debug + 'static,
{
    let rows = shape.first().map_or(0, |&r| r as usize);
    let mut out = vec![T::default(); rows * heads * width * dim];
    for (r, p) in parts.iter().enumerate() {
        copy_row(p, &mut out, r, heads, dim, width)?;
    }
    Ok(ort::value::Tensor::from_array((shape, out)).map_err(|e| Error::inference(STAGE, e))?.into_dyn())
}

/// Copies part `p` into row `r` of `out` (laid out as in `gather`).
fn copy_row<T>(p: &Part<'_>, out: &mut [T], r: usize, heads: usize, dim: usize, width: usize) -> Result<()>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let (_, src) = p.src.try_extract_tensor::<T>().map_err(|e| Error::inference(STAGE, e))?;
    for h in 0..heads {
        let from = (p.row * heads + h) * p.src_width * dim;
        let to = (r * heads + h) * width * dim;
        let n = p.len * dim;
        let row = src
            .get(from..from + n)
            .ok_or_else(|| Error::Internal(format!("cache row {} is shorter than {} positions", p.row, p.len)))?;
        out.get_mut(to..to + n)
            .ok_or_else(|| Error::Internal(format!("cache slot {r} is out of range")))?
            .copy_from_slice(row);
    }
    Ok(())
}

/// Copies part `p` into slot `r` of the existing tensor `dst` (laid out as in `gather`).
fn copy_into<T>(p: &Part<'_>, dst: &mut DynValue, r: usize, heads: usize, dim: usize, width: usize) -> Result<()>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let (_, out) = dst.try_extract_tensor_mut::<T>().map_err(|e| Error::inference(STAGE, e))?;
    copy_row(p, out, r, heads, dim, width)
}

/// Releases the pages of elements `[row * per_row, (row + 1) * per_row)` of `tensor`.
fn release_row<T>(tensor: &mut DynValue, row: usize, per_row: usize) -> Result<()>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let (_, data) = tensor.try_extract_tensor_mut::<T>().map_err(|e| Error::inference(STAGE, e))?;
    if let Some(range) = data.get_mut(row * per_row..(row + 1) * per_row) {
        crate::heap::release_pages(range);
    }
    Ok(())
}

/// One row of one layer of a new batch: the layer it is copied from, its row there, the
/// positions that layer holds per row, and the valid ones.
struct Rowed<'a> {
    layer: &'a LayerCache,
    row: usize,
    src_width: usize,
    len: usize,
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

    /// Tensor rows for `rows` sequences: a power of two when sequences join and leave
    /// through free slots (in-place caches), else exactly one per sequence.
    fn capacity_for(&self, rows: usize) -> usize {
        if self.spec.kv_in_place { rows.next_power_of_two() } else { rows }
    }

    /// One layer of a new batch of `capacity` rows of `width` positions, its first rows
    /// copied from `from`.
    fn gather_layer(&self, li: usize, from: &[Rowed<'_>], width: usize, capacity: usize) -> Result<LayerCache> {
        let s = &self.spec;
        let b = capacity as i64;
        let wrong = |kind: &str| Error::Internal(format!("layer {li} of a cache is not {kind}"));
        Ok(match s.layers[li] {
            LayerKind::Conv => {
                let n = s.conv_channels * s.conv_width;
                let parts = from
                    .iter()
                    .map(|f| match f.layer {
                        LayerCache::Conv { state } => Ok(Part { src: state, row: f.row, src_width: n, len: n }),
                        LayerCache::Attention { .. } => Err(wrong("conv")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let shape = vec![b, s.conv_channels as i64, s.conv_width as i64];
                let state = match s.conv_float {
                    FloatType::F32 => gather::<f32>(&parts, 1, 1, n, shape)?,
                    FloatType::F16 => gather::<half::f16>(&parts, 1, 1, n, shape)?,
                };
                LayerCache::Conv { state }
            }
            LayerKind::Attention => {
                let pick = |value: bool| -> Result<DynValue> {
                    let parts = from
                        .iter()
                        .map(|f| match f.layer {
                            LayerCache::Attention { key, value: v } => Ok(Part {
                                src: if value { v } else { key },
                                row: f.row,
                                src_width: f.src_width,
                                len: f.len,
                            }),
                            LayerCache::Conv { .. } => Err(wrong("attention")),
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
                LayerCache::Attention { key, value }
            }
        })
    }

    /// Copies a sequence's own cache into free slot `slot` of `batch` (no other row moves).
    fn fill_slot(&self, batch: &mut BatchCache, slot: usize, cache: &HybridCache) -> Result<()> {
        let s = &self.spec;
        let (width, len) = (batch.width, cache.past_len);
        for (li, (layer, own)) in batch.layers.iter_mut().zip(&cache.layers).enumerate() {
            let wrong = || Error::Internal(format!("layer {li} of a cache has the wrong kind"));
            match (layer, own) {
                (LayerCache::Conv { state }, LayerCache::Conv { state: src }) => {
                    let n = s.conv_channels * s.conv_width;
                    let part = Part { src, row: 0, src_width: n, len: n };
                    match s.conv_float {
                        FloatType::F32 => copy_into::<f32>(&part, state, slot, 1, 1, n)?,
                        FloatType::F16 => copy_into::<half::f16>(&part, state, slot, 1, 1, n)?,
                    }
                }
                (LayerCache::Attention { key, value }, LayerCache::Attention { key: k, value: v }) => {
                    for (dst, src) in [(key, k), (value, v)] {
                        let part = Part { src, row: 0, src_width: len, len };
                        let (h, d) = (s.kv_heads, s.head_dim);
                        match s.kv_float {
                            FloatType::F32 => copy_into::<f32>(&part, dst, slot, h, d, width)?,
                            FloatType::F16 => copy_into::<half::f16>(&part, dst, slot, h, d, width)?,
                        }
                    }
                }
                _ => return Err(wrong()),
            }
        }
        Ok(())
    }

    /// Hands the memory of a freed slot's keys and values back to the system (the pages
    /// read as zeros until a sequence fills the slot again), so a long sequence that left
    /// does not keep its share of the batch resident.
    fn release_slot(&self, batch: &mut BatchCache, slot: usize) -> Result<()> {
        let per_slot = self.spec.kv_heads * batch.width * self.spec.head_dim;
        for layer in &mut batch.layers {
            if let LayerCache::Attention { key, value } = layer {
                for tensor in [key, value] {
                    match self.spec.kv_float {
                        FloatType::F32 => release_row::<f32>(tensor, slot, per_slot)?,
                        FloatType::F16 => release_row::<half::f16>(tensor, slot, per_slot)?,
                    }
                }
            }
        }
        Ok(())
    }

    /// Rebuilds `batch` with `width` positions per row and its rows copied from `sources`
    /// (its own rows, or single caches) into slots `0..`, tensor to tensor. It goes layer
    /// by layer and drops each old layer once its replacement exists, so at most one layer
    /// is held twice, not the whole cache. On an error the batch is left empty of layers
    /// (the caller fails its sequences).
    fn regather(&self, batch: &mut BatchCache, sources: &[Source<'_>], width: usize) -> Result<()> {
        let lens: Vec<usize> = sources
            .iter()
            .map(|src| match src {
                Source::Row(r) => batch.lens[*r],
                Source::Alone(c) => c.past_len,
            })
            .collect();
        let old_width = batch.width;
        let old_slots = std::mem::take(&mut batch.slots);
        let capacity = self.capacity_for(sources.len());
        let mut old_layers = std::mem::take(&mut batch.layers).into_iter();
        let mut layers = Vec::with_capacity(self.spec.layers.len());
        for li in 0..self.spec.layers.len() {
            let old = old_layers.next();
            let from = sources
                .iter()
                .zip(&lens)
                .map(|(src, &len)| match src {
                    Source::Row(r) => old
                        .as_ref()
                        .zip(old_slots.get(*r))
                        .map(|(layer, &row)| Rowed { layer, row, src_width: old_width, len })
                        .ok_or_else(|| Error::Internal("the batch has fewer layers or rows than expected".into())),
                    Source::Alone(c) => Ok(Rowed { layer: &c.layers[li], row: 0, src_width: c.past_len, len }),
                })
                .collect::<Result<Vec<_>>>()?;
            layers.push(self.gather_layer(li, &from, width, capacity)?);
        }
        let slots = (0..lens.len()).collect();
        *batch = BatchCache { layers, lens, slots, capacity, width };
        Ok(())
    }

    /// An empty batch.
    pub fn batch_new(&self) -> BatchCache {
        BatchCache { layers: Vec::new(), lens: Vec::new(), slots: Vec::new(), capacity: 0, width: 0 }
    }

    /// Adds a prefilled sequence as the last row: into a free slot when there is one and
    /// its cache fits the width, else by rebuilding the batch.
    pub fn batch_join(&self, batch: &mut BatchCache, cache: HybridCache) -> Result<()> {
        let free = (0..batch.capacity).find(|s| !batch.slots.contains(s));
        if let Some(slot) = free
            && self.spec.kv_in_place
            && cache.past_len < batch.width
        {
            self.fill_slot(batch, slot, &cache)?;
            batch.lens.push(cache.past_len);
            batch.slots.push(slot);
            return Ok(());
        }
        let mut sources: Vec<Source<'_>> = (0..batch.len()).map(Source::Row).collect();
        sources.push(Source::Alone(&cache));
        let mut lens = batch.lens.clone();
        lens.push(cache.past_len);
        let width = self.width_for(&lens, 0);
        self.regather(batch, &sources, width)
    }

    /// Removes the rows at `remove` (sorted or not). In-place caches just free their slots,
    /// unless three quarters of the slots or half the width would then be unused: the
    /// batch is rebuilt to fit, as it always is for caches that are not updated in place.
    pub fn batch_remove(&self, batch: &mut BatchCache, remove: &[usize]) -> Result<()> {
        if remove.is_empty() {
            return Ok(());
        }
        let keep: Vec<usize> = (0..batch.len()).filter(|i| !remove.contains(i)).collect();
        if keep.is_empty() {
            *batch = self.batch_new();
            return Ok(());
        }
        let freed: Vec<usize> = remove.iter().filter_map(|&r| batch.slots.get(r).copied()).collect();
        batch.lens = keep.iter().map(|&r| batch.lens[r]).collect();
        batch.slots = keep.iter().map(|&r| batch.slots[r]).collect();
        let width = self.width_for(&batch.lens, 0);
        let roomy = batch.len() * 4 > batch.capacity && width * 2 > batch.width;
        if self.spec.kv_in_place && roomy {
            for slot in freed {
                self.release_slot(batch, slot)?;
            }
            return Ok(());
        }
        let sources: Vec<Source<'_>> = (0..batch.len()).map(Source::Row).collect();
        self.regather(batch, &sources, width)
    }

    /// Row `r` as a sequence cache of its own.
    pub fn batch_row(&self, batch: &BatchCache, r: usize) -> Result<HybridCache> {
        let len = *batch.lens.get(r).ok_or_else(|| Error::Internal(format!("no batch row {r}")))?;
        let layers = (0..self.spec.layers.len())
            .map(|li| {
                let row = Rowed { layer: &batch.layers[li], row: batch.slots[r], src_width: batch.width, len };
                self.gather_layer(li, &[row], len, 1)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(HybridCache { layers, past_len: len })
    }

    /// One decoder step for every row: `ids[r]` is row r's new token embedding input
    /// (`embeds` is `[rows * hidden]`). Returns each row's logits, unchecked: a row's
    /// non-finite logits are that row's failure, for the caller to handle alone.
    pub fn decode_batch(&self, embeds: Vec<f32>, batch: &mut BatchCache) -> Result<Vec<Vec<f32>>> {
        let s = &self.spec;
        let b = batch.len();
        let total = batch.lens.iter().copied().max().unwrap_or(0) + 1;
        if s.kv_in_place && total > batch.width {
            let sources: Vec<Source<'_>> = (0..b).map(Source::Row).collect();
            let width = self.width_for(&batch.lens, 1);
            self.regather(batch, &sources, width)?;
        }
        // Inputs by slot; a free slot is a one-position row of zeros.
        let slots = batch.capacity;
        let mut x = vec![0f32; slots * s.hidden];
        let mut mask = vec![0i64; slots * total];
        for slot in 0..slots {
            mask[slot * total] = 1;
        }
        for (r, (&len, &slot)) in batch.lens.iter().zip(&batch.slots).enumerate() {
            x[slot * s.hidden..(slot + 1) * s.hidden].copy_from_slice(&embeds[r * s.hidden..(r + 1) * s.hidden]);
            mask[slot * total..slot * total + len + 1].fill(1);
        }
        let x = float_value(STAGE, s.embeds_float, &[slots, 1, s.hidden], x)?;
        let mask = i64_value(STAGE, &[slots, total], mask)?;
        let logits = if s.kv_in_place {
            self.decode_in_place(x, mask, batch, Memory::Keep)?
        } else {
            let names = super::model::cache_input_names(&s.layers);
            let (logits, presents) =
                self.run_decoder(super::model::decoder_inputs(x, mask, &batch.layers, &names), Memory::Keep)?;
            batch.layers = presents;
            batch.width = total;
            logits
        };
        let (shape, all) = read_floats(STAGE, &logits, None)?;
        if shape.len() != 3 || shape[0] as usize != slots || shape[2] as usize != s.vocab {
            return Err(Error::inference(
                STAGE,
                format!("logits have shape {shape:?}, expected [{slots}, 1, {}]", s.vocab),
            ));
        }
        let per_row = shape[1] as usize * s.vocab;
        let rows: Vec<Vec<f32>> = batch
            .slots
            .iter()
            .map(|&slot| all[(slot + 1) * per_row - s.vocab..(slot + 1) * per_row].to_vec())
            .collect();
        for len in &mut batch.lens {
            *len += 1;
        }
        Ok(rows)
    }

    /// Prefills `embeds` (`[positions * hidden]`) into the fresh `cache` in chunks of
    /// `chunk` positions, through key/value tensors as wide as the whole prompt that the
    /// attention fills in place: no chunk copies the keys and values before it, and the
    /// prompt's are never held twice. Returns the last position's logits, or `None` when
    /// `stop` says so before a chunk after the first (`cache` is then unusable).
    pub(super) fn prefill_in_place(
        &self,
        embeds: &[f32],
        chunk: usize,
        cache: &mut HybridCache,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<Vec<f32>>> {
        let s = &self.spec;
        let positions = embeds.len() / s.hidden;
        if cache.past_len != 0 || positions == 0 {
            return Err(Error::Internal("in-place prefill needs a fresh cache and a prompt".into()));
        }
        let kv = || {
            float_value(
                STAGE,
                s.kv_float,
                &[1, s.kv_heads, positions, s.head_dim],
                vec![0.0; s.kv_heads * positions * s.head_dim],
            )
        };
        let layers = std::mem::take(&mut cache.layers)
            .into_iter()
            .map(|layer| {
                Ok(match layer {
                    LayerCache::Attention { .. } => LayerCache::Attention { key: kv()?, value: kv()? },
                    conv => conv,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut one = BatchCache { layers, lens: vec![0], slots: vec![0], capacity: 1, width: positions };
        let mut logits = Vec::new();
        let mut done = 0;
        for part in embeds.chunks(chunk * s.hidden) {
            if done > 0 && stop() {
                return Ok(None);
            }
            let seq = part.len() / s.hidden;
            let x = float_value(STAGE, s.embeds_float, &[1, seq, s.hidden], part.to_vec())?;
            let mask = i64_value(STAGE, &[1, done + seq], vec![1; done + seq])?;
            done += seq;
            // One chunk's working memory serves the next; it goes back after the last.
            let memory = if done == positions { Memory::Release } else { Memory::Keep };
            logits = self.last_logits(&self.decode_in_place(x, mask, &mut one, memory)?, seq)?;
        }
        cache.layers = one.layers;
        cache.past_len = positions;
        Ok(Some(logits))
    }

    /// A decoder step whose key/value outputs are bound to the key/value inputs, so the
    /// attention writes each row's new position into the batch's own buffers. Returns the
    /// logits; the conv states are replaced by the step's.
    fn decode_in_place(&self, x: DynValue, mask: DynValue, batch: &mut BatchCache, memory: Memory) -> Result<DynValue> {
        let names: Vec<(String, String)> =
            (self.spec.layers.iter().enumerate()).flat_map(|(i, &kind)| super::model::cache_names(i, kind)).collect();
        let mut outputs: Vec<(String, Option<DynValue>)> = vec![("logits".to_string(), None)];
        let mut inputs: Vec<(&str, &DynValue)> = vec![("inputs_embeds", &x), ("attention_mask", &mask)];
        let mut name = names.iter();
        let mut next_name = || name.next().ok_or_else(|| Error::Internal("fewer cache names than caches".into()));
        for layer in &mut batch.layers {
            match layer {
                LayerCache::Conv { state } => {
                    let (past, present) = next_name()?;
                    outputs.push((present.clone(), None));
                    inputs.push((past, state));
                }
                LayerCache::Attention { key, value } => {
                    for tensor in [key, value] {
                        let (past, present) = next_name()?;
                        outputs.push((present.clone(), Some(shared(tensor)?)));
                        inputs.push((past, tensor));
                    }
                }
            }
        }
        // Outputs come back in the order bound: logits, then each layer's cache.
        let mut out = self.run_bound_decoder(&inputs, outputs, memory)?.into_iter().map(|(_, v)| v);
        let logits = out.next().ok_or_else(|| Error::inference(STAGE, "no logits"))?;
        for layer in &mut batch.layers {
            match layer {
                LayerCache::Conv { state } => {
                    *state = out.next().ok_or_else(|| Error::inference(STAGE, "conv state missing"))?;
                }
                // Written in place: the returned handles are the layer's own buffers.
                LayerCache::Attention { .. } => {
                    out.nth(1);
                }
            }
        }
        Ok(logits)
    }
}

/// A second handle on the same ONNX Runtime tensor (no copy), to bind it as an output.
fn shared(value: &mut DynValue) -> Result<DynValue> {
    value.view_mut().try_upgrade().map_err(|_| Error::Internal("cache tensor cannot be shared".into()))
}
