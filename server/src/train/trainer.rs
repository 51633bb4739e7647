//! The trainer: a method's parameters trained with the model's own differentiable forward
//! over the shared frozen weights (`Llama::forward_hidden`), for the SFT objective masked
//! cross-entropy on the trained tokens, for the classification objective cross-entropy of a
//! head on each row's last token (`LlamaForSequenceClassification`'s loss); AdamW with warm-up + decay, clipping, accumulation, periodic evaluation
//! with early stopping, and atomic checkpoints a killed job resumes from.
//! Invariant: the data order is a pure function of (seed, epoch), so a resumed run sees the
//! same batches the interrupted one would have; a checkpoint holds parameters, optimizer
//! moments and the step, written temp-file-then-rename.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{
    classes::{self, ClassEval, Classes},
    dataset::Tokenized,
    optim::{self, lr_at, AdamW},
    pairs::{self, Metrics, References},
    trainable::{self, Trainable},
};
use crate::model::{adapter::TensorAdapter, BaseModel};

pub use super::spec::{
    Advantage, DpoLoss, DpoSettings, GrpoSettings, Objective, PpoSettings, TrainSpec,
};

/// Progress reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TrainEvent {
    Step {
        step: usize,
        total_steps: usize,
        epoch: f64,
        train_loss: f64,
        learning_rate: f64,
        grad_norm: f64,
        tokens_per_second: f64,
        eta_seconds: f64,
        /// Tokens this step ran (padding excluded) and its wall time.
        #[serde(default)]
        step_tokens: usize,
        #[serde(default)]
        step_seconds: f64,
        /// The objective's own means over the step (the pair objectives': TRL's names).
        #[serde(default, skip_serializing_if = "Metrics::is_empty")]
        metrics: Metrics,
    },
    Eval {
        step: usize,
        eval_loss: f64,
        /// SFT: the share of trained tokens predicted right; classification: of rows;
        /// the pair objectives: of pairs ranked right.
        token_accuracy: f64,
        /// Classification: accuracy and per-class F1 on the validation rows.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        classes: Option<ClassEval>,
        /// The objective's own means over the validation rows (as [`TrainEvent::Step`]'s).
        #[serde(default, skip_serializing_if = "Metrics::is_empty")]
        metrics: Metrics,
    },
    Checkpoint {
        step: usize,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("the loss became NaN or infinite at step {step}")]
    NanLoss { step: usize },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
    #[error("model: {0}")]
    Model(#[from] crate::model::ModelError),
    #[error("{0}")]
    Label(String),
    #[error("rollouts: {0}")]
    Rollout(String),
}

/// Why a run ended without error.
pub enum Outcome {
    Finished(Box<dyn Trainable>),
    Cancelled,
}

/// Cooperative controls: cancellation, checked between micro-batches; checkpoint retention.
#[derive(Clone)]
pub struct Control {
    pub cancel: Arc<AtomicBool>,
    /// Set with `cancel` by a drain: the run checkpoints the steps it has completed before
    /// it stops (where its state is whole, between steps or an SFT step's micro-batches), so
    /// the replica that takes the job over resumes from there, not from the last periodic
    /// checkpoint.
    pub checkpoint_on_cancel: Arc<AtomicBool>,
    /// Checkpoints kept on disk at once (the newest ones; at least 1).
    pub keep_checkpoints: usize,
    /// The adapter version the method's parameters start from (`init_adapter`), instead of
    /// their fresh initialisation; a checkpoint, when there is one, still wins.
    pub init: Option<Arc<crate::model::Adapter>>,
    /// Starting values of the method's parameters by name (every one of
    /// [`Trainable::names`], in its shape), instead of their fresh initialisation: another
    /// library's draws, so that a run can be compared with that library's step by step
    /// (`graft-bench methods --peft-start`). A checkpoint, when there is one, still wins.
    pub start_values: Option<Arc<HashMap<String, Tensor>>>,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            cancel: Arc::default(),
            checkpoint_on_cancel: Arc::default(),
            keep_checkpoints: 1,
            init: None,
            start_values: None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    step: usize,
    tensors: String,
    best_eval: Option<f64>,
    evals_without_improvement: usize,
}

