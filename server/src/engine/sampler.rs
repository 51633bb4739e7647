//! Next-token choice from logits: repetition penalty, presence and frequency penalties,
//! temperature, top-k, top-p, seeded RNG; the chosen token's log-probability and, when asked,
//! the most likely alternatives'.
//! Invariant: a sequence's sampler depends only on its own parameters, seed and history, so
//! the same request gives the same tokens whatever else shares the batch.

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::constraint::Constraint;

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
    /// Subtracted once from the logit of every token already generated (OpenAI's
    /// `presence_penalty`, in [-2, 2]; 0 = off).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI's
    /// `frequency_penalty`, in [-2, 2]; 0 = off).
    pub frequency_penalty: f32,
    pub stop: Vec<String>,
    pub seed: u64,
    pub logprobs: bool,
    /// The most likely tokens to report beside each chosen one, with their log-probabilities
    /// (0 = none; implies nothing unless `logprobs`).
    pub top_logprobs: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            stop: Vec::new(),
            seed: 0,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

/// One sequence's sampler.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    seen: Vec<bool>,
    /// How often each token was generated (for the presence and frequency penalties; empty
    /// when both are off).
    generated: Vec<u32>,
    /// Structured output: what may come next.
    constraint: Option<Constraint>,
}

/// The chosen token, its log-probability under the unmodified distribution and, when asked,
/// the `top_logprobs` most likely tokens of that distribution (most likely first).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, vocab: usize, prompt: &[u32]) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        let mut s = Self {
            params,
            rng,
            seen: Vec::new(),
            generated: Vec::new(),
            constraint: None,
        };
        if s.params.repetition_penalty != 1.0 {
            s.seen = vec![false; vocab];
            for &t in prompt {
                s.see(t);
            }
        }
        if s.params.presence_penalty != 0.0 || s.params.frequency_penalty != 0.0 {
            s.generated = vec![0; vocab];
        }
        s
    }

    /// Samples under `constraint` from now on.
    pub fn with_constraint(mut self, constraint: Option<Constraint>) -> Self {
        self.constraint = constraint;
        self
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The sequence's constraint, if it has one (to compute its next mask ahead of time).
    pub fn constraint_mut(&mut self) -> Option<&mut Constraint> {
        self.constraint.as_mut()
    }

    /// Whether a constraint says the output is complete.
    pub fn constraint_done(&self) -> bool {
        self.constraint.as_ref().is_some_and(Constraint::is_done)
    }

    /// Records a prompt token (for the repetition penalty).
    fn see(&mut self, token: u32) {
        if let Some(x) = self.seen.get_mut(token as usize) {
            *x = true;
        }
    }

    /// Records a generated token (for the repetition, presence and frequency penalties).
    pub fn observe(&mut self, token: u32) {
        self.see(token);
        if let Some(c) = self.generated.get_mut(token as usize) {
            *c += 1;
        }
    }

    /// Picks the next token from `logits` (modified in place). Errs only when the
    /// sequence's constraint failed (no token may come next).
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<Sampled, String> {
        let logprob_of = if self.params.logprobs {
            Some(log_softmax_denominator(logits))
        } else {
            None
        };
        // The logits as the model gave them, for the reported log-probabilities only.
        let raw = logprob_of.map(|_| logits.to_vec());
        if let Some(c) = &mut self.constraint {
            c.apply(logits)?;
        }
        let p = &self.params;
        // OpenAI's penalties: l -= count * frequency + (count > 0) * presence, over the
        // tokens generated so far.
        for (l, &c) in logits.iter_mut().zip(&self.generated) {
            if c > 0 {
                *l -= c as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
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
        let (logprob, top) = match logprob_of.zip(raw) {
            Some(((max, lse), raw)) => (
                raw[token as usize] - max - lse,
                most_likely(&raw, self.params.top_logprobs as usize)
                    .into_iter()
                    .map(|i| (i, raw[i as usize] - max - lse))
                    .collect(),
            ),
            None => (0.0, Vec::new()),
        };
        if let Some(c) = &mut self.constraint {
            c.commit(token)?;
        }
        self.observe(token);
        Ok(Sampled {
            token,
            logprob,
            top,
        })
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if (p.top_k == 0 || p.top_k as usize >= logits.len()) && p.top_p >= 1.0 {
            self.sample_whole(logits)
        } else {
            self.sample_candidates(logits)
        }
    }

    /// [`Self::sample_candidates`] where every finite logit is a candidate (no top-k, no
    /// top-p), without building the candidate list: the same maximum, the same
    /// probabilities summed in the same order and the same draw, so the same token; three
    /// passes over the logits and no allocation (32 rows of 49,152 logits a step).
    fn sample_whole(&mut self, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / self.params.temperature;
        let finite = || logits.iter().filter(|l| l.is_finite()).map(|&l| l * inv_t);
        let max = finite().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return argmax(logits);
        }
        let total: f32 = finite().map(|l| (l - max).exp()).sum();
        let mut r = self.rng.random::<f32>() * total;
        let mut last = 0;
        for (i, &l) in logits.iter().enumerate() {
            if !l.is_finite() {
                continue;
            }
            last = i as u32;
            r -= (l * inv_t - max).exp();
            if r <= 0.0 {
                return last;
            }
        }
        last
    }

    /// Samples among the finite logits at the temperature, cut to the `top_k` largest and
    /// then to the nucleus of mass `top_p`.
    fn sample_candidates(&mut self, logits: &[f32]) -> u32 {
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

/// The ids of the `k` largest logits, largest first (lower id first among ties).
fn most_likely(logits: &[f32], k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    let by_desc = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    if k < ids.len() {
        ids.select_nth_unstable_by(k - 1, by_desc);
        ids.truncate(k);
    }
    ids.sort_unstable_by(by_desc);
    ids
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
        let out = s.sample(&mut [1.0, 3.0, 2.0, 0.0]).expect("sampled");
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
                .map(|_| s.sample(&mut logits.clone()).expect("sampled").token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn whole_vocabulary_sampling_draws_what_the_candidate_list_draws() {
        let mut logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919 % 1000) as f32 / 100.0 - 5.0) * (1.0 + (i % 3) as f32))
            .collect();
        logits[17] = f32::NEG_INFINITY;
        logits[4000] = f32::NAN;
        for (seed, t) in [(1, 0.7), (2, 1.0), (3, 0.2), (4, 1.5)] {
            let mut whole = Sampler::new(SamplingParams { seed, ..params(t) }, 5000, &[]);
            let mut listed = Sampler::new(SamplingParams { seed, ..params(t) }, 5000, &[]);
            let a: Vec<u32> = (0..200).map(|_| whole.sample_whole(&logits)).collect();
            let b: Vec<u32> = (0..200)
                .map(|_| listed.sample_candidates(&logits))
                .collect();
            assert_eq!(a, b, "seed {seed}, temperature {t}");
            assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 20);
            assert!(!a.contains(&17) && !a.contains(&4000));
        }
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
            assert_eq!(
                s.sample(&mut [0.1, 0.2, 0.9, 0.3, 0.0])
                    .expect("sampled")
                    .token,
                2
            );
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
            assert_eq!(s.sample(&mut [5.0, 0.0, 0.0]).expect("sampled").token, 0);
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
        assert_eq!(s.sample(&mut [2.0, 1.0, 0.5]).expect("sampled").token, 1);
    }

    #[test]
    fn presence_penalty_discourages_generated_tokens_once() {
        // Token 0 leads by 1.0; a presence penalty of 1.5 pushes it below token 1 after it
        // was generated once, and keeps it there (the penalty does not grow).
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 1.5,
                ..params(0.0)
            },
            3,
            &[0, 0, 0],
        );
        let logits = [2.0, 1.0, 0.0];
        let tokens: Vec<u32> = (0..4)
            .map(|_| s.sample(&mut logits.clone()).expect("sampled").token)
            .collect();
        // The prompt's tokens are not penalised, so 0 comes first; then 0 is at 0.5 and 1
        // wins; then both were generated once: 0.5 vs -0.5, so 0, and 0 stays ahead.
        assert_eq!(tokens, vec![0, 1, 0, 0]);
    }

    #[test]
    fn frequency_penalty_grows_with_each_repetition() {
        // Token 0 leads token 1 by 2.5; each generation of 0 costs it 1.0 more.
        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 1.0,
                ..params(0.0)
            },
            2,
            &[],
        );
        let logits = [3.5, 1.0];
        let tokens: Vec<u32> = (0..5)
            .map(|_| s.sample(&mut logits.clone()).expect("sampled").token)
            .collect();
        // 0 (3.5 vs 1), 0 (2.5 vs 1), 0 (1.5 vs 1), 1 (0.5 vs 1), 0 (0.5 vs 1 - 1 = 0).
        assert_eq!(tokens, vec![0, 0, 0, 1, 0]);
    }

    #[test]
    fn negative_penalties_encourage_repetition() {
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: -2.0,
                ..params(0.0)
            },
            2,
            &[],
        );
        // 1 is chosen first only when it leads; force it once through a one-off logit.
        assert_eq!(s.sample(&mut [0.0, 1.0]).expect("sampled").token, 1);
        // Now 0 leads by 1.5, but 1 gets +2.0.
        assert_eq!(s.sample(&mut [1.5, 0.0]).expect("sampled").token, 1);
    }

    #[test]
    fn penalties_change_choices_not_reported_logprobs() {
        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 2.0,
                top_logprobs: 2,
                ..params(0.0)
            },
            3,
            &[],
        );
        let logits = [2.0f32, 1.0, 0.0];
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        let first = s.sample(&mut logits.clone()).expect("sampled");
        let second = s.sample(&mut logits.clone()).expect("sampled");
        assert_eq!((first.token, second.token), (0, 1));
        // Both are reported under the model's own distribution.
        assert!((second.logprob - (1.0 - z.ln())).abs() < 1e-5);
        assert_eq!(second.top.len(), 2);
        assert_eq!(second.top[0].0, 0);
        assert!((second.top[0].1 - (2.0 - z.ln())).abs() < 1e-5);
        assert_eq!(second.top[1].0, 1);
    }

    #[test]
    fn top_logprobs_are_the_most_likely_tokens_in_order() {
        let mut s = Sampler::new(
            SamplingParams {
                top_logprobs: 3,
                seed: 9,
                ..params(1.0)
            },
            5,
            &[],
        );
        let logits = [0.5f32, 3.0, -1.0, 3.0, 2.0];
        let out = s.sample(&mut logits.clone()).expect("sampled");
        let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 4]);
        let total: f32 = logits.iter().map(|x| x.exp()).sum();
        for (id, lp) in &out.top {
            assert!((lp - (logits[*id as usize] - total.ln())).abs() < 1e-5);
        }
        // The chosen token's own log-probability agrees with the table where it appears.
        if let Some((_, lp)) = out.top.iter().find(|t| t.0 == out.token) {
            assert_eq!(*lp, out.logprob);
        }
        // Without logprobs nothing is reported.
        let mut quiet = Sampler::new(
            SamplingParams {
                logprobs: false,
                top_logprobs: 3,
                ..params(1.0)
            },
            5,
            &[],
        );
        assert!(quiet
            .sample(&mut logits.clone())
            .expect("sampled")
            .top
            .is_empty());
    }
}
