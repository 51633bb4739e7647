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
    /// Full fine-tuning: the base's own weights, dequantised to f32, trained with AdamW;
    /// the result is a model, not an adapter.
    Full(FullSelection),
}

/// Which of the base's weights full fine-tuning trains (the rest stay frozen).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FullSelection {
    /// Decoder layers whose projections (and norms, with `norms`) train; empty: all.
    #[serde(default)]
    pub layers: Vec<usize>,
    /// The token embeddings and the LM head (one matrix when the base ties them).
    pub embeddings: bool,
    /// The RMSNorm weights of the trained layers and the final norm.
    pub norms: bool,
    /// Whether the base ties its LM head to the embeddings (resolved from the base when the
    /// job is created; sizes depend on it).
    #[serde(default)]
    pub tied: bool,
}

impl FullSelection {
    pub fn trains_layer(&self, layer: usize) -> bool {
        self.layers.is_empty() || self.layers.contains(&layer)
    }

    /// Floats of one decoder layer's projections and of its two norms.
    fn layer_floats(cfg: &LlamaConfig) -> (usize, usize) {
        let (h, f, kv) = (cfg.hidden_size, cfg.intermediate_size, cfg.kv_dim());
        (2 * h * h + 2 * kv * h + 3 * h * f, 2 * h)
    }

    fn embedding_floats(&self, cfg: &LlamaConfig) -> usize {
        cfg.vocab_size * cfg.hidden_size * if self.tied { 1 } else { 2 }
    }

    /// Floats of the whole model (what the exported `model.safetensors` holds).
    pub fn model_floats(&self, cfg: &LlamaConfig) -> usize {
        let (proj, norms) = Self::layer_floats(cfg);
        self.embedding_floats(cfg) + cfg.num_layers * (proj + norms) + cfg.hidden_size
    }

    /// Floats that train.
    pub fn trained_floats(&self, cfg: &LlamaConfig) -> usize {
        let (proj, norms) = Self::layer_floats(cfg);
        let layers = (0..cfg.num_layers)
            .filter(|&l| self.trains_layer(l))
            .count();
        let emb = if self.embeddings {
            self.embedding_floats(cfg)
        } else {
            0
        };
        let norm = if self.norms {
            layers * norms + cfg.hidden_size
        } else {
            0
        };
        emb + layers * proj + norm
    }

    /// Peak bytes a run is expected to take beyond the resident base: per trained float
    /// seven f32 values (the trained copy, its gradient, the accumulated one, AdamW's two
    /// moments and the update's two temporaries), and the activations candle keeps for the
    /// backward of one micro-batch of `batch` rows of `seq` tokens. Measured on
    /// SmolLM2-135M, batch 4 x 128: 4,197 MiB over the base at peak against this estimate's
    /// 5,162 (BENCHMARKS.md; 4,930 before the fused ops of `model/fused.rs`).
    pub fn memory_bytes(&self, cfg: &LlamaConfig, batch: usize, seq: usize) -> u64 {
        let trained = self.trained_floats(cfg) as u64;
        let (h, f, v) = (
            cfg.hidden_size as u64,
            cfg.intermediate_size as u64,
            cfg.vocab_size as u64,
        );
        let tokens = (batch * seq) as u64;
        let heads = cfg.num_heads as u64;
        // Per layer and token: ~16 hidden-wide states, 6 FFN-wide ones, 3 score rows per head.
        let per_layer = tokens * (16 * h + 6 * f) + 3 * heads * tokens * seq as u64;
        let activations = cfg.num_layers as u64 * per_layer + 3 * tokens * v;
        4 * (7 * trained + activations)
    }
}

impl MethodSpec {
    /// The default learning rate per method. The prompt family trains a handful of vectors
    /// that every position reads, from a random start (standard normal, far from the scale of
    /// real token embeddings): they need far larger steps than a low-rank update that starts
    /// at zero. The values are the ones the PEFT reference runs in `tests/fixtures` used.
    pub fn default_learning_rate(&self) -> f64 {
        match self {
            MethodSpec::Lora => 2e-4,
            MethodSpec::PromptTuning { .. } => 3e-2,
            MethodSpec::PTuning { .. } | MethodSpec::PrefixTuning { .. } => 3e-3,
            MethodSpec::PTuningV2 { .. } => 1e-2,
            MethodSpec::Ia3 { .. } => 1e-2,
            MethodSpec::Bottleneck { .. } | MethodSpec::Head => 1e-3,
            // Every weight moves: the small steps of full fine-tuning recipes.
            MethodSpec::Full(_) => 1e-5,
        }
    }

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
            MethodSpec::Full(_) => "full",
        }
    }

    pub fn virtual_tokens(&self) -> usize {
        match self {
            MethodSpec::Lora
            | MethodSpec::Ia3 { .. }
            | MethodSpec::Bottleneck { .. }
            | MethodSpec::Head
            | MethodSpec::Full(_) => 0,
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
            MethodSpec::Full(sel) => Some(sel.model_floats(cfg)),
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
            MethodSpec::Full(sel) => sel.trained_floats(cfg),
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
    if let Some((_, new_tokens)) = spec.objective.grader() {
        if spec.max_seq_len + new_tokens as usize > cfg.max_position {
            return Err((
                format!("{}.max_new_tokens", spec.objective.name()),
                format!(
                    "max_seq_len {} + {new_tokens} new tokens exceed the model's context window {}",
                    spec.max_seq_len, cfg.max_position
                ),
            ));
        }
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
        MethodSpec::Head
            if !matches!(
                spec.objective,
                super::trainer::Objective::Classification { .. }
                    | super::trainer::Objective::RewardModel { .. }
            ) =>
        {
            Err((
                "method".into(),
                "head trains only a head; it needs the classification objective (or reward_model)"
                    .into(),
            ))
        }
        MethodSpec::Lora if spec.rank > max_rank => Err((
            "lora.r".into(),
            format!(
                "{} is above this server's maximum rank {max_rank}",
                spec.rank
            ),
        )),
        MethodSpec::Full(_)
            if spec.train_lm_head || spec.objective != super::trainer::Objective::Sft =>
        {
            Err((
                "method".into(),
                "full fine-tuning trains the model's own LM head with the sft objective; \
             train_lm_head, heads and the preference objectives do not apply"
                    .into(),
            ))
        }
        MethodSpec::Full(sel) => match sel.layers.iter().find(|&&l| l >= cfg.num_layers) {
            Some(l) => Err((
                "full.layers".into(),
                format!(
                    "layer {l} does not exist; the model has {} (0..{})",
                    cfg.num_layers,
                    cfg.num_layers - 1
                ),
            )),
            None => Ok(()),
        },
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