/// One padded micro-batch.
struct Batch {
    ids: Tensor,
    /// Flat indices `b*T + i - 1` of the hidden states that predict each trained token.
    positions: Tensor,
    targets: Tensor,
    tokens: usize,
}

/// One padded micro-batch; a labelled row (`classes` given) contributes its last position
/// with its class as the target.
fn make_batch(
    examples: &[&Tokenized],
    pad: u32,
    classes: Option<&Classes>,
    dev: &Device,
) -> Result<Batch, TrainError> {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(examples.len() * t);
    let (mut positions, mut targets) = (Vec::new(), Vec::new());
    let mut tokens = 0;
    for (b, e) in examples.iter().enumerate() {
        tokens += e.ids.len();
        ids.extend(&e.ids);
        ids.extend(std::iter::repeat_n(pad, t - e.ids.len()));
        match (classes, &e.label) {
            (Some(c), Some(l)) => {
                let class = c.class(l).ok_or_else(|| {
                    TrainError::Label(format!("label {:?} is not in the job's label set", l.key()))
                })?;
                positions.push((b * t + e.ids.len() - 1) as u32);
                targets.push(class);
                continue;
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(TrainError::Label(
                    "a labelled row needs the classification objective, and it needs labelled rows"
                        .into(),
                ))
            }
            (None, None) => {}
        }
        for (i, (&id, &m)) in e.ids.iter().zip(&e.mask).enumerate() {
            if m && i > 0 {
                positions.push((b * t + i - 1) as u32);
                targets.push(id);
            }
        }
    }
    let n = positions.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (examples.len(), t), dev)?,
        positions: Tensor::from_vec(positions, n, dev)?,
        targets: Tensor::from_vec(targets, n, dev)?,
        tokens,
    })
}

/// Mean cross-entropy of a batch's trained tokens or rows (and the logits, for accuracy):
/// through the adapter's output hook when it has one (a classification head), else the LM
/// head.
fn batch_loss(
    model: &BaseModel,
    vars: &dyn Trainable,
    b: &Batch,
) -> Result<(Tensor, Tensor), TrainError> {
    let llama = vars.model().unwrap_or(&model.llama);
    let h = llama.forward_hidden(&b.ids, Some(vars as &dyn TensorAdapter))?;
    let (bs, t, hidden) = h.dims3()?;
    let h = h.reshape((bs * t, hidden))?.index_select(&b.positions, 0)?;
    let logits = match (vars.head()?, vars.lm_head()?) {
        (Some(w), _) | (None, Some(w)) => h.matmul(&w.t()?)?,
        (None, None) => llama.weights.lm_head.forward_train(&h)?,
    };
    let loss = crate::model::fused::cross_entropy(&logits, &b.targets)?;
    Ok((loss, logits))
}

/// The loss tensor (differentiable) for `examples` with the adapter `vars`.
pub fn plain_loss_tensor(
    model: &BaseModel,
    vars: &dyn Trainable,
    examples: &[&Tokenized],
) -> Result<Tensor, TrainError> {
    let pad = model.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let classes = vars.labels().map(Classes::new);
    let b = make_batch(examples, pad, classes.as_ref(), model.llama.device())?;
    Ok(batch_loss(model, vars, &b)?.0)
}

/// The loss the plain forward pass computes for `examples` with the adapter `vars`.
pub fn plain_loss(
    model: &BaseModel,
    vars: &dyn Trainable,
    examples: &[&Tokenized],
) -> Result<f64, TrainError> {
    Ok(plain_loss_tensor(model, vars, examples)?.to_scalar::<f32>()? as f64)
}

