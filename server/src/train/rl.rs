//! Online RL: GRPO (Shao et al., as TRL's `GRPOTrainer` computes it). Each step takes
//! `batch_size` prompts, has the serving engine sample `num_generations` completions of
//! each with the policy's current weights ([`Rollouts`]: the engine's own batched
//! sampling, not a second generation loop), scores them with the job's grader, normalises
//! the rewards within each prompt's group into advantages, and takes `num_iterations`
//! optimiser steps on the clipped surrogate, with an optional KL term (TRL's k3 estimator)
//! against the reference, the base with the adapter off.
//!
//! Invariant: the prompts of a step and each rollout's sampling seed are pure functions of
//! (seed, step), and the engine's sampling is batch-invariant, so a resumed run samples
//! what the uninterrupted one did.

use std::sync::atomic::Ordering;

use candle_core::{Device, Tensor};

use super::{
    dataset::Tokenized,
    graders::{Grader, Sample},
    optim::{self, lr_at, AdamW},
    pairs::{add_metrics, mean_metrics, Metrics},
    sequences::{token_logps, SeqBatch},
    trainable::{self, Trainable},
    trainer::{
        epoch_order, resume, Advantage, Control, EvalResult, GrpoSettings, Outcome, Progress,
        TrainError, TrainEvent, TrainSpec,
    },
};
use crate::model::{Adapter, BaseModel};

/// How rollouts are sampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RolloutParams {
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: u32,
}

/// Who samples completions with a policy: the serving engine (`train::rollouts`), so
/// rollouts share its batches and its fairness with live traffic.
pub trait Rollouts: Sync {
    /// For each `(prompt ids, seed)`: the sampled completion's ids, ending with EOS when it
    /// stopped there. `tag` names this policy snapshot (no cache is shared across tags).
    fn sample(
        &self,
        policy: Adapter,
        tag: &str,
        prompts: &[(Vec<u32>, u64)],
        params: &RolloutParams,
    ) -> Result<Vec<Vec<u32>>, String>;
}

/// The advantages of `rewards` (groups of `g` in order) against their group: GRPO's
/// `(r − mean) / (std + 1e-4)` with the unbiased standard deviation, as TRL's default, or
/// RLOO's `r − mean of the others`.
pub fn group_advantages(rewards: &[f64], g: usize, kind: Advantage) -> Vec<f64> {
    rewards
        .chunks(g.max(1))
        .flat_map(|grp| {
            let n = grp.len() as f64;
            let sum = grp.iter().sum::<f64>();
            let mean = sum / n;
            let var = grp.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
            let std = var.sqrt();
            grp.iter().map(move |r| match kind {
                Advantage::Group => (r - mean) / (std + 1e-4),
                Advantage::Rloo if n > 1.0 => r - (sum - r) / (n - 1.0),
                Advantage::Rloo => 0.0,
            })
        })
        .collect()
}

/// TRL's k3 estimator of KL(π ‖ π_ref) per token: `e^{ref − lp} − (ref − lp) − 1`
/// (unbiased under samples from π, never negative).
pub fn kl_k3(lp: &Tensor, ref_lp: &Tensor) -> candle_core::Result<Tensor> {
    let d = (ref_lp - lp)?;
    (d.exp()? - &d)? - 1.0
}

/// GRPO's loss of one group: per token `−min(ρA, clip(ρ, 1−ε, 1+ε)A) + β k3`, averaged
/// over each completion's tokens, then over the completions. `adv` holds each token's
/// advantage (its completion's), `old` the log-probabilities the rollouts were sampled
/// under (ρ = e^{lp − old}); returns the loss and the share of tokens clipped.
pub fn grpo_loss(
    lp: &Tensor,
    old: &Tensor,
    ref_lp: Option<&Tensor>,
    adv: &Tensor,
    rows: &Tensor,
    counts: &[usize],
    s: &GrpoSettings,
) -> Result<(Tensor, f64), TrainError> {
    let ratio = (lp - old)?.exp()?;
    let clipped = ratio.clamp(1.0 - s.epsilon, 1.0 + s.epsilon)?;
    let (a, b) = ((&ratio * adv)?, (&clipped * adv)?);
    let mut per_token = a.minimum(&b)?.neg()?;
    if let (Some(r), true) = (ref_lp, s.beta > 0.0) {
        per_token = (per_token + (kl_k3(lp, r)? * s.beta)?)?;
    }
    let inv: Vec<f32> = counts.iter().map(|&c| 1.0 / c.max(1) as f32).collect();
    let inv = Tensor::from_vec(inv, counts.len(), &Device::Cpu)?;
    let per_seq = (rows.matmul(&per_token.unsqueeze(1)?)?.squeeze(1)? * inv)?;
    let loss = per_seq.mean_all()?;
    let r: Vec<f32> = ratio.to_vec1()?;
    let clip = r
        .iter()
        .filter(|&&x| (x as f64 - 1.0).abs() > s.epsilon)
        .count() as f64
        / r.len().max(1) as f64;
    Ok((loss, clip))
}

