//! What a run is asked to do: the method, the objective with its settings and the
//! optimisation (`TrainSpec`), validated by the caller; sizes derived from them (the
//! adapter's and the trained parameters' bytes) for quotas and memory checks.

use serde::{Deserialize, Serialize};

use super::{methods::MethodSpec, optim::Schedule};
use crate::model::{config::LlamaConfig, Module};

/// Everything a run needs to know, validated by the caller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    /// The method; LoRA's own settings are the fields below (`rank` to `use_dora`).
    #[serde(default)]
    pub method: MethodSpec,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Vec<String>,
    pub use_rslora: bool,
    /// DoRA: LoRA plus a magnitude per output feature.
    #[serde(default)]
    pub use_dora: bool,
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub learning_rate: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub max_seq_len: usize,
    pub seed: u64,
    /// Evaluate every N optimizer steps (0: at the end of each epoch).
    pub eval_every: usize,
    /// Stop after this many evaluations without improvement (0: never), keeping the best.
    pub patience: usize,
    pub checkpoint_every: usize,
    /// What is optimised (SFT when absent: older stored specs).
    #[serde(default)]
    pub objective: Objective,
    /// Also train a replaced LM head (PEFT's `modules_to_save: ["lm_head"]`), starting from
    /// the base's.
    #[serde(default)]
    pub train_lm_head: bool,
}

/// LoRA r=8, alpha 16 on all seven projections, 3 epochs of batch 4, AdamW at 2e-4 with
/// a constant rate, no evaluation: a base for tests and tools to change fields of.
/// (`CreateJob`'s own defaults are `grpc/job_request.rs`'s, per method.)
impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            method: MethodSpec::Lora,
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Module::ALL
                .iter()
                .map(|m| m.hf_name().to_string())
                .collect(),
            use_rslora: false,
            use_dora: false,
            epochs: 3,
            batch_size: 4,
            grad_accum: 1,
            learning_rate: 2e-4,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            max_seq_len: 512,
            seed: 0,
            eval_every: 0,
            patience: 0,
            checkpoint_every: 100,
            objective: Objective::Sft,
            train_lm_head: false,
        }
    }
}

/// What the trainer optimises.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "objective", rename_all = "snake_case")]
pub enum Objective {
    /// Cross-entropy of the next token on the trained tokens, through the LM head.
    #[default]
    Sft,
    /// Cross-entropy of a classification head `(labels, hidden)`, trained beside the
    /// method's parameters, on each row's last token; `labels` in the head's output order.
    Classification { labels: Vec<String> },
    /// A reward model: a scalar head on the last token trained on preference pairs with
    /// `-log σ(r_chosen − r_rejected − margin)`, plus
    /// `center_rewards_coefficient · mean((r_chosen + r_rejected)²)` (TRL's reward
    /// centring; 0: off).
    RewardModel {
        #[serde(default)]
        center_rewards_coefficient: f64,
    },
    /// Direct preference optimisation against the reference (the base, adapter off).
    Dpo(DpoSettings),
    /// GRPO: completions sampled by the serving engine with the policy, scored by graders,
    /// advantages normalised within each prompt's group (`train::rl`).
    Grpo(GrpoSettings),
    /// PPO: a value head trained beside the policy, per-token KL penalty against the
    /// reference, GAE, clipped surrogate and value losses (`train::ppo`).
    Ppo(PpoSettings),
}

/// PPO's settings (the names of TRL's `PPOConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PpoSettings {
    /// The per-token KL penalty's weight (the start, when adaptive).
    pub kl_coef: f64,
    /// Adapt `kl_coef` towards this KL per completion (Ziegler et al.'s controller,
    /// horizon 10 000); none: fixed.
    pub target_kl: Option<f64>,
    pub gamma: f64,
    pub lam: f64,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub ppo_epochs: usize,
    pub num_mini_batches: usize,
    pub whiten_advantages: bool,
    /// Subtracted from the score of a completion that did not end with EOS (0: off).
    pub missing_eos_penalty: f64,
    pub temperature: f32,
    pub top_p: f32,
    /// The response-length cap.
    pub max_new_tokens: u32,
    pub grader: super::graders::GraderSpec,
}

/// GRPO's settings (TRL's `GRPOConfig` names where it has them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrpoSettings {
    /// Completions per prompt (≥ 2): the group its advantages are normalised in.
    pub num_generations: usize,
    /// The KL weight against the reference (the base, adapter off); 0: no KL term.
    pub beta: f64,
    /// The surrogate's clip range ε: the ratio is clipped to [1 − ε, 1 + ε].
    pub epsilon: f64,
    /// Optimiser steps per batch of rollouts (μ); above 1 the clip takes effect.
    pub num_iterations: usize,
    /// How a completion's advantage is taken against its group.
    #[serde(default)]
    pub advantage: Advantage,
    /// Sampling of the rollouts.
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: u32,
    /// The reward of a completion: a grader's score in [0, 1].
    pub grader: super::graders::GraderSpec,
}

/// A GRPO completion's advantage against the other completions of its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Advantage {
    /// GRPO's: `(r − mean) / (std + 1e-4)` over the group.
    #[default]
    Group,
    /// RLOO's leave-one-out baseline: `r − mean of the others' rewards`, not scaled.
    Rloo,
}

