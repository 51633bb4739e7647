//! The training methods a job can ask for, with their settings validated and their sizes
//! known before training starts (for quotas). LoRA's (and DoRA's) settings are the
//! `TrainSpec`'s own (`rank`, `alpha`, ..., `use_dora`); the other methods' live in their
//! variant here.

use serde::{Deserialize, Serialize};

use super::trainer::TrainSpec;
use crate::{
    adapters::formats::BnSettings,
    model::{LlamaConfig, Module},
};

/// How prompt tuning's virtual tokens start (PEFT's `prompt_tuning_init`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PromptInit {
    /// Standard normal entries (PEFT's `RANDOM`: `nn.Embedding`'s default).
    Random,
    /// The embeddings of this text's tokens, repeated to fill the virtual tokens (PEFT's
    /// `TEXT`).
    Text { text: String },
    /// The embeddings of random vocabulary tokens (PEFT's `SAMPLE_VOCAB`).
    Vocab,
}

/// P-tuning's prompt encoder (PEFT's `encoder_reparameterization_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoder {
    Mlp,
    Lstm,
}

impl Encoder {
    pub fn name(self) -> &'static str {
        match self {
            Encoder::Mlp => "mlp",
            Encoder::Lstm => "lstm",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum MethodSpec {
    #[default]
    Lora,
    PromptTuning {
        num_virtual_tokens: usize,
        init: PromptInit,
    },
    PTuning {
        num_virtual_tokens: usize,
        encoder: Encoder,
        encoder_hidden_size: usize,
        /// LSTM layers (PEFT's MLP always has two hidden layers).
        encoder_num_layers: usize,
    },
    PrefixTuning {
        num_virtual_tokens: usize,
        encoder_hidden_size: usize,
    },
    PTuningV2 {
        num_virtual_tokens: usize,
    },
    /// IA3: module names (validated), the feed-forward ones a subset of the targets.
    Ia3 {
        target_modules: Vec<String>,
        feedforward_modules: Vec<String>,
    },
    Bottleneck {
        settings: BnSettings,
        /// A width asked for instead of a reduction factor (resolved against the model).
        #[serde(default)]
        bottleneck_size: Option<usize>,
    },
    /// No adapter parameters: only the classification objective's head is trained (stored
    /// as PEFT does it, LoRA with `target_modules: "dummy-target-modules"` and the head in
    /// `modules_to_save`).
    Head,
}

impl MethodSpec {
    pub fn name(&self) -> &'static str {
        match self {
            MethodSpec::Lora => "lora",
            MethodSpec::PromptTuning { .. } => "prompt_tuning",
            MethodSpec::PTuning { .. } => "p_tuning",
            MethodSpec::PrefixTuning { .. } => "prefix_tuning",
            MethodSpec::PTuningV2 { .. } => "p_tuning_v2",
            MethodSpec::Ia3 { .. } => "ia3",
            MethodSpec::Bottleneck { .. } => "bottleneck",
            MethodSpec::Head => "head",
        }
    }

    pub fn virtual_tokens(&self) -> usize {
        match self {
            MethodSpec::Lora
            | MethodSpec::Ia3 { .. }
            | MethodSpec::Bottleneck { .. }
            | MethodSpec::Head => 0,
            MethodSpec::PromptTuning {
                num_virtual_tokens, ..
            }
            | MethodSpec::PTuning {
                num_virtual_tokens, ..
            }
            | MethodSpec::PrefixTuning {
                num_virtual_tokens, ..
            }
            | MethodSpec::PTuningV2 { num_virtual_tokens } => *num_virtual_tokens,
        }
    }

    /// Fills the model-dependent defaults: an encoder hidden size of 0 becomes the width of
    /// what the encoder produces (PEFT's default: `token_dim`).
    pub fn resolve(&mut self, cfg: &LlamaConfig) {
        match self {
            MethodSpec::PTuning {
                encoder_hidden_size: e,
                ..
            } if *e == 0 => *e = cfg.hidden_size,
            MethodSpec::PrefixTuning {
                encoder_hidden_size: e,
                ..
            } if *e == 0 => *e = cfg.kv_dim(),
            MethodSpec::Bottleneck {
                settings,
                bottleneck_size: Some(n),
            } => {
                // AdapterHub derives the width as int(hidden // reduction_factor).
                let h = cfg.hidden_size;
                settings.reduction_factor = h as f64 / *n as f64;
                if settings.size(0, h) != *n {
                    settings.reduction_factor = h as f64 / (*n as f64 + 0.5);
                }
            }
            _ => {}
        }
    }

    /// Floats the stored adapter holds (`None` for LoRA, whose size is the `TrainSpec`'s):
    /// the virtual tokens' embeddings, or their keys and values in every layer; IA3's
    /// vectors; the bottlenecks' weights.
    pub fn adapter_floats(&self, cfg: &LlamaConfig) -> Option<usize> {
        let p = self.virtual_tokens();
        match self {
            MethodSpec::Lora => None,
            MethodSpec::Head => Some(0),
            MethodSpec::Ia3 {
                target_modules,
                feedforward_modules,
            } => Some(
                target_modules
                    .iter()
                    .filter_map(|t| Module::from_hf_name(t))
                    .map(|m| {
                        let (out, inp) = m.shape(cfg);
                        if feedforward_modules.iter().any(|f| f == m.hf_name()) {
                            inp
                        } else {
                            out
                        }
                    })
                    .sum::<usize>()
                    * cfg.num_layers,
            ),
            MethodSpec::Bottleneck { settings: s, .. } => {
                let h = cfg.hidden_size;
                let ln = 2 * h * (s.ln_before as usize + s.ln_after as usize);
                Some(
                    (0..cfg.num_layers)
                        .map(|l| {
                            let d = s.size(l, h);
                            s.sites(l).len() * (2 * d * h + d + h + ln)
                        })
                        .sum(),
                )
            }
            MethodSpec::PromptTuning { .. } | MethodSpec::PTuning { .. } => {
                Some(p * cfg.hidden_size)
            }
            MethodSpec::PrefixTuning { .. } | MethodSpec::PTuningV2 { .. } => {
                Some(p * cfg.num_layers * 2 * cfg.kv_dim())
            }
        }
    }

    /// Floats the method trains (`None` for LoRA): what it stores, or for the
    /// reparameterised prompt methods the encoder's input embeddings and weights.
    pub fn trainable_floats(&self, cfg: &LlamaConfig) -> Option<usize> {
        let (h, kv, l) = (cfg.hidden_size, cfg.kv_dim(), cfg.num_layers);
        let p = self.virtual_tokens();
        let dense = |i: usize, o: usize| i * o + o;
        Some(match self {
            MethodSpec::Lora => return None,
            MethodSpec::PromptTuning { .. }
            | MethodSpec::PTuningV2 { .. }
            | MethodSpec::Ia3 { .. }
            | MethodSpec::Bottleneck { .. }
            | MethodSpec::Head => self.adapter_floats(cfg)?,
            MethodSpec::PTuning {
                encoder: Encoder::Mlp,
                encoder_hidden_size: e,
                ..
            } => p * h + dense(h, *e) + dense(*e, *e) + dense(*e, h),
            MethodSpec::PTuning {
                encoder: Encoder::Lstm,
                encoder_hidden_size: e,
                encoder_num_layers: n,
                ..
            } => {
                let lstm: usize = (0..*n)
                    .map(|i| {
                        let inp = if i == 0 { h } else { 2 * e };
                        2 * (4 * e * inp + 4 * e * e + 8 * e)
                    })
                    .sum();
                p * h + lstm + dense(2 * e, 2 * e) + dense(2 * e, h)
            }
            MethodSpec::PrefixTuning {
                encoder_hidden_size: e,
                ..
            } => p * kv + dense(kv, *e) + dense(*e, l * 2 * kv),
        })
    }
}

/// A trained bottleneck is at most this many times as wide as the model's hidden size.
pub const MAX_BOTTLENECK_WIDTH: usize = 4;

/// Checks a job's method settings against the model `cfg` and the server's caps; the error
/// is (the request's field, why).
pub fn check(
    spec: &TrainSpec,
    cfg: &LlamaConfig,
    max_rank: usize,
    max_virtual_tokens: usize,
) -> Result<(), (String, String)> {
    let method = &spec.method;
    if spec.train_lm_head && spec.objective != super::trainer::Objective::Sft {
        return Err((
            "train_lm_head".into(),
            "a replaced LM head is trained with the sft objective; a classifier has its own head"
                .into(),
        ));
    }
    if spec.max_seq_len > cfg.max_position {
        return Err((
            "hyperparameters.max_seq_len".into(),
            format!(
                "{} is above the model's context window {}",
                spec.max_seq_len, cfg.max_position
            ),
        ));
    }
    let virt = method.virtual_tokens();
    let field = format!("{}.num_virtual_tokens", method.name());
    if virt > max_virtual_tokens {
        return Err((
            field,
            format!("{virt} is above this server's maximum {max_virtual_tokens}"),
        ));
    }
    if virt + spec.max_seq_len > cfg.max_position {
        return Err((
            field,
            format!(
                "{virt} virtual tokens + max_seq_len {} exceed the model's context window {}",
                spec.max_seq_len, cfg.max_position
            ),
        ));
    }
    match method {
        MethodSpec::Head if spec.objective == super::trainer::Objective::Sft => Err((
            "method".into(),
            "head trains only a classification head; it needs the classification objective".into(),
        )),
        MethodSpec::Lora if spec.rank > max_rank => Err((
            "lora.r".into(),
            format!(
                "{} is above this server's maximum rank {max_rank}",
                spec.rank
            ),
        )),
        MethodSpec::Bottleneck {
            settings,
            bottleneck_size,
        } => {
            // Up-projecting adapters are allowed (AdapterHub's reduction factor < 1), to a point.
            let h = cfg.hidden_size;
            let widest = (0..cfg.num_layers)
                .map(|l| settings.size(l, h))
                .max()
                .unwrap_or(0);
            if widest <= MAX_BOTTLENECK_WIDTH * h {
                return Ok(());
            }
            let field = if bottleneck_size.is_some() {
                "bottleneck.bottleneck_size"
            } else {
                "bottleneck.reduction_factor"
            };
            Err((
                field.into(),
                format!(
                    "makes the bottleneck {widest} wide; at most {} ({MAX_BOTTLENECK_WIDTH} x the hidden size {h})",
                    MAX_BOTTLENECK_WIDTH * h
                ),
            ))
        }
        _ => Ok(()),
    }
}
