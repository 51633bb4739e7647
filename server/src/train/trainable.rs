//! What the trainer trains: a [`Trainable`] is an adapter method's parameters as named
//! `Var`s, the hooks they provide to the differentiable forward ([`TensorAdapter`]), and
//! `export()`, which turns the current values into the files' content ([`Parsed`]). The
//! objective (SFT cross-entropy, or a classification head's: `head_vars` wraps any method's
//! parameters with the head) is the trainer's, beside it: methods and objectives combine
//! freely.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use super::{
    full_vars::FullVars,
    head_vars::HeadVars,
    lora_vars::LoraVars,
    methods::MethodSpec,
    prompt_vars::PromptVars,
    trainer::{Control, Objective, TrainError, TrainSpec},
    weight_vars::{BottleneckVars, Ia3Vars},
};
use crate::{
    adapters::formats::{Details, Parsed},
    model::{adapter::TensorAdapter, Adapter, BaseModel, Llama},
};

pub trait Trainable: TensorAdapter + Send {
    /// Every trainable variable, in a fixed order.
    fn vars(&self) -> Vec<Var>;
    /// Stable names for checkpoints, parallel to [`Self::vars`].
    fn names(&self) -> Vec<String>;
    /// Training (dropout on) or evaluation.
    fn set_train(&mut self, _train: bool) {}
    /// The seed of the next forward's random masks (from the job's seed, the step and the
    /// micro-batch), so a resumed run draws what the uninterrupted one drew.
    fn set_dropout_seed(&self, _seed: u64) {}
    /// The current values as an adapter's files' content.
    fn export(&self) -> candle_core::Result<Parsed>;
    /// The model the forward runs instead of the base, when the method trains the model's
    /// own weights (full fine-tuning); its result is that model, not [`Self::export`].
    fn model(&self) -> Option<&Llama> {
        None
    }
    /// The classification head's labels, when a head is trained.
    fn labels(&self) -> Option<&[String]> {
        None
    }

    /// Sets the method's parameters to a stored adapter's (a job's `init_adapter`); the
    /// error says why they do not fit. Only LoRA can start from an adapter.
    fn start_from(&self, _adapter: &Adapter) -> Result<(), String> {
        Err("only LoRA parameters can start from an adapter".into())
    }

    /// Named tensors (for checkpoints).
    fn tensors(&self) -> HashMap<String, Tensor> {
        self.names()
            .into_iter()
            .zip(self.vars())
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }

    /// Restores values saved by [`Self::tensors`].
    fn load(&self, saved: &HashMap<String, Tensor>) -> Result<(), String> {
        for (n, v) in self.names().into_iter().zip(self.vars()) {
            let t = saved
                .get(&n)
                .ok_or_else(|| format!("checkpoint lacks {n}"))?;
            v.set(t).map_err(|e| format!("checkpoint {n}: {e}"))?;
        }
        Ok(())
    }
}

/// The spec's parameters as a run starts them: fresh ([`init`]), then set to the adapter's
/// when the job continues one (`ctl.init`), or to the values `ctl.start_values` names.
pub fn start(
    model: &BaseModel,
    spec: &TrainSpec,
    ctl: &Control,
) -> Result<Box<dyn Trainable>, TrainError> {
    let vars = init(model, spec)?;
    if let Some(a) = ctl.init.as_deref() {
        vars.start_from(a)
            .map_err(|e| TrainError::Checkpoint(format!("init_adapter: {e}")))?;
    }
    if let Some(values) = ctl.start_values.as_deref() {
        vars.load(values)
            .map_err(|e| TrainError::Checkpoint(format!("start values: {e}")))?;
    }
    Ok(vars)
}

/// Fresh parameters of the spec's method alone.
fn init_method(model: &BaseModel, spec: &TrainSpec) -> candle_core::Result<Box<dyn Trainable>> {
    let dev = model.llama.device();
    if let Some((_, refusal)) = spec.cpu_only().filter(|_| !dev.is_cpu()) {
        return Err(candle_core::Error::Msg(refusal));
    }
    Ok(match &spec.method {
        MethodSpec::Lora => Box::new(LoraVars::init(
            dev,
            model.config(),
            spec.use_dora.then_some(&model.llama.weights),
            &spec.modules(),
            spec.rank,
            spec.alpha,
            spec.use_rslora,
            spec.dropout,
            spec.seed,
        )?),
        MethodSpec::Ia3 {
            target_modules,
            feedforward_modules,
        } => Box::new(Ia3Vars::init(
            model.config(),
            target_modules,
            feedforward_modules,
        )?),
        MethodSpec::Bottleneck { settings, .. } => {
            Box::new(BottleneckVars::init(model.config(), settings, spec.seed)?)
        }
        MethodSpec::Full(sel) => Box::new(FullVars::init(&model.llama, sel)?),
        MethodSpec::Head => Box::new(NoVars {
            layers: model.config().num_layers,
        }),
        m => Box::new(PromptVars::init(model, m, spec.seed)?),
    })
}

/// The device a run's parameters are on (the CPU for a run with none).
pub fn device_of(vars: &dyn Trainable) -> candle_core::Device {
    vars.vars()
        .first()
        .map_or(candle_core::Device::Cpu, |v| v.device().clone())
}

/// The one output of a reward model's head (transformers' `id2label` for `num_labels` 1).
pub const REWARD_LABEL: &str = "LABEL_0";

/// Fresh parameters of the spec's method, with a replaced LM head when the spec trains one
/// and, for the classification and reward-model objectives, a head.
pub fn init(model: &BaseModel, spec: &TrainSpec) -> candle_core::Result<Box<dyn Trainable>> {
    let mut method = init_method(model, spec)?;
    if spec.train_lm_head {
        method = Box::new(HeadVars::init_lm(
            method,
            &model.llama.weights.lm_head.weight()?,
        )?);
    }
    Ok(match &spec.objective {
        Objective::Sft | Objective::Dpo(_) | Objective::Grpo(_) | Objective::Ppo(_) => method,
        Objective::RewardModel { .. } => Box::new(HeadVars::init(
            method,
            vec![REWARD_LABEL.into()],
            model.config().hidden_size,
            spec.seed,
        )?),
        Objective::Classification { labels } => Box::new(HeadVars::init(
            method,
            labels.clone(),
            model.config().hidden_size,
            spec.seed,
        )?),
    })
}

/// No adapter parameters (the `head` method: a classification head alone). It exports as
/// PEFT stores a head-only adapter: LoRA without target modules.
struct NoVars {
    layers: usize,
}

impl TensorAdapter for NoVars {}

impl Trainable for NoVars {
    fn vars(&self) -> Vec<Var> {
        Vec::new()
    }
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
    fn export(&self) -> candle_core::Result<Parsed> {
        Ok(Parsed {
            details: Details::Lora {
                rank: 8,
                alpha: 8.0,
                target_modules: Vec::new(),
                use_rslora: false,
                use_dora: false,
            },
            adapter: crate::model::Adapter::new(self.layers),
            prompt: None,
        })
    }
}
