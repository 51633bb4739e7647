//! Where an adapter can act on the model: the seven linear modules of a Llama block and
//! its two sublayers. Every method of `model::adapter` names its hook points by these.

use super::{
    config::LlamaConfig,
    weights::{LayerWeights, Linear},
};

/// The seven linear modules of a Llama block, in PEFT's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// The PEFT/HF module name (`q_proj`...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// The HF parent path (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            _ => "mlp",
        }
    }

    /// `model.layers.{layer}.{parent}.{module}`: this module's full name in the HF model
    /// (its weight is that `.weight`).
    pub fn hf_key(self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}",
            self.hf_parent(),
            self.hf_name()
        )
    }

    /// The GGUF tensor name within a block (`blk.{layer}.{name}.weight`), as llama.cpp
    /// names it.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Module::Q => "attn_q",
            Module::K => "attn_k",
            Module::V => "attn_v",
            Module::O => "attn_output",
            Module::Gate => "ffn_gate",
            Module::Up => "ffn_up",
            Module::Down => "ffn_down",
        }
    }

    pub fn from_hf_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.hf_name() == s)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// This module's weight shape `(out, in)` in a model of shape `cfg`.
    pub fn shape(self, cfg: &LlamaConfig) -> (usize, usize) {
        let (h, f, kv) = (cfg.hidden_size, cfg.intermediate_size, cfg.kv_dim());
        match self {
            Module::Q | Module::O => (h, h),
            Module::K | Module::V => (kv, h),
            Module::Gate | Module::Up => (f, h),
            Module::Down => (h, f),
        }
    }

    /// This module's base weight in a layer.
    pub fn of(self, l: &LayerWeights) -> &Linear {
        match self {
            Module::Q => &l.q,
            Module::K => &l.k,
            Module::V => &l.v,
            Module::O => &l.o,
            Module::Gate => &l.gate,
            Module::Up => &l.up,
            Module::Down => &l.down,
        }
    }

    pub(crate) fn of_mut(self, l: &mut LayerWeights) -> &mut Linear {
        match self {
            Module::Q => &mut l.q,
            Module::K => &mut l.k,
            Module::V => &mut l.v,
            Module::O => &mut l.o,
            Module::Gate => &mut l.gate,
            Module::Up => &mut l.up,
            Module::Down => &mut l.down,
        }
    }
}

/// The two sublayers of a Llama block, after which a bottleneck adapter can act (AdapterHub's
/// `mh_adapter` and `output_adapter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sublayer {
    Attention,
    Ffn,
}

impl Sublayer {
    pub const ALL: [Sublayer; 2] = [Sublayer::Attention, Sublayer::Ffn];

    pub fn index(self) -> usize {
        self as usize
    }
}