/// One rollout: its prompt row, completion and reward.
pub(super) struct Rolled<'a> {
    pub(super) row: &'a Tokenized,
    pub(super) completion: Vec<u32>,
    pub(super) reward: f64,
}

/// Everything a GRPO run reads besides the model and the data.
pub struct RlContext<'a> {
    pub grader: &'a Grader,
    pub rollouts: &'a dyn Rollouts,
}

/// Runs (or resumes, when `ckpt_dir` holds a checkpoint) a GRPO run on the prompt rows
/// `train`; `eval` prompts are scored (one completion each) at each evaluation.
#[allow(clippy::too_many_arguments)]
pub fn train_grpo(
    model: &BaseModel,
    spec: &TrainSpec,
    s: &GrpoSettings,
    cx: &RlContext<'_>,
    train: &[Tokenized],
    eval: &[Tokenized],
    ckpt_dir: &std::path::Path,
    ctl: &Control,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome, TrainError> {
    let mut vars = trainable::start(model, spec, ctl)?;
    let mut opt = AdamW::new(vars.vars(), spec.weight_decay)?;
    let pad = model.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let OnlineRun {
        mut progress,
        start,
        per_epoch,
        total,
    } = OnlineRun::resume(spec, train.len(), ckpt_dir, vars.as_ref(), &mut opt)?;
    let params = RolloutParams {
        temperature: s.temperature,
        top_p: s.top_p,
        max_new_tokens: s.max_new_tokens,
    };
    let started = std::time::Instant::now();
    let mut tokens_done = 0usize;
    for step in start..total {
        if ctl.cancel.load(Ordering::SeqCst) {
            return Ok(progress.stop(step, vars.as_ref(), &opt, ctl, emit));
        }
        let step_started = std::time::Instant::now();
        let rows = step_rows(spec, train, per_epoch, step);
        vars.set_train(false);
        let rolled = roll(
            model,
            vars.as_ref(),
            cx,
            &rows,
            s.num_generations,
            step,
            spec.seed,
            &params,
        )?;
        if ctl.cancel.load(Ordering::SeqCst) {
            // Sampled, not yet updated: `step` steps are whole.
            return Ok(progress.stop(step, vars.as_ref(), &opt, ctl, emit));
        }
        let rewards: Vec<f64> = rolled.iter().map(|r| r.reward).collect();
        let adv = group_advantages(&rewards, s.num_generations, s.advantage);
        let groups: Vec<(SeqBatch, Vec<f32>)> = rolled
            .chunks(s.num_generations)
            .zip(adv.chunks(s.num_generations))
            .map(|(grp, a)| group_batch(grp, a, pad))
            .collect::<Result<_, _>>()?;
        tokens_done += groups.iter().map(|g| g.0.tokens).sum::<usize>();
        // The log-probabilities the rollouts were sampled under (with one iteration, the
        // ones the loss computes: their ratio is 1), and the reference's.
        let iterations = s.num_iterations.max(1);
        let old: Vec<Option<Tensor>> = groups
            .iter()
            .map(|(b, _)| {
                Ok(if iterations > 1 {
                    Some(
                        token_logps(model, Some(vars.as_ref()), b, false)?
                            .0
                            .detach(),
                    )
                } else {
                    None
                })
            })
            .collect::<Result<_, TrainError>>()?;
        let refs: Vec<Option<Tensor>> = groups
            .iter()
            .map(|(b, _)| {
                Ok(if s.beta > 0.0 {
                    Some(token_logps(model, None, b, false)?.0)
                } else {
                    None
                })
            })
            .collect::<Result<_, TrainError>>()?;
        let mut sums = Metrics::new();
        let (mut loss_sum, mut norm) = (0f64, 0f64);
        let lr = lr_at(
            spec.learning_rate,
            spec.schedule,
            spec.warmup_steps,
            total,
            step,
        );
        vars.set_train(true);
        for it in 0..iterations {
            let mut acc: Option<Vec<Tensor>> = None;
            for (k, (b, adv_tok)) in groups.iter().enumerate() {
                if ctl.cancel.load(Ordering::SeqCst) {
                    return Ok(Outcome::Cancelled);
                }
                let last = it + 1 == iterations;
                let (lp, ent) = token_logps(model, Some(vars.as_ref()), b, last)?;
                let adv_t = Tensor::from_slice(adv_tok, adv_tok.len(), &Device::Cpu)?;
                let detached = lp.detach();
                let (loss, clip) = grpo_loss(
                    &lp,
                    old[k].as_ref().unwrap_or(&detached),
                    refs[k].as_ref(),
                    &adv_t,
                    &b.rows,
                    &b.counts,
                    s,
                )?;
                let l = loss.to_scalar::<f32>()? as f64;
                if !l.is_finite() {
                    return Err(TrainError::NanLoss { step: step + 1 });
                }
                if last {
                    loss_sum += l;
                    let mut m = Metrics::from([
                        ("clip_ratio".to_string(), clip),
                        ("entropy".to_string(), ent.unwrap_or_default()),
                    ]);
                    if let Some(r) = &refs[k] {
                        let kl = kl_k3(&lp.detach(), r)?.mean_all()?.to_scalar::<f32>()? as f64;
                        m.insert("kl".into(), kl);
                    }
                    add_metrics(&mut sums, &m);
                }
                let grads = optim::collect(&loss.backward()?, &vars.vars())?;
                optim::accumulate(&mut acc, grads)?;
            }
            let (grads, n) = optim::mean_clipped(acc, groups.len(), spec.max_grad_norm)?;
            norm = n;
            if !norm.is_finite() {
                return Err(TrainError::NanLoss { step: step + 1 });
            }
            opt.apply(&grads, lr)?;
        }
        let done = step + 1;
        let mut metrics = mean_metrics(sums, groups.len());
        let n = rewards.len().max(1) as f64;
        metrics.insert("reward".into(), rewards.iter().sum::<f64>() / n);
        let stds: Vec<f64> = rewards
            .chunks(s.num_generations)
            .map(|g| {
                let m = g.iter().sum::<f64>() / g.len() as f64;
                (g.iter().map(|r| (r - m).powi(2)).sum::<f64>() / (g.len() as f64 - 1.0).max(1.0))
                    .sqrt()
            })
            .collect();
        metrics.insert(
            "reward_std".into(),
            stds.iter().sum::<f64>() / stds.len().max(1) as f64,
        );
        metrics.insert(
            "frac_reward_zero_std".into(),
            stds.iter().filter(|&&x| x == 0.0).count() as f64 / stds.len().max(1) as f64,
        );
        metrics.insert(
            "completion_length".into(),
            rolled.iter().map(|r| r.completion.len()).sum::<usize>() as f64 / n,
        );
        let secs = started.elapsed().as_secs_f64();
        emit(TrainEvent::Step {
            step: done,
            total_steps: total,
            epoch: done as f64 / per_epoch as f64,
            train_loss: loss_sum / groups.len().max(1) as f64,
            learning_rate: lr,
            grad_norm: norm,
            tokens_per_second: tokens_done as f64 / secs.max(1e-9),
            eta_seconds: secs / (done - start) as f64 * (total - done) as f64,
            step_tokens: groups.iter().map(|g| g.0.tokens).sum(),
            step_seconds: step_started.elapsed().as_secs_f64(),
            metrics,
        });
        let eval_result = if !eval.is_empty() && progress.eval_due(spec, done) {
            vars.set_train(false);
            Some(evaluate_graded(
                model,
                vars.as_ref(),
                cx,
                eval,
                step,
                spec.seed,
                &params,
            )?)
        } else {
            None
        };
        if progress.end_step(done, eval_result, vars.as_ref(), &opt, ctl, emit)? {
            break;
        }
    }
    progress.finish(vars)
}

/// Where an online run stands: its step count over the prompt rows (one step a batch of
/// prompts), the step it resumes at and the evaluations' bookkeeping, read from the newest
/// checkpoint in `dir` (which also restores `vars` and `opt`).
pub(super) struct OnlineRun<'a> {
    pub(super) progress: Progress<'a>,
    pub(super) start: usize,
    pub(super) per_epoch: usize,
    pub(super) total: usize,
}

