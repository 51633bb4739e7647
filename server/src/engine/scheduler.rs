//! Step planning: which sequences run in the next forward pass and with how many tokens.
//! Pure policy over a snapshot of the active sequences; no I/O, no model; unit-tested here.
//!
//! Policy: every decoding sequence gets its one token (decode is never starved by prefill);
//! the remaining token budget goes to prefilling sequences (and to sequences replaying their
//! generated tokens after a preemption) in admission order, in chunks of at most
//! `prefill_chunk`, so one long prompt cannot stall the batch. Whether the KV blocks for a
//! plan exist is the engine loop's to check (`step.rs`), not this policy's.

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    /// Tokens (rows) in one forward pass at most.
    pub max_batch_tokens: usize,
    /// Prompt tokens one sequence may prefill in one step at most.
    pub prefill_chunk: usize,
}

/// What the scheduler needs to know of one active sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqPhase {
    /// Prompt tokens still to run (the prefill path).
    Prefill { remaining: usize },
    /// Generated tokens still to run (the decode path): one in steady state, more while a
    /// preempted sequence recomputes what it had generated.
    Decode { remaining: usize },
}

impl SeqPhase {
    /// The steady decode state: the one token sampled last.
    pub const NEXT: SeqPhase = SeqPhase::Decode { remaining: 1 };
}

/// Rows for the next step: `(index into the active list, tokens to run)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepPlan {
    pub items: Vec<(usize, usize)>,
}

impl StepPlan {
    pub fn tokens(&self) -> usize {
        self.items.iter().map(|i| i.1).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Plans one step over `active` (in admission order).
pub fn plan_step(active: &[SeqPhase], limits: StepLimits) -> StepPlan {
    let mut items = Vec::new();
    let mut budget = limits.max_batch_tokens.max(1);
    for (i, p) in active.iter().enumerate() {
        if *p == SeqPhase::NEXT && budget > 0 {
            items.push((i, 1));
            budget -= 1;
        }
    }
    for (i, p) in active.iter().enumerate() {
        let remaining = match *p {
            SeqPhase::Prefill { remaining } => remaining,
            SeqPhase::Decode { remaining } if remaining > 1 => remaining,
            SeqPhase::Decode { .. } => continue,
        };
        {
            if budget == 0 {
                break;
            }
            let n = remaining.min(limits.prefill_chunk.max(1)).min(budget);
            if n > 0 {
                items.push((i, n));
                budget -= n;
            }
        }
    }
    items.sort_unstable();
    StepPlan { items }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SeqPhase::*;

    const DECODE: SeqPhase = SeqPhase::NEXT;

    const LIMITS: StepLimits = StepLimits {
        max_batch_tokens: 64,
        prefill_chunk: 32,
    };

    fn check(active: &[SeqPhase], limits: StepLimits, expected: &[(usize, usize)]) {
        assert_eq!(plan_step(active, limits).items, expected);
    }

    #[test]
    fn every_decoder_gets_one_token() {
        check(&[DECODE, DECODE, DECODE], LIMITS, &[(0, 1), (1, 1), (2, 1)]);
    }

    #[test]
    fn long_prompt_is_chunked() {
        check(&[Prefill { remaining: 500 }], LIMITS, &[(0, 32)]);
    }

    #[test]
    fn decoders_go_first_then_prefill_fills_the_budget() {
        let mut active = vec![Prefill { remaining: 100 }, Prefill { remaining: 100 }];
        active.extend(std::iter::repeat_n(DECODE, 10));
        let plan = plan_step(&active, LIMITS);
        assert_eq!(plan.tokens(), 64);
        assert_eq!(plan.items[0], (0, 32));
        assert_eq!(plan.items[1], (1, 22));
        assert!(plan.items[2..].iter().all(|&(_, n)| n == 1));
    }

    #[test]
    fn budget_smaller_than_decoders_still_bounded() {
        let limits = StepLimits {
            max_batch_tokens: 2,
            prefill_chunk: 8,
        };
        check(&[DECODE, DECODE, DECODE], limits, &[(0, 1), (1, 1)]);
    }

    #[test]
    fn a_replay_is_chunked_like_a_prefill_after_the_decoders() {
        check(
            &[Decode { remaining: 100 }, DECODE, Prefill { remaining: 10 }],
            LIMITS,
            &[(0, 32), (1, 1), (2, 10)],
        );
    }

    #[test]
    fn empty_is_empty() {
        assert!(plan_step(&[], LIMITS).is_empty());
    }
}