/// Runs (or resumes, when `ckpt_dir` holds a checkpoint) a training run.
pub fn train(
    model: &BaseModel,
    spec: &TrainSpec,
    train_set: &[Tokenized],
    eval_set: &[Tokenized],
    ckpt_dir: &Path,
    ctl: &Control,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome, TrainError> {
    train_graded(model, spec, train_set, eval_set, ckpt_dir, ctl, None, emit)
}

/// [`train`], evaluated by `grading` when given: `eval_set` is then prompt rows, answered
/// by the adapter through the serving engine and graded (`rl::evaluate_graded`), instead of
/// the loss on held-out answers.
#[allow(clippy::too_many_arguments)]
pub fn train_graded(
    model: &BaseModel,
    spec: &TrainSpec,
    train_set: &[Tokenized],
    eval_set: &[Tokenized],
    ckpt_dir: &Path,
    ctl: &Control,
    grading: Option<&super::rl::Grading<'_>>,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome, TrainError> {
    if spec.objective.online() {
        return Err(TrainError::Rollout(
            "an online objective samples with the serving engine (train::rl)".into(),
        ));
    }
    let mut vars = trainable::start(model, spec, ctl)?;
    let classes = vars.labels().map(Classes::new);
    let mut opt = AdamW::new(vars.vars(), spec.weight_decay)?;
    let pad = model.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let micro_per_epoch = train_set.len().div_ceil(spec.batch_size.max(1));
    let steps_per_epoch = micro_per_epoch.div_ceil(spec.grad_accum.max(1));
    let total = steps_per_epoch * spec.epochs;
    // Before any checkpoint is loaded: with `init`, the parameters as they start; the
    // dropout of training off.
    vars.set_train(false);
    let refs = match spec.objective {
        // The reference: the base, or the adapter the job continues, frozen (the
        // parameters as they start).
        Objective::Dpo(_) => Some(References::load_or_compute(
            model,
            ctl.init.is_some().then_some(vars.as_ref()),
            train_set,
            // A graded evaluation has prompts, no pairs to score.
            if grading.is_some() { &[] } else { eval_set },
            spec.batch_size,
            pad,
            ckpt_dir,
        )?),
        _ => None,
    };
    let (start_step, best_eval, stale) = resume(ckpt_dir, vars.as_ref(), &mut opt)?;
    let mut progress = Progress {
        spec,
        dir: ckpt_dir,
        total,
        steps_per_epoch,
        best_eval,
        stale,
        saved: start_step,
    };
    let started = Instant::now();
    let mut tokens_done = 0usize;
    let mut order: (usize, Vec<usize>) = (usize::MAX, Vec::new());
    for step in start_step..total {
        let epoch = step / steps_per_epoch;
        if order.0 != epoch {
            order = (epoch, epoch_order(spec.seed, epoch, train_set.len()));
        }
        let first_micro = (step % steps_per_epoch) * spec.grad_accum;
        let micros: Vec<usize> =
            (first_micro..(first_micro + spec.grad_accum).min(micro_per_epoch)).collect();
        let mut acc: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0f64;
        let (mut metric_sums, mut pairs_seen) = (Metrics::new(), 0usize);
        let (step_started, tokens_before) = (Instant::now(), tokens_done);
        vars.set_train(true);
        for &mb in &micros {
            if ctl.cancel.load(Ordering::SeqCst) {
                // The optimizer has applied `step` steps; this one's gradients are dropped.
                return Ok(progress.stop(step, vars.as_ref(), &opt, ctl, emit));
            }
            let lo = mb * spec.batch_size;
            let hi = (lo + spec.batch_size).min(train_set.len());
            let picked = &order.1[lo..hi];
            let ex: Vec<&Tokenized> = picked.iter().map(|&i| &train_set[i]).collect();
            vars.set_dropout_seed(
                spec.seed ^ (step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03) ^ mb as u64,
            );
            let loss = if spec.objective.on_pairs() {
                let batch = pairs::pair_batch(&ex, pad)?;
                tokens_done += batch.tokens;
                let r = refs_of(refs.as_ref().map(|r| r.train.as_slice()), picked);
                let out = pairs::pair_loss(model, vars.as_ref(), &spec.objective, &batch, &r)?;
                pairs::add_metrics(&mut metric_sums, &out.sums);
                pairs_seen += batch.pairs;
                out.loss
            } else {
                let batch = make_batch(&ex, pad, classes.as_ref(), model.llama.device())?;
                tokens_done += batch.tokens;
                batch_loss(model, vars.as_ref(), &batch)?.0
            };
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                return Err(TrainError::NanLoss { step: step + 1 });
            }
            loss_sum += l;
            let grads = optim::collect(&loss.backward()?, &vars.vars())?;
            optim::accumulate(&mut acc, grads)?;
        }
        let n = micros.len().max(1) as f64;
        let (grads, norm) = optim::mean_clipped(acc, micros.len(), spec.max_grad_norm)?;
        if !norm.is_finite() {
            return Err(TrainError::NanLoss { step: step + 1 });
        }
        let lr = lr_at(
            spec.learning_rate,
            spec.schedule,
            spec.warmup_steps,
            total,
            step,
        );
        opt.apply(&grads, lr)?;
        let done = step + 1;
        let secs = started.elapsed().as_secs_f64();
        let per_step = secs / (done - start_step) as f64;
        emit(TrainEvent::Step {
            step: done,
            total_steps: total,
            epoch: done as f64 / steps_per_epoch as f64,
            train_loss: loss_sum / n,
            learning_rate: lr,
            grad_norm: norm,
            tokens_per_second: tokens_done as f64 / secs.max(1e-9),
            eta_seconds: per_step * (total - done) as f64,
            step_tokens: tokens_done - tokens_before,
            step_seconds: step_started.elapsed().as_secs_f64(),
            metrics: pairs::mean_metrics(metric_sums, pairs_seen),
        });
        let eval_now = !eval_set.is_empty() && progress.eval_due(spec, done);
        let eval = if eval_now {
            vars.set_train(false);
            Some(if let Some(g) = grading {
                super::rl::evaluate_graded(
                    model,
                    vars.as_ref(),
                    &g.cx,
                    eval_set,
                    step,
                    spec.seed,
                    &g.params,
                )?
            } else if spec.objective.on_pairs() {
                let refs = refs.as_ref().map(|r| r.eval.as_slice());
                let (l, a, m) = evaluate_pairs(model, vars.as_ref(), spec, eval_set, refs, pad)?;
                (l, a, None, m)
            } else {
                let (l, a, c) = evaluate(
                    model,
                    vars.as_ref(),
                    eval_set,
                    spec.batch_size,
                    pad,
                    classes.as_ref(),
                )?;
                (l, a, c, Metrics::new())
            })
        } else {
            None
        };
        if progress.end_step(done, eval, vars.as_ref(), &opt, ctl, emit)? {
            break;
        }
    }
    progress.finish(vars)
}

