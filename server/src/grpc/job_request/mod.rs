//! `CreateJobRequest` to a job: the method, the objective and the hyper-parameters, each
//! checked and defaulted (INVALID_ARGUMENT naming the field); the method's settings against
//! the model are checked by `train::methods::check`. `objectives`: the objective's
//! settings (DPO, GRPO, PPO, graders, an eval grader).

mod objectives;

use graft_proto::v1::{self as pb, create_job_request::MethodConfig};

use super::error::ApiError;
use crate::{
    adapters::formats::BnSettings,
    model::{bottleneck::Activation, lora::Module},
    train::{
        graders::{EvalGrader, GraderSpec, LengthUnit, Weighted},
        jobs::{JobSpec, NewJob},
        methods::{Encoder, FullSelection, MethodSpec, PromptInit},
        optim::Schedule,
        trainer::{
            Advantage, DpoLoss, DpoSettings, GrpoSettings, Objective, PpoSettings, TrainSpec,
        },
    },
};
pub use objectives::dpo_settings;
use objectives::{eval_grader_from, objective_from};
/// Virtual tokens of a prompt method when the request leaves them out (PEFT's examples use
/// 8-30; 20 is the common choice).
const DEFAULT_VIRTUAL_TOKENS: u32 = 20;

/// The method a request names, its settings checked and defaulted. Settings given for
/// another method than the one named are refused rather than ignored.
fn method_from(req: &pb::CreateJobRequest) -> Result<MethodSpec, ApiError> {
    let name = if req.method.is_empty() {
        "lora"
    } else {
        req.method.as_str()
    };
    let config_name = match &req.method_config {
        None => None,
        Some(MethodConfig::Lora(_)) => Some("lora"),
        Some(MethodConfig::PromptTuning(_)) => Some("prompt_tuning"),
        Some(MethodConfig::PTuning(_)) => Some("p_tuning"),
        Some(MethodConfig::PrefixTuning(_)) => Some("prefix_tuning"),
        Some(MethodConfig::PTuningV2(_)) => Some("p_tuning_v2"),
        Some(MethodConfig::Ia3(_)) => Some("ia3"),
        Some(MethodConfig::Bottleneck(_)) => Some("bottleneck"),
        Some(MethodConfig::Full(_)) => Some("full"),
    };
    if let Some(c) = config_name.filter(|c| *c != name) {
        return Err(ApiError::invalid(
            c,
            format!("settings for {c} but the method is {name:?}"),
        ));
    }
    let tokens = |v: Option<u32>, field: &str| -> Result<usize, ApiError> {
        match v.unwrap_or(DEFAULT_VIRTUAL_TOKENS) {
            0 => Err(ApiError::invalid(field, "must be at least 1")),
            n => Ok(n as usize),
        }
    };
    let size = |v: Option<u32>, default: usize, field: &str| -> Result<usize, ApiError> {
        match v {
            Some(0) => Err(ApiError::invalid(field, "must be at least 1")),
            Some(n) => Ok(n as usize),
            None => Ok(default),
        }
    };
    Ok(match (name, req.method_config.clone()) {
        ("lora", _) => MethodSpec::Lora,
        ("prompt_tuning", c) => {
            let c = match c {
                Some(MethodConfig::PromptTuning(c)) => c,
                _ => Default::default(),
            };
            let init = match (c.init.as_str(), c.init_text.is_empty()) {
                ("" | "random", true) => PromptInit::Random,
                ("vocab", true) => PromptInit::Vocab,
                ("text", false) => PromptInit::Text { text: c.init_text },
                ("text", true) => {
                    return Err(ApiError::invalid(
                        "prompt_tuning.init_text",
                        "required with init \"text\"",
                    ))
                }
                ("" | "random" | "vocab", false) => {
                    return Err(ApiError::invalid(
                        "prompt_tuning.init_text",
                        "only used with init \"text\"",
                    ))
                }
                (s, _) => {
                    return Err(ApiError::invalid(
                        "prompt_tuning.init",
                        format!("{s:?}; expected random, text or vocab"),
                    ))
                }
            };
            MethodSpec::PromptTuning {
                num_virtual_tokens: tokens(c.num_virtual_tokens, "prompt_tuning.num_virtual_tokens")?,
                init,
            }
        }
        ("p_tuning", c) => {
            let c = match c {
                Some(MethodConfig::PTuning(c)) => c,
                _ => Default::default(),
            };
            let encoder = match c.encoder.as_str() {
                "" | "mlp" => Encoder::Mlp,
                "lstm" => Encoder::Lstm,
                s => {
                    return Err(ApiError::invalid(
                        "p_tuning.encoder",
                        format!("{s:?}; expected mlp or lstm"),
                    ))
                }
            };
            MethodSpec::PTuning {
                num_virtual_tokens: tokens(c.num_virtual_tokens, "p_tuning.num_virtual_tokens")?,
                encoder,
                // 0: the model's hidden size, resolved by the service.
                encoder_hidden_size: size(c.encoder_hidden_size, 0, "p_tuning.encoder_hidden_size")?,
                encoder_num_layers: size(c.encoder_num_layers, 2, "p_tuning.encoder_num_layers")?,
            }
        }
        ("prefix_tuning", c) => {
            let c = match c {
                Some(MethodConfig::PrefixTuning(c)) => c,
                _ => Default::default(),
            };
            MethodSpec::PrefixTuning {
                num_virtual_tokens: tokens(c.num_virtual_tokens, "prefix_tuning.num_virtual_tokens")?,
                encoder_hidden_size: size(
                    c.encoder_hidden_size,
                    0,
                    "prefix_tuning.encoder_hidden_size",
                )?,
            }
        }
        ("p_tuning_v2", c) => {
            let c = match c {
                Some(MethodConfig::PTuningV2(c)) => c,
                _ => Default::default(),
            };
            MethodSpec::PTuningV2 {
                num_virtual_tokens: tokens(c.num_virtual_tokens, "p_tuning_v2.num_virtual_tokens")?,
            }
        }
        ("ia3", c) => {
            let c = match c {
                Some(MethodConfig::Ia3(c)) => c,
                _ => Default::default(),
            };
            ia3_from(c)?
        }
        ("bottleneck", c) => {
            let c = match c {
                Some(MethodConfig::Bottleneck(c)) => c,
                _ => Default::default(),
            };
            bottleneck_from(c)?
        }
        ("head", _) => MethodSpec::Head,
        ("full", c) => {
            let c = match c {
                Some(MethodConfig::Full(c)) => c,
                _ => Default::default(),
            };
            let mut layers: Vec<usize> = c.layers.iter().map(|&l| l as usize).collect();
            layers.sort_unstable();
            layers.dedup();
            MethodSpec::Full(FullSelection {
                layers,
                embeddings: c.embeddings.unwrap_or(true),
                norms: c.norms.unwrap_or(true),
                // Resolved from the base by the service.
                tied: false,
            })
        }
        (other, _) => {
            return Err(ApiError::invalid(
                "method",
                format!("{other:?} is not supported; expected lora, ia3, bottleneck, prompt_tuning, p_tuning, prefix_tuning, p_tuning_v2, full or head (with the classification objective)"),
            ))
        }
    })
}

