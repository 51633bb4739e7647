//! The training methods a job can ask for, with their settings validated and their sizes
//! known before training starts (for quotas). LoRA's settings are the `TrainSpec`'s own
//! (`rank`, `alpha`, ...); the prompt family's live in their variant here.

use serde::{Deserialize, Serialize};

use crate::model::LlamaConfig;

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
}

impl MethodSpec {
    pub fn name(&self) -> &'static str {
        match self {
            MethodSpec::Lora => "lora",
            MethodSpec::PromptTuning { .. } => "prompt_tuning",
            MethodSpec::PTuning { .. } => "p_tuning",
            MethodSpec::PrefixTuning { .. } => "prefix_tuning",
            MethodSpec::PTuningV2 { .. } => "p_tuning_v2",
        }
    }

    pub fn virtual_tokens(&self) -> usize {
        match self {
            MethodSpec::Lora => 0,
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
            _ => {}
        }
    }

    /// Floats the stored adapter of a prompt method holds (`None` for LoRA): the virtual
    /// tokens' embeddings, or their keys and values in every layer.
    pub fn prompt_adapter_floats(&self, cfg: &LlamaConfig) -> Option<usize> {
        let p = self.virtual_tokens();
        match self {
            MethodSpec::Lora => None,
            MethodSpec::PromptTuning { .. } | MethodSpec::PTuning { .. } => {
                Some(p * cfg.hidden_size)
            }
            MethodSpec::PrefixTuning { .. } | MethodSpec::PTuningV2 { .. } => {
                Some(p * cfg.num_layers * 2 * cfg.kv_dim())
            }
        }
    }

    /// Floats a prompt method trains (`None` for LoRA): what it stores, or for the
    /// reparameterised ones the encoder's input embeddings and weights.
    pub fn prompt_trainable_floats(&self, cfg: &LlamaConfig) -> Option<usize> {
        let (h, kv, l) = (cfg.hidden_size, cfg.kv_dim(), cfg.num_layers);
        let p = self.virtual_tokens();
        let dense = |i: usize, o: usize| i * o + o;
        Some(match self {
            MethodSpec::Lora => return None,
            MethodSpec::PromptTuning { .. } | MethodSpec::PTuningV2 { .. } => {
                self.prompt_adapter_floats(cfg)?
            }
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