/// What a run tracks from step to step besides the parameters: the evaluations (the best
/// and how many since it improved, for early stopping) and when to checkpoint.
pub(super) struct Progress<'a> {
    pub(super) spec: &'a TrainSpec,
    pub(super) dir: &'a Path,
    pub(super) total: usize,
    pub(super) steps_per_epoch: usize,
    pub(super) best_eval: Option<f64>,
    pub(super) stale: usize,
    /// The step of the newest checkpoint (or the one the run resumed from).
    pub(super) saved: usize,
}

/// An evaluation's (loss, accuracy, per-class scores, the objective's metrics).
pub(super) type EvalResult = (f64, f64, Option<ClassEval>, Metrics);

impl Progress<'_> {
    /// Whether step `done` ends with an evaluation (every `eval_every` steps and at the
    /// end, or at each epoch's end).
    pub(super) fn eval_due(&self, spec: &TrainSpec, done: usize) -> bool {
        if spec.eval_every > 0 {
            done.is_multiple_of(spec.eval_every) || done == self.total
        } else {
            done.is_multiple_of(self.steps_per_epoch)
        }
    }

    /// After step `done` (and its evaluation, if one ran): reports the evaluation, keeps
    /// the best parameters for early stopping, checkpoints when due. True: stop early.
    pub(super) fn end_step(
        &mut self,
        done: usize,
        eval: Option<EvalResult>,
        vars: &dyn Trainable,
        opt: &AdamW,
        ctl: &Control,
        emit: &mut dyn FnMut(TrainEvent),
    ) -> Result<bool, TrainError> {
        let spec = self.spec;
        if let Some((loss, acc, classes, metrics)) = eval {
            emit(TrainEvent::Eval {
                step: done,
                eval_loss: loss,
                token_accuracy: acc,
                classes,
                metrics,
            });
            if self.best_eval.is_none_or(|b| loss < b) {
                self.best_eval = Some(loss);
                self.stale = 0;
                if spec.patience > 0 {
                    save_tensors(&self.dir.join("best.safetensors"), &vars.tensors())?;
                }
            } else {
                self.stale += 1;
            }
        }
        let stop_early = spec.patience > 0 && self.stale >= spec.patience;
        if done.is_multiple_of(spec.checkpoint_every.max(1)) || done == self.total || stop_early {
            self.save(done, vars, opt, ctl, emit)?;
        }
        if stop_early {
            tracing::info!(step = done, "early stopping: no eval improvement");
        }
        Ok(stop_early)
    }

    /// A cancelled run's end, with `done` steps completed and applied: a drain's
    /// (`checkpoint_on_cancel`) checkpoints them first unless the newest checkpoint has them.
    /// A checkpoint that cannot be written leaves the job to resume from the one before.
    pub(super) fn stop(
        &mut self,
        done: usize,
        vars: &dyn Trainable,
        opt: &AdamW,
        ctl: &Control,
        emit: &mut dyn FnMut(TrainEvent),
    ) -> Outcome {
        if ctl.checkpoint_on_cancel.load(Ordering::SeqCst) && done > self.saved {
            if let Err(e) = self.save(done, vars, opt, ctl, emit) {
                tracing::warn!(step = done, error = %e, "checkpointing a stopped run");
            }
        }
        Outcome::Cancelled
    }

    /// Checkpoints `done` steps and announces it.
    fn save(
        &mut self,
        done: usize,
        vars: &dyn Trainable,
        opt: &AdamW,
        ctl: &Control,
        emit: &mut dyn FnMut(TrainEvent),
    ) -> Result<(), TrainError> {
        checkpoint(
            self.dir,
            done,
            vars,
            opt,
            self.best_eval,
            self.stale,
            ctl.keep_checkpoints,
        )?;
        emit(TrainEvent::Checkpoint { step: done });
        self.saved = done;
        Ok(())
    }

    /// The run's result: with early stopping, the best evaluated parameters.
    pub(super) fn finish(&self, vars: Box<dyn Trainable>) -> Result<Outcome, TrainError> {
        let best = self.dir.join("best.safetensors");
        if self.spec.patience > 0 && best.exists() {
            let saved = candle_core::safetensors::load(&best, &trainable::device_of(vars.as_ref()))
                .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
            vars.load(&saved).map_err(TrainError::Checkpoint)?;
        }
        Ok(Outcome::Finished(vars))
    }
}

