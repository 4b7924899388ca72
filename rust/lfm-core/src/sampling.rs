//! Choosing the next token from a logits row, in transformers' order: repetition penalty,
//! EOS suppression before `min_new_tokens`, then (when sampling) temperature, top-k,
//! top-p, min-p, and a draw from the softmax.

use crate::error::{Error, Result};
use crate::options::RequestOptions;

/// xoshiro256** seeded through splitmix64: small, fast, and reproducible across platforms.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Per-sequence sampling state.
#[derive(Debug, Clone)]
pub struct Sampler {
    opts: RequestOptions,
    rng: Rng,
    eos: u32,
    /// Ids the repetition penalty applies to (prompt and generated), as a presence set.
    seen: Vec<bool>,
    /// Logits beyond this id are never chosen (the tokenizer defines no token there).
    valid_vocab: usize,
}

impl Sampler {
    pub fn new(opts: &RequestOptions, seed: u64, eos: u32, prompt: &[u32], valid_vocab: usize) -> Sampler {
        let mut seen = vec![false; valid_vocab];
        for &id in prompt {
            if let Some(s) = seen.get_mut(id as usize) {
                *s = true;
            }
        }
        Sampler { opts: opts.clone(), rng: Rng::new(seed), eos, seen, valid_vocab }
    }

    /// Marks a generated id for the repetition penalty.
    pub fn observe(&mut self, id: u32) {
        if let Some(s) = self.seen.get_mut(id as usize) {
            *s = true;
        }
    }

    /// Applies everything up to (not including) the draw; `generated` is how many new
    /// tokens exist. The row keeps `-inf` for every id that may not be chosen.
    pub fn process(&self, logits: &mut [f32], generated: usize) {
        let n = logits.len().min(self.valid_vocab);
        for v in &mut logits[n..] {
            *v = f32::NEG_INFINITY;
        }
        let logits = &mut logits[..n];
        let p = self.opts.repetition_penalty;
        if p != 1.0 {
            for (v, &s) in logits.iter_mut().zip(&self.seen) {
                if s {
                    *v = if *v < 0.0 { *v * p } else { *v / p };
                }
            }
        }
        if generated < self.opts.min_new_tokens
            && let Some(v) = logits.get_mut(self.eos as usize)
        {
            *v = f32::NEG_INFINITY;
        }
        if self.opts.is_greedy() {
            return;
        }
        let t = self.opts.temperature;
        if t != 1.0 {
            for v in logits.iter_mut() {
                *v /= t;
            }
        }
        if self.opts.top_k > 0 && self.opts.top_k < logits.len() {
            let mut sorted: Vec<f32> = logits.to_vec();
            let k = self.opts.top_k;
            sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            for v in logits.iter_mut() {
                if *v < kth {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        if self.opts.top_p < 1.0 {
            top_p(logits, self.opts.top_p);
        }
        if self.opts.min_p > 0.0 {
            let probs = softmax(logits);
            let max = probs.iter().copied().fold(0.0f32, f32::max);
            let threshold = self.opts.min_p * max;
            let best = argmax(logits);
            for (i, (v, p)) in logits.iter_mut().zip(&probs).enumerate() {
                if *p < threshold && i != best {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Picks the next id from a processed row (argmax when greedy, else a seeded draw).
    pub fn choose(&mut self, logits: &[f32]) -> Result<u32> {
        if !logits.iter().any(|v| v.is_finite()) {
            return Err(Error::inference("sampler", "every token is excluded (all logits are -inf)"));
        }
        if self.opts.is_greedy() {
            return Ok(argmax(logits) as u32);
        }
        let probs = softmax(logits);
        let r = self.rng.next_f64() as f32 * probs.iter().sum::<f32>();
        let mut acc = 0.0f32;
        let mut last = argmax(logits);
        for (i, p) in probs.iter().enumerate() {
            if *p > 0.0 {
                acc += p;
                last = i;
                if r < acc {
                    return Ok(i as u32);
                }
            }
        }
        Ok(last as u32)
    }
}

/// Index of the first maximum (as `torch.argmax` picks it).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Numerically stable softmax; `-inf` entries get probability 0.
pub fn softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return vec![0.0; v.len()];
    }
    let exps: Vec<f32> = v.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// transformers' TopPLogitsWarper: sort ascending, drop the tokens whose cumulative
/// probability stays at or below `1 - top_p`, always keep the most likely one.
fn top_p(logits: &mut [f32], top_p: f32) {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let sorted: Vec<f32> = order.iter().map(|&i| logits[i]).collect();
    let probs = softmax(&sorted);
    let mut cum = 0.0f32;
    let last = order.len() - 1;
    for (rank, (&i, p)) in order.iter().zip(&probs).enumerate() {
        cum += p;
        if cum <= 1.0 - top_p && rank != last {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(f: impl FnOnce(&mut RequestOptions)) -> RequestOptions {
        let mut o = RequestOptions { repetition_penalty: 1.0, ..Default::default() };
        f(&mut o);
        o
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let s = Sampler::new(&opts(|o| o.repetition_penalty = 2.0), 0, 9, &[0, 1], 3);
        let mut row = [1.0, -4.0, 3.0];
        s.process(&mut row, 0);
        assert_eq!(row, [0.5, -8.0, 3.0]);
    }

    #[test]
    fn greedy_takes_first_max_and_masks_tail() {
        let mut s = Sampler::new(&opts(|_| {}), 0, 9, &[], 3);
        let mut row = [1.0, 5.0, 5.0, 99.0];
        s.process(&mut row, 0);
        assert_eq!(s.choose(&row).unwrap(), 1);
    }

    #[test]
    fn min_new_tokens_suppresses_eos() {
        let mut s = Sampler::new(&opts(|o| o.min_new_tokens = 2), 0, 1, &[], 3);
        let mut row = [0.0, 9.0, 1.0];
        s.process(&mut row, 1);
        assert_eq!(s.choose(&row).unwrap(), 2);
        let mut row = [0.0, 9.0, 1.0];
        s.process(&mut row, 2);
        assert_eq!(s.choose(&row).unwrap(), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let o = opts(|o| {
            o.temperature = 1.0;
            o.top_k = 2;
        });
        let draw = |seed| {
            let mut s = Sampler::new(&o, seed, 99, &[], 4);
            (0..64)
                .map(|_| {
                    let mut row = [1.0, 2.0, 0.5, 1.9];
                    s.process(&mut row, 5);
                    s.choose(&row).unwrap()
                })
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert!(a.iter().all(|&i| i == 1 || i == 3));
        assert!(a.contains(&1) && a.contains(&3));
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        let mut row = [(0.5f32).ln(), (0.3f32).ln(), (0.2f32).ln()];
        top_p(&mut row, 0.7);
        assert!(row[0].is_finite() && row[1].is_finite() && row[2] == f32::NEG_INFINITY);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let s = Sampler::new(
            &opts(|o| {
                o.temperature = 1.0;
                o.min_p = 0.5;
            }),
            0,
            99,
            &[],
            3,
        );
        let mut row = [(0.6f32).ln(), (0.35f32).ln(), (0.05f32).ln()];
        s.process(&mut row, 0);
        assert!(row[0].is_finite() && row[1].is_finite() && row[2] == f32::NEG_INFINITY);
    }
}