impl<'a> OnlineRun<'a> {
    pub(super) fn resume(
        spec: &'a TrainSpec,
        rows: usize,
        dir: &'a std::path::Path,
        vars: &dyn Trainable,
        opt: &mut AdamW,
    ) -> Result<Self, TrainError> {
        let per_epoch = rows.div_ceil(spec.batch_size.max(1));
        let total = per_epoch * spec.epochs;
        let (start, best_eval, stale) = resume(dir, vars, opt)?;
        Ok(Self {
            progress: Progress {
                spec,
                dir,
                total,
                steps_per_epoch: per_epoch,
                best_eval,
                stale,
                saved: start,
            },
            start,
            per_epoch,
            total,
        })
    }
}

/// The prompt rows of `step`: the next `batch_size` of its epoch's order.
pub(super) fn step_rows<'t>(
    spec: &TrainSpec,
    train: &'t [Tokenized],
    per_epoch: usize,
    step: usize,
) -> Vec<&'t Tokenized> {
    let order = epoch_order(spec.seed, step / per_epoch, train.len());
    let lo = (step % per_epoch) * spec.batch_size;
    order[lo..(lo + spec.batch_size).min(train.len())]
        .iter()
        .map(|&i| &train[i])
        .collect()
}

/// An evaluation by the grader: one completion per prompt of `eval` (seeds apart from
/// training's), scored; `eval_loss` is 1 minus the mean reward (so early stopping follows
/// the grader), `token_accuracy` the mean reward.
pub(super) fn evaluate_graded(
    model: &BaseModel,
    vars: &dyn Trainable,
    cx: &RlContext<'_>,
    eval: &[Tokenized],
    step: usize,
    seed: u64,
    params: &RolloutParams,
) -> Result<EvalResult, TrainError> {
    let rows: Vec<&Tokenized> = eval.iter().collect();
    let scored = roll(model, vars, cx, &rows, 1, usize::MAX - step, seed, params)?;
    let n = scored.len().max(1) as f64;
    let mean = scored.iter().map(|r| r.reward).sum::<f64>() / n;
    let len = scored.iter().map(|r| r.completion.len()).sum::<usize>() as f64 / n;
    Ok((
        1.0 - mean,
        mean,
        None,
        Metrics::from([
            ("reward".to_string(), mean),
            ("completion_length".to_string(), len),
        ]),
    ))
}