/// `wanted` (indices into `rows`, repeats allowed) arranged so that the first epoch of a run
/// with `seed` takes them in that order: another trainer's batches, step for step.
pub fn in_epoch_order<T: Clone>(rows: &[T], wanted: &[usize], seed: u64) -> Vec<T> {
    let order = epoch_order(seed, 0, wanted.len());
    let mut out: Vec<Option<T>> = vec![None; wanted.len()];
    for (&slot, &w) in order.iter().zip(wanted) {
        out[slot] = Some(rows[w].clone());
    }
    // `order` is a permutation: every slot is filled.
    out.into_iter().flatten().collect()
}

/// The data order of `epoch`: a pure function of (seed, epoch).
pub(super) fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9),
    ));
    idx
}

/// Loads the newest checkpoint in `dir`, if any, into `vars` and `opt`: the step to go on
/// from, the best evaluation and the evaluations since it improved.
pub(super) fn resume(
    dir: &Path,
    vars: &dyn Trainable,
    opt: &mut AdamW,
) -> Result<(usize, Option<f64>, usize), TrainError> {
    let Some(meta) = read_meta(dir)? else {
        return Ok((0, None, 0));
    };
    let dev = trainable::device_of(vars);
    let saved = candle_core::safetensors::load(dir.join(&meta.tensors), &dev)
        .map_err(|e| TrainError::Checkpoint(format!("reading {}: {e}", meta.tensors)))?;
    vars.load(&saved).map_err(TrainError::Checkpoint)?;
    opt.load_state(&saved, meta.step)
        .map_err(TrainError::Checkpoint)?;
    tracing::info!(step = meta.step, "resuming from checkpoint");
    Ok((meta.step, meta.best_eval, meta.evals_without_improvement))
}

