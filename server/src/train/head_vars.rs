//! An output layer trained beside any method's parameters, which it wraps: the
//! classification objective's head `(labels, hidden)`, or a replaced LM head `(vocab,
//! hidden)` (`train_lm_head`). Every hook but the output is the wrapped method's; the output
//! hook is the trained layer. transformers initialises `score` from
//! normal(0, `initializer_range`), 0.02 for SmolLM2 and most Llama configs; graft draws the
//! same distribution from the job's seed. A replaced LM head starts as the base's (PEFT's
//! `modules_to_save` copies the module), dequantised to f32.

use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};

use super::{prompt_vars::normal, trainable::Trainable};
use crate::{
    adapters::formats::Parsed,
    model::{
        adapter::{LinearHook, SublayerHook, TensorAdapter},
        head::LmHead,
        ClassHead, Module, Sublayer,
    },
};

/// transformers' default `initializer_range`.
pub const HEAD_INIT_STD: f64 = 0.02;

/// The checkpoint names of the trained output layers.
pub const HEAD_VAR: &str = "score.weight";
pub const LM_HEAD_VAR: &str = "lm_head.weight";

/// Which output layer is trained.
enum Kind {
    Class { labels: Vec<String> },
    Lm,
}

pub struct HeadVars {
    inner: Box<dyn Trainable>,
    head: Var,
    kind: Kind,
}

impl HeadVars {
    /// A fresh head for `labels` over `inner`'s parameters.
    pub fn init(
        inner: Box<dyn Trainable>,
        labels: Vec<String>,
        hidden: usize,
        seed: u64,
    ) -> candle_core::Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5C0F_E11E_AD00_0001);
        let w: Vec<f32> = normal(&mut rng, labels.len() * hidden)
            .into_iter()
            .map(|x| x * HEAD_INIT_STD as f32)
            .collect();
        let head = Var::from_tensor(&Tensor::from_vec(w, (labels.len(), hidden), &Device::Cpu)?)?;
        Ok(Self {
            inner,
            head,
            kind: Kind::Class { labels },
        })
    }

    /// A replaced LM head over `inner`'s parameters, starting from the base's `weight`
    /// `(vocab, hidden)`.
    pub fn init_lm(inner: Box<dyn Trainable>, weight: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            inner,
            head: Var::from_tensor(&weight.to_dtype(candle_core::DType::F32)?.copy()?)?,
            kind: Kind::Lm,
        })
    }
}

impl TensorAdapter for HeadVars {
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
        match self.kind {
            Kind::Class { .. } => Ok(Some(self.head.as_tensor().clone())),
            Kind::Lm => self.inner.head(),
        }
    }
    fn lm_head(&self) -> candle_core::Result<Option<Tensor>> {
        match self.kind {
            Kind::Lm => Ok(Some(self.head.as_tensor().clone())),
            Kind::Class { .. } => self.inner.lm_head(),
        }
    }
}

impl Trainable for HeadVars {
    fn vars(&self) -> Vec<Var> {
        let mut v = self.inner.vars();
        v.push(self.head.clone());
        v
    }
    fn names(&self) -> Vec<String> {
        let mut n = self.inner.names();
        n.push(match self.kind {
            Kind::Class { .. } => HEAD_VAR.into(),
            Kind::Lm => LM_HEAD_VAR.into(),
        });
        n
    }
    fn set_train(&mut self, train: bool) {
        self.inner.set_train(train);
    }
    fn set_dropout_seed(&self, seed: u64) {
        self.inner.set_dropout_seed(seed);
    }
    fn start_from(&self, adapter: &crate::model::Adapter) -> Result<(), String> {
        self.inner.start_from(adapter)
    }
    fn labels(&self) -> Option<&[String]> {
        match &self.kind {
            Kind::Class { labels } => Some(labels),
            Kind::Lm => self.inner.labels(),
        }
    }
    fn export(&self) -> candle_core::Result<Parsed> {
        let mut p = self.inner.export()?;
        let (_, hidden) = self.head.dims2()?;
        let weight = self.head.flatten_all()?.to_vec1()?;
        match &self.kind {
            Kind::Class { labels } => {
                p.adapter.head = Some(Arc::new(ClassHead {
                    labels: labels.clone(),
                    weight,
                    hidden,
                }))
            }
            Kind::Lm => p.adapter.lm_head = Some(Arc::new(LmHead { weight, hidden })),
        }
        Ok(p)
    }
}
