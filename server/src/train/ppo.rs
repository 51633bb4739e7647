//! PPO (Schulman et al.; RLHF as Ziegler et al. and Ouyang et al. run it, TRL's
//! `PPOTrainer` formulas): each step samples one completion per prompt with the policy
//! (through the serving engine, as GRPO does), scores it with the job's grader, turns the
//! score into per-token rewards with a KL penalty against the reference (the base,
//! adapter off), estimates advantages with GAE from a value head on the policy's hidden
//! states, and runs `ppo_epochs` passes of mini-batches on the clipped surrogate plus the
//! clipped value loss.
//!
//! The value head trains beside the policy and is checkpointed with it, but it is not part
//! of the result: the registered adapter is the policy alone. An adaptive KL coefficient
//! is saved beside each checkpoint (`ppo-STEP.json`), so a resumed run goes on with it.

use std::sync::atomic::Ordering;

use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use super::{
    dataset::Tokenized,
    optim::{self, lr_at, AdamW},
    pairs::Metrics,
    prompt_vars::normal,
    rl::{evaluate_graded, roll, step_rows, OnlineRun, RlContext, RolloutParams},
    sequences::{token_logps, token_outputs, SeqBatch},
    trainable::{self, Trainable},
    trainer::{Control, Outcome, PpoSettings, TrainError, TrainEvent, TrainSpec},
};
use crate::{
    adapters::formats::Parsed,
    model::{
        adapter::{LinearHook, SublayerHook, TensorAdapter},
        BaseModel, Module, Sublayer,
    },
};

/// The checkpoint name of the value head.
pub const VALUE_HEAD: &str = "v_head.weight";

/// A policy's parameters with a value head `(1, hidden)` beside them: every hook is the
/// policy's; the head is trained and checkpointed, never exported.
pub struct WithValue {
    inner: Box<dyn Trainable>,
    value: Var,
}

impl WithValue {
    pub fn init(inner: Box<dyn Trainable>, hidden: usize, seed: u64) -> candle_core::Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7A1E_0000_0000_0001);
        let w: Vec<f32> = normal(&mut rng, hidden)
            .into_iter()
            .map(|x| x * 0.02)
            .collect();
        Ok(Self {
            inner,
            value: Var::from_tensor(&Tensor::from_vec(w, (1, hidden), &Device::Cpu)?)?,
        })
    }

    /// The value of each state `(N,)` from its hidden state `(N, H)`.
    pub fn values(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        h.matmul(&self.value.as_tensor().t()?)?.squeeze(1)
    }
}

impl TensorAdapter for WithValue {
    fn linear(&self, layer: usize, m: Module) -> Option<&dyn LinearHook> {
        self.inner.linear(layer, m)
    }
    fn sublayer(&self, layer: usize, site: Sublayer) -> Option<&dyn SublayerHook> {
        self.inner.sublayer(layer, site)
    }
    fn prompt(&self) -> candle_core::Result<Option<Tensor>> {
        self.inner.prompt()
    }
    fn kv_prefix(&self) -> candle_core::Result<Option<Tensor>> {
        self.inner.kv_prefix()
    }
    fn head(&self) -> candle_core::Result<Option<Tensor>> {
        self.inner.head()
    }
    fn lm_head(&self) -> candle_core::Result<Option<Tensor>> {
        self.inner.lm_head()
    }
}

impl Trainable for WithValue {
    fn vars(&self) -> Vec<Var> {
        let mut v = self.inner.vars();
        v.push(self.value.clone());
        v
    }
    fn names(&self) -> Vec<String> {
        let mut n = self.inner.names();
        n.push(VALUE_HEAD.into());
        n
    }
    fn set_train(&mut self, train: bool) {
        self.inner.set_train(train);
    }
    fn set_dropout_seed(&self, seed: u64) {
        self.inner.set_dropout_seed(seed);
    }
    fn export(&self) -> candle_core::Result<Parsed> {
        self.inner.export()
    }
    fn start_from(&self, adapter: &crate::model::Adapter) -> Result<(), String> {
        self.inner.start_from(adapter)
    }
}

