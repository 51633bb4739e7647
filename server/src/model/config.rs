//! Llama-family hyper-parameters, read from GGUF metadata or an HF `config.json`.
//! Owns no weights; pure data that the rest of `model` sizes itself from.

use serde::Deserialize;

/// The shape of a Llama-family decoder. One value per loaded model, never mutated.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub max_position: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    pub fn kv_dim(&self) -> usize {
        self.head_dim() * self.num_kv_heads
    }
    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_heads)
        {
            return Err(format!(
                "hidden_size {} is not divisible by num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.vocab_size == 0 || self.num_layers == 0 || self.max_position == 0 {
            return Err("vocab_size, num_layers and max_position must be positive".into());
        }
        Ok(())
    }
}

/// The fields of a Hugging Face `config.json` for `LlamaForCausalLM` that graft uses.
#[derive(Debug, Deserialize)]
pub struct HfLlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f32 {
    10_000.0
}

impl From<&HfLlamaConfig> for LlamaConfig {
    fn from(c: &HfLlamaConfig) -> Self {
        Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            max_position: c.max_position_embeddings,
            rms_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
        }
    }
}
