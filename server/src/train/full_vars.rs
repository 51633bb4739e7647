//! Full fine-tuning's parameters: the base's own weights (the chosen subset), copied to
//! f32 `Var`s inside a second [`Llama`] whose other weights are the base's, shared. The
//! trainer runs that model's differentiable forward ([`Trainable::model`]); a `Var`
//! weight's matmul keeps its gradient ([`crate::model::weights::Linear::forward_train`]).
//! A tied LM head stays tied: one `Var` serves the embedding lookup and the output layer,
//! and its gradient is the sum of both uses, as in PyTorch.

use candle_core::{Tensor, Var};

use super::{methods::FullSelection, trainable::Trainable};
use crate::{
    adapters::formats::Parsed,
    model::{adapter::TensorAdapter, weights::Linear, Llama, Module},
};

pub struct FullVars {
    llama: Llama,
    vars: Vec<Var>,
    names: Vec<String>,
}

impl FullVars {
    pub fn init(base: &Llama, sel: &FullSelection) -> candle_core::Result<Self> {
        let mut w = base.weights.clone();
        let tied = w.tied();
        let (mut vars, mut names) = (Vec::new(), Vec::new());
        let mut train = |name: String, t: &Tensor| -> candle_core::Result<Tensor> {
            let v = Var::from_tensor(t)?;
            let out = v.as_tensor().clone();
            vars.push(v);
            names.push(name);
            Ok(out)
        };
        if sel.embeddings {
            w.embed = Linear::new(train(
                "model.embed_tokens.weight".into(),
                &w.embed.weight()?,
            )?);
            w.lm_head = if tied {
                w.embed.clone()
            } else {
                Linear::new(train("lm_head.weight".into(), &w.lm_head.weight()?)?)
            };
        }
        for (i, l) in w.layers.iter_mut().enumerate() {
            if !sel.trains_layer(i) {
                continue;
            }
            // Named as the exported HF tensors are (`Weights::hf_tensors`).
            for m in Module::ALL {
                let lin = m.of_mut(l);
                *lin = Linear::new(train(format!("{}.weight", m.hf_key(i)), &lin.weight()?)?);
            }
            if sel.norms {
                let p = |s: &str| format!("model.layers.{i}.{s}.weight");
                l.attn_norm = train(p("input_layernorm"), &l.attn_norm)?;
                l.ffn_norm = train(p("post_attention_layernorm"), &l.ffn_norm)?;
            }
        }
        if sel.norms {
            w.final_norm = train("model.norm.weight".into(), &w.final_norm)?;
        }
        Ok(Self {
            llama: Llama::new(base.cfg.clone(), w, base.device().clone())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            vars,
            names,
        })
    }
}

/// No hooks: the weights themselves are what changes.
impl TensorAdapter for FullVars {}

impl Trainable for FullVars {
    fn vars(&self) -> Vec<Var> {
        self.vars.clone()
    }
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }
    fn export(&self) -> candle_core::Result<Parsed> {
        Err(candle_core::Error::Msg(
            "full fine-tuning yields a model, not an adapter".into(),
        ))
    }
    fn model(&self) -> Option<&Llama> {
        Some(&self.llama)
    }
}
