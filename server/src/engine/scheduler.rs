//! Step planning: which sequences run in the next forward pass and with how many tokens.
//! Pure policy over a snapshot of the active sequences; no I/O, no model; unit-tested here.
//!
//! Policy: every decoding sequence gets its one token (decode is never starved by prefill);
//! the remaining token budget goes to prefilling sequences (and to sequences replaying their
//! generated tokens after a preemption) in admission order, in chunks of at most
//! `prefill_chunk`, so one long prompt cannot stall the batch. Background sequences (work no
//! one reads token by token: an RL job's rollouts) prefill after the interactive ones, and
//! while any interactive sequence is active their prefill shares at most
//! `background_prefill` tokens a step, so a job's burst of prompts cannot make the live
//! streams' steps long. Whether the KV blocks for a plan exist is the engine loop's to check
//! (`step.rs`), not this policy's.

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    /// Tokens (rows) in one forward pass at most.
    pub max_batch_tokens: usize,
    /// Prompt tokens one sequence may prefill in one step at most.
    pub prefill_chunk: usize,
    /// Prompt tokens all background sequences together prefill in one step at most while
    /// an interactive sequence is active (alone, background work has the whole budget).
    pub background_prefill: usize,
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

/// One active sequence as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub phase: SeqPhase,
    /// Background work (an RL job's rollouts): prefilled after interactive sequences, within
    /// `background_prefill` while one is active.
    pub background: bool,
}

/// Plans one step over `active` (in admission order).
pub fn plan_step(active: &[Slot], limits: StepLimits) -> StepPlan {
    let mut items = Vec::new();
    let mut budget = limits.max_batch_tokens.max(1);
    for (i, s) in active.iter().enumerate() {
        if s.phase == SeqPhase::NEXT && budget > 0 {
            items.push((i, 1));
            budget -= 1;
        }
    }
    let interactive = active.iter().any(|s| !s.background);
    let mut background_budget = if interactive {
        limits.background_prefill.max(1)
    } else {
        usize::MAX
    };
    for background in [false, true] {
        for (i, s) in active.iter().enumerate() {
            if s.background != background {
                continue;
            }
            let remaining = match s.phase {
                SeqPhase::Prefill { remaining } => remaining,
                SeqPhase::Decode { remaining } if remaining > 1 => remaining,
                SeqPhase::Decode { .. } => continue,
            };
            let cap = if background {
                budget.min(background_budget)
            } else {
                budget
            };
            if cap == 0 {
                break;
            }
            let n = remaining.min(limits.prefill_chunk.max(1)).min(cap);
            items.push((i, n));
            budget -= n;
            if background {
                background_budget -= n;
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
        background_prefill: 8,
    };

    fn interactive(active: &[SeqPhase]) -> Vec<Slot> {
        active
            .iter()
            .map(|&phase| Slot {
                phase,
                background: false,
            })
            .collect()
    }

    fn check(active: &[SeqPhase], limits: StepLimits, expected: &[(usize, usize)]) {
        assert_eq!(plan_step(&interactive(active), limits).items, expected);
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
        let plan = plan_step(&interactive(&active), LIMITS);
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
            background_prefill: 8,
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

    fn slot(phase: SeqPhase, background: bool) -> Slot {
        Slot { phase, background }
    }

    #[test]
    fn background_prefill_is_held_to_its_share_beside_interactive_work() {
        // Two rollouts' prompts arrived before a live stream's: the live prompt still goes
        // first, and the rollouts share 8 tokens (not the 63 left).
        let active = [
            slot(Prefill { remaining: 40 }, true),
            slot(Prefill { remaining: 40 }, true),
            slot(DECODE, false),
            slot(Prefill { remaining: 20 }, false),
        ];
        let plan = plan_step(&active, LIMITS);
        assert_eq!(plan.items, [(0, 8), (2, 1), (3, 20)]);
        // Background decoders are never held back.
        let active = [slot(DECODE, true), slot(DECODE, false)];
        assert_eq!(plan_step(&active, LIMITS).items, [(0, 1), (1, 1)]);
    }

    #[test]
    fn background_alone_has_the_whole_budget() {
        let active = [
            slot(Prefill { remaining: 40 }, true),
            slot(Prefill { remaining: 40 }, true),
            slot(DECODE, true),
        ];
        assert_eq!(plan_step(&active, LIMITS).items, [(0, 32), (1, 31), (2, 1)]);
    }

    #[test]
    fn empty_is_empty() {
        assert!(plan_step(&[], LIMITS).is_empty());
    }
}