/// A grader evaluating an offline job (`eval_grader`): the context and the answers'
/// sampling.
pub struct Grading<'a> {
    pub cx: RlContext<'a>,
    pub params: RolloutParams,
}

/// The sampling seed of generation `g` of prompt `p` at step `step`.
fn rollout_seed(seed: u64, step: usize, p: usize, g: usize) -> u64 {
    let mut h = seed ^ 0x6A09_E667_F3BC_C908;
    for x in [step as u64, p as u64, g as u64] {
        h = (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    h
}

/// `g` completions of each of `rows` sampled with the current policy, scored.
#[allow(clippy::too_many_arguments)]
pub(super) fn roll<'a>(
    model: &BaseModel,
    vars: &dyn Trainable,
    cx: &RlContext<'_>,
    rows: &[&'a Tokenized],
    g: usize,
    step: usize,
    seed: u64,
    params: &RolloutParams,
) -> Result<Vec<Rolled<'a>>, TrainError> {
    let policy = vars
        .export()?
        .compile(&model.llama)
        .map_err(|e| TrainError::Rollout(format!("the policy: {e}")))?;
    let prompts: Vec<(Vec<u32>, u64)> = rows
        .iter()
        .enumerate()
        .flat_map(|(p, r)| (0..g).map(move |k| (r.ids.clone(), rollout_seed(seed, step, p, k))))
        .collect();
    let out = cx
        .rollouts
        .sample(policy, &format!("step-{step}"), &prompts, params)
        .map_err(TrainError::Rollout)?;
    let tk = &model.tokenizer;
    let empty = serde_json::Map::new();
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(i, completion)| {
            let row = rows[i / g.max(1)];
            let body: &[u32] = match completion.split_last() {
                Some((last, rest)) if tk.is_eos(*last) => rest,
                _ => &completion,
            };
            let text = tk.decode(body).unwrap_or_default();
            let reward = cx.grader.score(&Sample {
                text: &text,
                tokens: body,
                prompt: &row.ids,
                eos: tk.eos_ids.first().copied().unwrap_or(0),
                row: row.fields.as_deref().unwrap_or(&empty),
            });
            Rolled {
                row,
                completion,
                reward,
            }
        })
        .collect())
}

/// A group's sequences (prompt + completion, the completion trained) and each trained
/// token's advantage.
pub(super) fn group_batch(
    grp: &[Rolled<'_>],
    adv: &[f64],
    pad: u32,
) -> Result<(SeqBatch, Vec<f32>), TrainError> {
    let seqs: Vec<(Vec<u32>, Vec<bool>)> = grp
        .iter()
        .map(|r| {
            let mut ids = r.row.ids.clone();
            let mut mask = vec![false; ids.len()];
            ids.extend(&r.completion);
            mask.resize(ids.len(), true);
            (ids, mask)
        })
        .collect();
    let refs: Vec<(&[u32], &[bool])> = seqs.iter().map(|(i, m)| (&i[..], &m[..])).collect();
    let b = SeqBatch::new(&refs, pad)?;
    let adv_tok = b
        .counts
        .iter()
        .zip(adv)
        .flat_map(|(&c, &a)| std::iter::repeat_n(a as f32, c))
        .collect();
    Ok((b, adv_tok))
}