fn ia3_from(c: pb::Ia3Method) -> Result<MethodSpec, ApiError> {
    let targets: Vec<String> = if c.target_modules.is_empty() {
        ["k_proj", "v_proj", "down_proj"].map(String::from).to_vec()
    } else if c.target_modules == ["all-linear"] {
        Module::ALL
            .iter()
            .map(|m| m.hf_name().to_string())
            .collect()
    } else {
        c.target_modules
    };
    for t in &targets {
        if Module::from_hf_name(t).is_none() {
            return Err(ApiError::invalid(
                "ia3.target_modules",
                format!("{t:?} is not a module of this model"),
            ));
        }
    }
    let feedforward = if c.feedforward_modules.is_empty() {
        targets
            .iter()
            .filter(|t| *t == "down_proj")
            .cloned()
            .collect()
    } else {
        c.feedforward_modules
    };
    if let Some(f) = feedforward.iter().find(|f| !targets.contains(f)) {
        return Err(ApiError::invalid(
            "ia3.feedforward_modules",
            format!("{f:?} is not in target_modules; feedforward_modules must be a subset of them"),
        ));
    }
    Ok(MethodSpec::Ia3 {
        target_modules: targets,
        feedforward_modules: feedforward,
    })
}

/// A bottleneck job's settings; a size is turned into the model's reduction factor by
/// [`MethodSpec::resolve`].
fn bottleneck_from(c: pb::BottleneckMethod) -> Result<MethodSpec, ApiError> {
    let mut s = BnSettings::houlsby("graft");
    let mut size = None;
    match (c.reduction_factor, c.bottleneck_size) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "bottleneck.bottleneck_size",
                "give reduction_factor or bottleneck_size, not both",
            ))
        }
        (Some(rf), None) if !(rf.is_finite() && rf > 0.0) => {
            return Err(ApiError::invalid(
                "bottleneck.reduction_factor",
                format!("{rf} must be > 0"),
            ))
        }
        (Some(rf), None) => s.reduction_factor = rf,
        (None, Some(0)) => {
            return Err(ApiError::invalid(
                "bottleneck.bottleneck_size",
                "must be at least 1",
            ))
        }
        (None, Some(n)) => size = Some(n as usize),
        (None, None) => {}
    }
    if !c.non_linearity.is_empty() {
        if Activation::parse(&c.non_linearity).is_none() {
            return Err(ApiError::invalid(
                "bottleneck.non_linearity",
                format!("{:?} is not supported (swish, relu, gelu, gelu_new, tanh, sigmoid, leakyrelu, linear)", c.non_linearity),
            ));
        }
        s.non_linearity = c.non_linearity.to_ascii_lowercase();
    }
    (s.after_attention, s.after_ffn) = match c.placement.as_str() {
        "" | "both" => (true, true),
        "after_attention" => (true, false),
        "after_ffn" => (false, true),
        p => {
            return Err(ApiError::invalid(
                "bottleneck.placement",
                format!("{p:?}; expected after_attention, after_ffn or both"),
            ))
        }
    };
    if !s.after_attention {
        // Pfeiffer's placement: the residual added before the adapter (SeqBnConfig).
        s.original_ln_before = true;
    }
    Ok(MethodSpec::Bottleneck {
        settings: s,
        bottleneck_size: size,
    })
}