/// Mean loss and accuracy over `set` (per trained token, or per row for a classifier, which
/// also gets its per-class scores).
fn evaluate(
    model: &BaseModel,
    vars: &dyn Trainable,
    set: &[Tokenized],
    bs: usize,
    pad: u32,
    classes: Option<&Classes>,
) -> Result<(f64, f64, Option<ClassEval>), TrainError> {
    let (mut loss, mut n) = (0f64, 0usize);
    let (mut preds, mut gold) = (Vec::new(), Vec::new());
    for chunk in set.chunks(bs.max(1)) {
        let ex: Vec<&Tokenized> = chunk.iter().collect();
        let b = make_batch(&ex, pad, classes, model.llama.device())?;
        let (l, logits) = batch_loss(model, vars, &b)?;
        let k = b.targets.dim(0)?;
        loss += l.to_scalar::<f32>()? as f64 * k as f64;
        preds.extend(logits.argmax(1)?.to_vec1::<u32>()?);
        gold.extend(b.targets.to_vec1::<u32>()?);
        n += k;
    }
    let correct = preds.iter().zip(&gold).filter(|(a, b)| a == b).count();
    let class_eval = vars
        .labels()
        .map(|labels| classes::evaluate(&preds, &gold, labels));
    Ok((
        loss / n.max(1) as f64,
        correct as f64 / n.max(1) as f64,
        class_eval,
    ))
}

/// The reference log-probabilities of the examples `picked` (zeros without references:
/// the reward model reads none).
fn refs_of(refs: Option<&[[f32; 2]]>, picked: &[usize]) -> Vec<[f32; 2]> {
    picked
        .iter()
        .map(|&i| refs.and_then(|r| r.get(i)).copied().unwrap_or_default())
        .collect()
}

