//! Next-token choice from logits: repetition penalty, temperature, top-k, top-p, seeded RNG.
//! Invariant: a sequence's sampler depends only on its own parameters, seed and history, so
//! the same request gives the same tokens whatever else shares the batch.

use rand::{rngs::StdRng, Rng, SeedableRng};

/// Validated sampling parameters (the API edge checks ranges).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: u32,
    pub repetition_penalty: f32,
    pub stop: Vec<String>,
    pub seed: u64,
    pub logprobs: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            stop: Vec::new(),
            seed: 0,
            logprobs: false,
        }
    }
}

/// One sequence's sampler.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    seen: Vec<bool>,
}

/// The chosen token and its log-probability under the unmodified distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

impl Sampler {
    pub fn new(params: SamplingParams, vocab: usize, prompt: &[u32]) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        let mut s = Self {
            params,
            rng,
            seen: Vec::new(),
        };
        if s.params.repetition_penalty != 1.0 {
            s.seen = vec![false; vocab];
            for &t in prompt {
                s.observe(t);
            }
        }
        s
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records a generated token (for the repetition penalty).
    pub fn observe(&mut self, token: u32) {
        if let Some(x) = self.seen.get_mut(token as usize) {
            *x = true;
        }
    }

    /// Picks the next token from `logits` (modified in place).
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        let logprob_of = if self.params.logprobs {
            Some(log_softmax_denominator(logits))
        } else {
            None
        };
        let raw = logits.to_vec();
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for (l, &seen) in logits.iter_mut().zip(&self.seen) {
                if seen {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        let token = if p.temperature == 0.0 {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        let logprob = logprob_of
            .map(|(max, lse)| raw[token as usize] - max - lse)
            .unwrap_or(0.0);
        self.observe(token);
        Sampled { token, logprob }
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let mut cand: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (l * inv_t, i as u32))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        let by_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && (p.top_k as usize) < cand.len() {
            let k = p.top_k as usize;
            cand.select_nth_unstable_by(k - 1, by_desc);
            cand.truncate(k);
        }
        if p.top_p < 1.0 {
            cand.sort_unstable_by(by_desc);
        }
        let max = cand.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.0 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, pr) in probs.iter().enumerate() {
                acc += pr / total;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (pr, c) in probs.iter().zip(&cand) {
            r -= pr;
            if r <= 0.0 {
                return c.1;
            }
        }
        cand[probs.len() - 1].1
    }
}

/// Index of the largest logit (the lowest index among ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `(max, log(sum(exp(l - max))))`, so that `log p(i) = l_i - max - lse`.
fn log_softmax_denominator(logits: &[f32]) -> (f32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    (max, sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            logprobs: true,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_is_argmax_and_logprob_is_log_softmax() {
        let mut s = Sampler::new(params(0.0), 4, &[]);
        let out = s.sample(&mut [1.0, 3.0, 2.0, 0.0]);
        assert_eq!(out.token, 1);
        let z: f32 = [1.0f32, 3.0, 2.0, 0.0].iter().map(|x| x.exp()).sum();
        assert!((out.logprob - (3.0 - z.ln())).abs() < 1e-5);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(
                SamplingParams {
                    seed,
                    ..params(1.0)
                },
                50,
                &[],
            );
            (0..20)
                .map(|_| s.sample(&mut logits.clone()).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 1,
                seed: 3,
                ..params(1.5)
            },
            5,
            &[],
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.1, 0.2, 0.9, 0.3, 0.0]).token, 2);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.5,
                seed: 1,
                ..params(1.0)
            },
            3,
            &[],
        );
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [5.0, 0.0, 0.0]).token, 0);
        }
    }

    #[test]
    fn repetition_penalty_discourages_seen_tokens() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 10.0,
                ..params(0.0)
            },
            3,
            &[0],
        );
        assert_eq!(s.sample(&mut [2.0, 1.0, 0.5]).token, 1);
    }
}