/// DPO's settings (TRL's `DPOConfig` names).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoSettings {
    /// The KL weight β: how far the policy may move from the reference (> 0).
    pub beta: f64,
    pub loss_type: DpoLoss,
    /// cDPO's label smoothing: the assumed share of flipped preference labels, in [0, 0.5).
    #[serde(default)]
    pub label_smoothing: f64,
}

/// DPO's loss on `h = (log π/π_ref)(chosen) − (log π/π_ref)(rejected)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    /// `−log σ(βh)` (with label smoothing ε: `−(1−ε) log σ(βh) − ε log σ(−βh)`).
    Sigmoid,
    /// IPO: `(h − 1/(2β))²`.
    Ipo,
    /// SLiC's hinge: `max(0, 1 − βh)`.
    Hinge,
}

impl DpoLoss {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "sigmoid" => Some(Self::Sigmoid),
            "ipo" => Some(Self::Ipo),
            "hinge" => Some(Self::Hinge),
            _ => None,
        }
    }
}

impl Objective {
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Sft => "sft",
            Objective::Classification { .. } => "classification",
            Objective::RewardModel { .. } => "reward_model",
            Objective::Dpo(_) => "dpo",
            Objective::Grpo(_) => "grpo",
            Objective::Ppo(_) => "ppo",
        }
    }

    /// Whether the objective learns from its own samples, on a prompts dataset.
    pub fn online(&self) -> bool {
        self.grader().is_some()
    }

    /// An online objective's grader, and its rollouts' length cap.
    pub fn grader(&self) -> Option<(&super::graders::GraderSpec, u32)> {
        match self {
            Objective::Grpo(s) => Some((&s.grader, s.max_new_tokens)),
            Objective::Ppo(s) => Some((&s.grader, s.max_new_tokens)),
            _ => None,
        }
    }

    /// Whether the objective trains on preference pairs (prompt, chosen, rejected).
    pub fn on_pairs(&self) -> bool {
        matches!(self, Objective::RewardModel { .. } | Objective::Dpo(_))
    }

    /// The classification head's floats, if the objective trains one.
    pub fn head_floats(&self, cfg: &LlamaConfig) -> usize {
        match self {
            Objective::Sft | Objective::Dpo(_) | Objective::Grpo(_) | Objective::Ppo(_) => 0,
            Objective::Classification { labels } => labels.len() * cfg.hidden_size,
            Objective::RewardModel { .. } => cfg.hidden_size,
        }
    }
}

impl TrainSpec {
    /// What of this spec trains on the CPU only, if anything: the request's field that asks
    /// for it and the refusal. On a GPU (`--device cuda:N`) graftd trains LoRA and DoRA with
    /// the SFT objective so far; the other methods' parameters, heads and objectives build
    /// their tensors on the CPU.
    pub fn cpu_only(&self) -> Option<(&'static str, String)> {
        let (field, what) = if !matches!(self.method, MethodSpec::Lora) {
            ("method", "this method")
        } else if !matches!(self.objective, Objective::Sft) {
            ("objective", "this objective")
        } else if self.train_lm_head {
            ("train_lm_head", "a trained LM head")
        } else {
            return None;
        };
        Some((
            field,
            format!(
                "{what} trains on the CPU only; on a GPU graftd trains LoRA (and DoRA) with \
                 the SFT objective"
            ),
        ))
    }

    pub fn modules(&self) -> Vec<Module> {
        self.targets
            .iter()
            .filter_map(|t| Module::from_hf_name(t))
            .collect()
    }

    /// The bytes of tensor data the trained adapter will store (for LoRA f32 `lora_A` and
    /// `lora_B`, and DoRA's magnitude, for every target module of every layer), known
    /// before training starts.
    pub fn adapter_bytes(&self, cfg: &LlamaConfig) -> u64 {
        (self.output_floats(cfg) * std::mem::size_of::<f32>()) as u64 + self.method_bytes(cfg)
    }

    /// The trained output layers' floats: a classification head, a replaced LM head.
    fn output_floats(&self, cfg: &LlamaConfig) -> usize {
        let lm = if self.train_lm_head {
            cfg.vocab_size * cfg.hidden_size
        } else {
            0
        };
        self.objective.head_floats(cfg) + lm
    }

    fn method_bytes(&self, cfg: &LlamaConfig) -> u64 {
        if let Some(n) = self.method.adapter_floats(cfg) {
            return (n * std::mem::size_of::<f32>()) as u64;
        }
        let per_layer: usize = self
            .modules()
            .iter()
            .map(|m| {
                let (out, inp) = m.shape(cfg);
                self.rank * (out + inp) + if self.use_dora { out } else { 0 }
            })
            .sum();
        (per_layer * cfg.num_layers * std::mem::size_of::<f32>()) as u64
    }
}

impl TrainSpec {
    /// The bytes of the trained parameters (what a checkpoint holds three times over): the
    /// adapter's own for LoRA, prompt tuning and P-tuning v2; more for the methods with an
    /// encoder, whose output is what is stored.
    pub fn trainable_bytes(&self, cfg: &LlamaConfig) -> u64 {
        let head = (self.output_floats(cfg) * std::mem::size_of::<f32>()) as u64;
        match self.method.trainable_floats(cfg) {
            Some(n) => (n * std::mem::size_of::<f32>()) as u64 + head,
            None => self.adapter_bytes(cfg),
        }
    }
}