/// Generalised advantage estimation over one completion's per-token `rewards` and
/// `values`: `δ_t = r_t + γ V_{t+1} − V_t` (`V` after the last token is 0),
/// `A_t = δ_t + γλ A_{t+1}`; returns (advantages, returns = A + V).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f64, lam: f64) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0f32; n];
    let mut next = 0f64;
    for t in (0..n).rev() {
        let v_next = if t + 1 < n { values[t + 1] as f64 } else { 0.0 };
        let delta = rewards[t] as f64 + gamma * v_next - values[t] as f64;
        next = delta + gamma * lam * next;
        adv[t] = next as f32;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// PPO's loss on a mini-batch's tokens: the clipped surrogate `max(−Aρ, −A clip(ρ))` and
/// the clipped value loss `½ max((V−R)², (clip(V, V_old ± c) − R)²)`, each a token mean;
/// returns (loss, policy loss, value loss, share of tokens clipped).
#[allow(clippy::too_many_arguments)]
pub fn ppo_loss(
    lp: &Tensor,
    old_lp: &Tensor,
    values: &Tensor,
    old_values: &Tensor,
    adv: &Tensor,
    returns: &Tensor,
    s: &PpoSettings,
) -> Result<(Tensor, f64, f64, f64), TrainError> {
    let ratio = (lp - old_lp)?.exp()?;
    let pg1 = (adv.neg()? * &ratio)?;
    let pg2 = (adv.neg()? * ratio.clamp(1.0 - s.cliprange, 1.0 + s.cliprange)?)?;
    let pg = pg1.maximum(&pg2)?.mean_all()?;
    let vclip =
        (old_values + (values - old_values)?.clamp(-s.cliprange_value, s.cliprange_value)?)?;
    let v1 = (values - returns)?.sqr()?;
    let v2 = (vclip - returns)?.sqr()?;
    let vf = (v1.maximum(&v2)?.mean_all()? * 0.5)?;
    let loss = (&pg + (&vf * s.vf_coef)?)?;
    let r: Vec<f32> = ratio.to_vec1()?;
    let clipped = r
        .iter()
        .filter(|&&x| (x as f64 - 1.0).abs() > s.cliprange)
        .count() as f64
        / r.len().max(1) as f64;
    Ok((
        loss,
        pg.to_scalar::<f32>()? as f64,
        vf.to_scalar::<f32>()? as f64,
        clipped,
    ))
}

/// The adaptive controller's next coefficient (Ziegler et al.): the proportional error
/// `clip(kl / target − 1, ±0.2)` moves it by `err · n / horizon`.
pub fn adapt_kl(coef: f64, kl: f64, target: f64, n: usize) -> f64 {
    let err = (kl / target - 1.0).clamp(-0.2, 0.2);
    coef * (1.0 + err * n as f64 / 10_000.0)
}

fn state_path(dir: &std::path::Path, step: usize) -> std::path::PathBuf {
    dir.join(format!("ppo-{step}.json"))
}

/// One completion's tokens, flattened with the others in row order.
struct Flat {
    seqs: Vec<(Vec<u32>, Vec<bool>)>,
    /// Token offset of each row in the flat per-token vectors.
    offsets: Vec<usize>,
}

/// Runs (or resumes) a PPO run on the prompt rows `train`.
#[allow(clippy::too_many_arguments)]
pub fn train_ppo(
    model: &BaseModel,
    spec: &TrainSpec,
    s: &PpoSettings,
    cx: &RlContext<'_>,
    train: &[Tokenized],
    eval: &[Tokenized],
    ckpt_dir: &std::path::Path,
    ctl: &Control,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome, TrainError> {
    let inner = trainable::start(model, spec, ctl)?;
    let mut vars = WithValue::init(inner, model.config().hidden_size, spec.seed)?;
    let mut opt = AdamW::new(vars.vars(), spec.weight_decay)?;
    let pad = model.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let OnlineRun {
        mut progress,
        start,
        per_epoch,
        total,
    } = OnlineRun::resume(spec, train.len(), ckpt_dir, &vars, &mut opt)?;
    let mut kl_coef = s.kl_coef;
    if start > 0 && s.target_kl.is_some() {
        let p = state_path(ckpt_dir, start);
        let text = std::fs::read(&p)
            .map_err(|e| TrainError::Checkpoint(format!("reading ppo-{start}.json: {e}")))?;
        kl_coef = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["kl_coef"].as_f64())
            .ok_or_else(|| TrainError::Checkpoint(format!("ppo-{start}.json lacks kl_coef")))?;
    }
    let params = RolloutParams {
        temperature: s.temperature,
        top_p: s.top_p,
        max_new_tokens: s.max_new_tokens,
    };
    let tk = &model.tokenizer;
    let started = std::time::Instant::now();
    let mut tokens_done = 0usize;
    for step in start..total {
        if ctl.cancel.load(Ordering::SeqCst) {
            return Ok(progress.stop(step, &vars, &opt, ctl, emit));
        }
        let step_started = std::time::Instant::now();
        let rows = step_rows(spec, train, per_epoch, step);
        vars.set_train(false);
        let rolled = roll(model, &vars, cx, &rows, 1, step, spec.seed, &params)?;
        if ctl.cancel.load(Ordering::SeqCst) {
            return Ok(progress.stop(step, &vars, &opt, ctl, emit));
        }
        let scores: Vec<f64> = rolled
            .iter()
            .map(|r| {
                let eos = r.completion.last().is_some_and(|&t| tk.is_eos(t));
                r.reward - if eos { 0.0 } else { s.missing_eos_penalty }
            })
            .collect();
        let mut flat = Flat {
            seqs: Vec::new(),
            offsets: Vec::new(),
        };
        let mut at = 0;
        for r in &rolled {
            let mut ids = r.row.ids.clone();
            let mut mask = vec![false; ids.len()];
            ids.extend(&r.completion);
            mask.resize(ids.len(), true);
            flat.offsets.push(at);
            at += r.completion.len();
            flat.seqs.push((ids, mask));
        }
        let all: Vec<(&[u32], &[bool])> = flat.seqs.iter().map(|(i, m)| (&i[..], &m[..])).collect();
        let b = SeqBatch::new(&all, pad)?;
        tokens_done += b.tokens;
        // What the rollouts were sampled under: log-probabilities and values, and the
        // reference's log-probabilities.
        let (lp, _, h) = token_outputs(model, Some(&vars), &b, false)?;
        let old_lp: Vec<f32> = lp.detach().to_vec1()?;
        let old_v: Vec<f32> = vars.values(&h.detach())?.to_vec1()?;
        let ref_lp: Vec<f32> = token_logps(model, None, &b, false)?.0.to_vec1()?;
        // Per-token rewards: −β (lp − ref), the score added at the last token; GAE.
        let (mut adv, mut ret) = (Vec::with_capacity(at), Vec::with_capacity(at));
        let mut kl_sum = 0f64;
        for (r, (&off, score)) in flat.offsets.iter().zip(&scores).enumerate() {
            let n = b.counts[r];
            let kl: Vec<f32> = (off..off + n).map(|t| old_lp[t] - ref_lp[t]).collect();
            kl_sum += kl.iter().map(|&k| k as f64).sum::<f64>();
            let mut rew: Vec<f32> = kl.iter().map(|k| -(kl_coef as f32) * k).collect();
            if let Some(last) = rew.last_mut() {
                *last += *score as f32;
            }
            let (a, rt) = gae(&rew, &old_v[off..off + n], s.gamma, s.lam);
            adv.extend(a);
            ret.extend(rt);
        }
        if s.whiten_advantages && adv.len() > 1 {
            let n = adv.len() as f64;
            let mean = adv.iter().map(|&a| a as f64).sum::<f64>() / n;
            let var = adv.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
            let sd = var.sqrt() + 1e-8;
            for a in &mut adv {
                *a = ((*a as f64 - mean) / sd) as f32;
            }
        }
        let lr = lr_at(
            spec.learning_rate,
            spec.schedule,
            spec.warmup_steps,
            total,
            step,
        );
        vars.set_train(true);
        let mut sums = [0f64; 4];
        let mut updates = 0usize;
        let mut norm = 0f64;
        let mut idx: Vec<usize> = (0..rolled.len()).collect();
        let mut rng = StdRng::seed_from_u64(spec.seed ^ (step as u64).wrapping_mul(0x2545_F491));
        let mbs = s.num_mini_batches.clamp(1, rolled.len().max(1));
        for _ in 0..s.ppo_epochs.max(1) {
            idx.shuffle(&mut rng);
            for chunk in idx.chunks(rolled.len().div_ceil(mbs)) {
                if ctl.cancel.load(Ordering::SeqCst) {
                    return Ok(Outcome::Cancelled);
                }
                let mb: Vec<(&[u32], &[bool])> = chunk.iter().map(|&r| all[r]).collect();
                let mbb = SeqBatch::new(&mb, pad)?;
                let pick = |v: &[f32]| -> Vec<f32> {
                    chunk
                        .iter()
                        .flat_map(|&r| v[flat.offsets[r]..flat.offsets[r] + b.counts[r]].to_vec())
                        .collect()
                };
                let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &Device::Cpu);
                let (lp, ent, h) = token_outputs(model, Some(&vars), &mbb, true)?;
                let values = vars.values(&h)?;
                let (loss, pg, vf, clip) = ppo_loss(
                    &lp,
                    &t(pick(&old_lp))?,
                    &values,
                    &t(pick(&old_v))?,
                    &t(pick(&adv))?,
                    &t(pick(&ret))?,
                    s,
                )?;
                let l = loss.to_scalar::<f32>()? as f64;
                if !l.is_finite() {
                    return Err(TrainError::NanLoss { step: step + 1 });
                }
                for (acc, x) in sums.iter_mut().zip([pg, vf, clip, ent.unwrap_or_default()]) {
                    *acc += x;
                }
                updates += 1;
                let grads = optim::collect(&loss.backward()?, &vars.vars())?;
                let (grads, n) = optim::mean_clipped(Some(grads), 1, spec.max_grad_norm)?;
                norm = n;
                if !norm.is_finite() {
                    return Err(TrainError::NanLoss { step: step + 1 });
                }
                opt.apply(&grads, lr)?;
            }
        }
        let n = rolled.len().max(1) as f64;
        let u = updates.max(1) as f64;
        let kl = kl_sum / n;
        let metrics = Metrics::from([
            ("reward".to_string(), scores.iter().sum::<f64>() / n),
            ("kl".to_string(), kl),
            ("kl_coef".to_string(), kl_coef),
            ("policy_loss".to_string(), sums[0] / u),
            ("value_loss".to_string(), sums[1] / u),
            ("clip_ratio".to_string(), sums[2] / u),
            ("entropy".to_string(), sums[3] / u),
            (
                "completion_length".to_string(),
                rolled.iter().map(|r| r.completion.len()).sum::<usize>() as f64 / n,
            ),
        ]);
        if let Some(target) = s.target_kl {
            kl_coef = adapt_kl(kl_coef, kl, target, rolled.len());
        }
        let done = step + 1;
        let secs = started.elapsed().as_secs_f64();
        emit(TrainEvent::Step {
            step: done,
            total_steps: total,
            epoch: done as f64 / per_epoch as f64,
            train_loss: (sums[0] + s.vf_coef * sums[1]) / u,
            learning_rate: lr,
            grad_norm: norm,
            tokens_per_second: tokens_done as f64 / secs.max(1e-9),
            eta_seconds: secs / (done - start) as f64 * (total - done) as f64,
            step_tokens: b.tokens,
            step_seconds: step_started.elapsed().as_secs_f64(),
            metrics,
        });
        if s.target_kl.is_some() {
            let state = serde_json::json!({ "kl_coef": kl_coef }).to_string();
            std::fs::create_dir_all(ckpt_dir)
                .map_err(|e| TrainError::Checkpoint(format!("creating the job's folder: {e}")))?;
            crate::store::atomic_write(&state_path(ckpt_dir, done), state.as_bytes())
                .map_err(|e| TrainError::Checkpoint(format!("writing ppo-{done}.json: {e}")))?;
            let _ = std::fs::remove_file(state_path(
                ckpt_dir,
                step.saturating_sub(spec.checkpoint_every.max(1) * ctl.keep_checkpoints.max(1)),
            ));
        }
        let eval_result = if !eval.is_empty() && progress.eval_due(spec, done) {
            vars.set_train(false);
            Some(evaluate_graded(
                model, &vars, cx, eval, step, spec.seed, &params,
            )?)
        } else {
            None
        };
        if progress.end_step(done, eval_result, &vars, &opt, ctl, emit)? {
            break;
        }
    }
    progress.finish(Box::new(vars))
}