/// Request -> job, with every hyper-parameter checked and defaults filled in.
pub(crate) fn job_from(req: &pb::CreateJobRequest) -> Result<NewJob, ApiError> {
    let method = method_from(req)?;
    if req.dataset.is_empty() {
        return Err(ApiError::invalid("dataset", "required"));
    }
    if req.adapter_name.is_empty() {
        return Err(ApiError::invalid("adapter_name", "required"));
    }
    let l = match &req.method_config {
        Some(MethodConfig::Lora(l)) => l.clone(),
        _ => pb::LoraMethod::default(),
    };
    let h = req.hyperparameters.clone().unwrap_or_default();
    let rank = l.r.unwrap_or(8) as usize;
    if rank == 0 {
        return Err(ApiError::invalid("lora.r", "must be at least 1"));
    }
    let alpha = l.alpha.unwrap_or(16.0);
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(ApiError::invalid(
            "lora.alpha",
            format!("{alpha} must be > 0"),
        ));
    }
    let dropout = l.dropout.unwrap_or(0.0);
    if !(0.0..1.0).contains(&dropout) {
        return Err(ApiError::invalid(
            "lora.dropout",
            format!("{dropout} is outside [0, 1)"),
        ));
    }
    let targets: Vec<String> = if l.target_modules.is_empty() || l.target_modules == ["all-linear"]
    {
        Module::ALL
            .iter()
            .map(|m| m.hf_name().to_string())
            .collect()
    } else {
        for t in &l.target_modules {
            if Module::from_hf_name(t).is_none() {
                return Err(ApiError::invalid(
                    "lora.target_modules",
                    format!("{t:?} is not a module of this model"),
                ));
            }
        }
        l.target_modules.clone()
    };
    let pos = |v: Option<u32>, d: u32, f: &str| -> Result<usize, ApiError> {
        match v.unwrap_or(d) {
            0 => Err(ApiError::invalid(f, "must be at least 1")),
            n => Ok(n as usize),
        }
    };
    let epochs = pos(h.epochs, 3, "hyperparameters.epochs")?;
    let batch_size = pos(h.batch_size, 4, "hyperparameters.batch_size")?;
    let grad_accum = pos(
        h.gradient_accumulation,
        1,
        "hyperparameters.gradient_accumulation",
    )?;
    let lr = h.learning_rate.unwrap_or(method.default_learning_rate());
    if !(lr.is_finite() && lr > 0.0) {
        return Err(ApiError::invalid(
            "hyperparameters.learning_rate",
            format!("{lr} must be > 0"),
        ));
    }
    let schedule = match h.lr_scheduler.as_str() {
        "" => Schedule::Linear,
        s => Schedule::parse(s).ok_or_else(|| {
            ApiError::invalid(
                "hyperparameters.lr_scheduler",
                format!("{s:?}; expected constant, linear or cosine"),
            )
        })?,
    };
    let wd = h.weight_decay.unwrap_or(0.0);
    if !(wd.is_finite() && wd >= 0.0) {
        return Err(ApiError::invalid(
            "hyperparameters.weight_decay",
            format!("{wd} must be >= 0"),
        ));
    }
    let clip = h.max_grad_norm.unwrap_or(1.0);
    if !(clip.is_finite() && clip >= 0.0) {
        return Err(ApiError::invalid(
            "hyperparameters.max_grad_norm",
            format!("{clip} must be >= 0 (0 = off)"),
        ));
    }
    let max_seq_len = h.max_seq_len.unwrap_or(512) as usize;
    if max_seq_len < 8 {
        return Err(ApiError::invalid(
            "hyperparameters.max_seq_len",
            format!("{max_seq_len} is below 8"),
        ));
    }
    let ratio = h.warmup_ratio.unwrap_or(0.0);
    if !(0.0..1.0).contains(&ratio) {
        return Err(ApiError::invalid(
            "hyperparameters.warmup_ratio",
            format!("{ratio} is outside [0, 1)"),
        ));
    }
    let split = req.validation_split.unwrap_or(0.0);
    if !(0.0..0.5).contains(&split) {
        return Err(ApiError::invalid(
            "validation_split",
            format!("{split} is outside [0, 0.5)"),
        ));
    }
    if h.packing {
        return Err(ApiError::invalid(
            "hyperparameters.packing",
            "packing is not supported yet",
        ));
    }
    let loss_on_all = match h.loss_on.as_str() {
        "" | "completion" => false,
        "all" => true,
        s => {
            return Err(ApiError::invalid(
                "hyperparameters.loss_on",
                format!("{s:?}; expected completion or all"),
            ))
        }
    };
    let objective = objective_from(req)?;
    let eval_grader = eval_grader_from(req.eval_grader.as_ref(), &objective, &method)?;
    let train = TrainSpec {
        objective,
        train_lm_head: req.train_lm_head,
        method,
        rank,
        alpha,
        dropout: dropout as f32,
        targets,
        use_rslora: l.use_rslora,
        use_dora: l.use_dora,
        epochs,
        batch_size,
        grad_accum,
        learning_rate: lr,
        schedule,
        // A ratio is resolved against the job's total steps when it is known (below).
        warmup_steps: h.warmup_steps.unwrap_or(0) as usize,
        weight_decay: wd,
        max_grad_norm: clip,
        max_seq_len,
        seed: h.seed.unwrap_or(42),
        eval_every: h.eval_every.unwrap_or(0) as usize,
        patience: h.patience.unwrap_or(0) as usize,
        checkpoint_every: h.checkpoint_every.unwrap_or(50).max(1) as usize,
    };
    Ok(NewJob {
        dataset: req.dataset.clone(),
        validation_dataset: (!req.validation_dataset.is_empty())
            .then(|| req.validation_dataset.clone()),
        adapter_name: req.adapter_name.clone(),
        spec: JobSpec {
            train,
            validation_split: split,
            loss_on_all,
            reject_too_long: h.reject_too_long,
            warmup_ratio: ratio,
            init_adapter: (!req.init_adapter.is_empty()).then(|| req.init_adapter.clone()),
            eval_grader,
        },
    })
}