/// Mean loss, the share of pairs ranked right, and the objective's metrics over `set`.
fn evaluate_pairs(
    model: &BaseModel,
    vars: &dyn Trainable,
    spec: &TrainSpec,
    set: &[Tokenized],
    refs: Option<&[[f32; 2]]>,
    pad: u32,
) -> Result<(f64, f64, Metrics), TrainError> {
    let (mut loss, mut correct, mut n, mut sums) = (0f64, 0usize, 0usize, Metrics::new());
    let bs = spec.batch_size.max(1);
    for (k, chunk) in set.chunks(bs).enumerate() {
        let rows: Vec<&Tokenized> = chunk.iter().collect();
        let picked: Vec<usize> = (k * bs..k * bs + chunk.len()).collect();
        let b = pairs::pair_batch(&rows, pad)?;
        let out = pairs::pair_loss(model, vars, &spec.objective, &b, &refs_of(refs, &picked))?;
        loss += out.loss.to_scalar::<f32>()? as f64 * b.pairs as f64;
        correct += out.correct;
        n += b.pairs;
        pairs::add_metrics(&mut sums, &out.sums);
    }
    Ok((
        loss / n.max(1) as f64,
        correct as f64 / n.max(1) as f64,
        pairs::mean_metrics(sums, n),
    ))
}

/// A checkpoint I/O failure: the log has the path, the job's error (which its tenant reads)
/// only the file's name.
fn ckpt_err(doing: &str, path: &Path, e: impl std::fmt::Display) -> TrainError {
    tracing::error!(path = %path.display(), error = %e, "checkpoint: {doing}");
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    TrainError::Checkpoint(format!("{doing} {name}: {e}"))
}

/// The file naming a job's newest checkpoint.
pub const CHECKPOINT_META: &str = "checkpoint.json";

fn read_meta(dir: &Path) -> Result<Option<CheckpointMeta>, TrainError> {
    let p = dir.join(CHECKPOINT_META);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| ckpt_err("reading", &p, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ckpt_err("reading", &p, e)),
    }
}

pub(super) fn save_tensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ckpt_err("writing", &tmp, e)
    })?;
    let f = std::fs::File::open(&tmp).map_err(|e| ckpt_err("opening", &tmp, e))?;
    f.sync_all().map_err(|e| ckpt_err("syncing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ckpt_err("renaming", path, e))
}

/// Bytes one checkpoint of a run with `adapter_bytes` of LoRA tensors holds: the tensors
/// and AdamW's two moment estimates of each, plus the safetensors header (under 64 KiB).
pub fn checkpoint_bytes(adapter_bytes: u64) -> u64 {
    3 * adapter_bytes + (64 << 10)
}

/// The step of a checkpoint tensors file's name.
fn checkpoint_step(name: &str) -> Option<usize> {
    name.strip_prefix("checkpoint-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// Tensors first (a new file), then the metadata pointing at them (atomic), then the files
/// beyond the newest `keep` go: a crash at any point leaves the previous checkpoint or the
/// new one.
fn checkpoint(
    dir: &Path,
    step: usize,
    vars: &dyn Trainable,
    opt: &AdamW,
    best_eval: Option<f64>,
    stale: usize,
    keep: usize,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| ckpt_err("creating", dir, e))?;
    let name = format!("checkpoint-{step}.safetensors");
    let mut all = vars.tensors();
    all.extend(opt.state());
    save_tensors(&dir.join(&name), &all)?;
    let meta = CheckpointMeta {
        step,
        tensors: name.clone(),
        best_eval,
        evals_without_improvement: stale,
    };
    let bytes = serde_json::to_vec(&meta).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    let meta_path = dir.join(CHECKPOINT_META);
    crate::store::atomic_write(&meta_path, &bytes)
        .map_err(|e| ckpt_err("writing", &meta_path, e))?;
    let mut steps: Vec<usize> = std::fs::read_dir(dir)
        .map_err(|e| ckpt_err("listing", dir, e))?
        .flatten()
        .filter_map(|e| checkpoint_step(&e.file_name().to_string_lossy()))
        .filter(|&s| s != step)
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    for old in steps.into_iter().skip(keep.max(1) - 1) {
        let _ = std::fs::remove_file(dir.join(format!("checkpoint-{old}.safetensors")));
    }
    Ok(())
}

/// Where a job's checkpoints live.
pub fn checkpoint_dir(data_dir: &Path, job_id: &str) -> PathBuf {
    data_dir.join("jobs").join(job_id)
}
