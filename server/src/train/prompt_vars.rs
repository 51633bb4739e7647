//! Trainable parameters of the prompt family, initialised as PEFT does (seeded here):
//! - prompt tuning: the virtual tokens' embeddings `(P, hidden)`;
//! - P-tuning: input embeddings through an encoder (PEFT's `PromptEncoder`: an MLP
//!   `h -> e -> e -> h` with ReLUs, or a bidirectional LSTM with an MLP head), whose output
//!   is what is stored and served;
//! - prefix tuning: `(P, kv_dim)` embeddings through PEFT's `PrefixEncoder` MLP
//!   (`kv_dim -> e -> layers * 2 * kv_dim`, tanh) — P-tuning v2: the prefix itself,
//!   `(P, layers * 2 * kv_dim)`.
//!
//! Prefix keys are trained in the model's (GGUF, interleaved) head layout: a fixed
//! permutation of PEFT's, so the same function class; the exporter permutes them back.
//! Linear layers start as `torch.nn.Linear` does (uniform in ±1/sqrt(in), weights and
//! biases), LSTM weights uniform in ±1/sqrt(hidden), embeddings standard normal.

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{
    methods::{Encoder, MethodSpec, PromptInit},
    trainable::Trainable,
};
use crate::{
    adapters::formats::{Details, Parsed},
    model::{adapter::TensorAdapter, Adapter, BaseModel, KvPrefix},
};

fn uniform(rng: &mut StdRng, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

/// Standard normal draws (Box-Muller).
pub(super) fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

fn var(v: Vec<f32>, shape: (usize, usize)) -> candle_core::Result<Var> {
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// `y = x W^T + b`, `W: (out, in)`.
struct Dense {
    w: Var,
    b: Var,
}

impl Dense {
    fn init(rng: &mut StdRng, inp: usize, out: usize) -> candle_core::Result<Self> {
        let bound = 1.0 / (inp as f32).sqrt();
        Ok(Self {
            w: var(uniform(rng, out * inp, bound), (out, inp))?,
            b: var(uniform(rng, out, bound), (1, out))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.w.as_tensor().t()?)?
            .broadcast_add(self.b.as_tensor())
    }
}

/// One direction of one LSTM layer (PyTorch's gate order: input, forget, cell, output).
struct LstmDir {
    w_ih: Var,
    w_hh: Var,
    b_ih: Var,
    b_hh: Var,
    hidden: usize,
}

impl LstmDir {
    fn init(rng: &mut StdRng, inp: usize, hidden: usize) -> candle_core::Result<Self> {
        let bound = 1.0 / (hidden as f32).sqrt();
        Ok(Self {
            w_ih: var(uniform(rng, 4 * hidden * inp, bound), (4 * hidden, inp))?,
            w_hh: var(
                uniform(rng, 4 * hidden * hidden, bound),
                (4 * hidden, hidden),
            )?,
            b_ih: var(uniform(rng, 4 * hidden, bound), (1, 4 * hidden))?,
            b_hh: var(uniform(rng, 4 * hidden, bound), (1, 4 * hidden))?,
            hidden,
        })
    }

    /// `x: (T, in)` -> `(T, hidden)`, run forwards or backwards in time.
    fn run(&self, x: &Tensor, reverse: bool) -> candle_core::Result<Tensor> {
        let t = x.dim(0)?;
        let gx = x
            .matmul(&self.w_ih.as_tensor().t()?)?
            .broadcast_add(self.b_ih.as_tensor())?;
        let mut h = Tensor::zeros((1, self.hidden), DType::F32, x.device())?;
        let mut c = h.clone();
        let mut out = vec![None; t];
        let order: Vec<usize> = if reverse {
            (0..t).rev().collect()
        } else {
            (0..t).collect()
        };
        for i in order {
            let g = (gx.narrow(0, i, 1)?
                + h.matmul(&self.w_hh.as_tensor().t()?)?
                    .broadcast_add(self.b_hh.as_tensor())?)?;
            let gates = g.chunk(4, 1)?;
            let ig = candle_nn::ops::sigmoid(&gates[0])?;
            let fg = candle_nn::ops::sigmoid(&gates[1])?;
            let cg = gates[2].tanh()?;
            let og = candle_nn::ops::sigmoid(&gates[3])?;
            c = ((fg * &c)? + (ig * cg)?)?;
            h = (og * c.tanh()?)?;
            out[i] = Some(h.clone());
        }
        let out: Vec<Tensor> = out.into_iter().flatten().collect();
        Tensor::cat(&out, 0)
    }
}

enum Net {
    /// The embedding is the output.
    Identity,
    /// Dense layers with an activation between them.
    Mlp(Vec<Dense>, fn(&Tensor) -> candle_core::Result<Tensor>),
    /// Bidirectional LSTM layers, then `Dense -> ReLU -> Dense`.
    Lstm(Vec<[LstmDir; 2]>, [Dense; 2]),
}

/// The prompt family's trainable parameters.
pub struct PromptVars {
    method: MethodSpec,
    embedding: Var,
    net: Net,
    num_layers: usize,
    kv_dim: usize,
}

impl PromptVars {
    pub fn init(model: &BaseModel, method: &MethodSpec, seed: u64) -> candle_core::Result<Self> {
        let cfg = model.config();
        let (h, kv, l) = (cfg.hidden_size, cfg.kv_dim(), cfg.num_layers);
        let p = method.virtual_tokens();
        let mut rng = StdRng::seed_from_u64(seed);
        let relu = |x: &Tensor| x.relu();
        let tanh = |x: &Tensor| x.tanh();
        let (embedding, net) = match method {
            MethodSpec::Lora
            | MethodSpec::Ia3 { .. }
            | MethodSpec::Bottleneck { .. }
            | MethodSpec::Head
            | MethodSpec::Full(_) => {
                candle_core::bail!("{} is not a prompt method", method.name())
            }
            MethodSpec::PromptTuning { init, .. } => {
                let emb = match init {
                    PromptInit::Random => normal(&mut rng, p * h),
                    PromptInit::Text { text } => {
                        let ids = model
                            .tokenizer
                            .encode(text)
                            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                        if ids.is_empty() {
                            candle_core::bail!("init_text has no tokens");
                        }
                        embed_rows(
                            model,
                            &ids.iter().cycle().take(p).copied().collect::<Vec<_>>(),
                        )?
                    }
                    PromptInit::Vocab => {
                        let ids: Vec<u32> = (0..p)
                            .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                            .collect();
                        embed_rows(model, &ids)?
                    }
                };
                (var(emb, (p, h))?, Net::Identity)
            }
            MethodSpec::PTuning {
                encoder,
                encoder_hidden_size: e,
                encoder_num_layers: n,
                ..
            } => {
                let emb = var(normal(&mut rng, p * h), (p, h))?;
                let e = *e;
                let net = match encoder {
                    Encoder::Mlp => Net::Mlp(
                        vec![
                            Dense::init(&mut rng, h, e)?,
                            Dense::init(&mut rng, e, e)?,
                            Dense::init(&mut rng, e, h)?,
                        ],
                        relu,
                    ),
                    Encoder::Lstm => {
                        let mut layers = Vec::new();
                        for i in 0..(*n).max(1) {
                            let inp = if i == 0 { h } else { 2 * e };
                            layers.push([
                                LstmDir::init(&mut rng, inp, e)?,
                                LstmDir::init(&mut rng, inp, e)?,
                            ]);
                        }
                        let head = [
                            Dense::init(&mut rng, 2 * e, 2 * e)?,
                            Dense::init(&mut rng, 2 * e, h)?,
                        ];
                        Net::Lstm(layers, head)
                    }
                };
                (emb, net)
            }
            MethodSpec::PrefixTuning {
                encoder_hidden_size: e,
                ..
            } => (
                var(normal(&mut rng, p * kv), (p, kv))?,
                Net::Mlp(
                    vec![
                        Dense::init(&mut rng, kv, *e)?,
                        Dense::init(&mut rng, *e, l * 2 * kv)?,
                    ],
                    tanh,
                ),
            ),
            MethodSpec::PTuningV2 { .. } => (
                var(normal(&mut rng, p * l * 2 * kv), (p, l * 2 * kv))?,
                Net::Identity,
            ),
        };
        Ok(Self {
            method: method.clone(),
            embedding,
            net,
            num_layers: l,
            kv_dim: kv,
        })
    }

    /// The encoder's output: virtual embeddings `(P, hidden)` or the prefix
    /// `(P, layers * 2 * kv_dim)`.
    fn output(&self) -> candle_core::Result<Tensor> {
        let x = self.embedding.as_tensor();
        match &self.net {
            Net::Identity => Ok(x.clone()),
            Net::Mlp(layers, act) => {
                let mut y = x.clone();
                for (i, d) in layers.iter().enumerate() {
                    if i > 0 {
                        y = act(&y)?;
                    }
                    y = d.forward(&y)?;
                }
                Ok(y)
            }
            Net::Lstm(layers, head) => {
                let mut y = x.clone();
                for [fwd, bwd] in layers {
                    y = Tensor::cat(&[fwd.run(&y, false)?, bwd.run(&y, true)?], 1)?;
                }
                head[1].forward(&head[0].forward(&y)?.relu()?)
            }
        }
    }

    fn is_prefix(&self) -> bool {
        matches!(
            self.method,
            MethodSpec::PrefixTuning { .. } | MethodSpec::PTuningV2 { .. }
        )
    }

    fn named(&self) -> Vec<(String, Var)> {
        let mut out = vec![("embedding".to_string(), self.embedding.clone())];
        let dense = |out: &mut Vec<(String, Var)>, name: String, d: &Dense| {
            out.push((format!("{name}.weight"), d.w.clone()));
            out.push((format!("{name}.bias"), d.b.clone()));
        };
        match &self.net {
            Net::Identity => {}
            Net::Mlp(layers, _) => {
                for (i, d) in layers.iter().enumerate() {
                    dense(&mut out, format!("mlp.{i}"), d);
                }
            }
            Net::Lstm(layers, head) => {
                for (i, dirs) in layers.iter().enumerate() {
                    for (dir, name) in dirs.iter().zip(["", "_reverse"]) {
                        for (v, n) in [
                            (&dir.w_ih, "weight_ih"),
                            (&dir.w_hh, "weight_hh"),
                            (&dir.b_ih, "bias_ih"),
                            (&dir.b_hh, "bias_hh"),
                        ] {
                            out.push((format!("lstm.{n}_l{i}{name}"), v.clone()));
                        }
                    }
                }
                for (i, d) in head.iter().enumerate() {
                    dense(&mut out, format!("mlp_head.{i}"), d);
                }
            }
        }
        out
    }
}

/// Rows of the base model's input embedding for `ids`.
fn embed_rows(model: &BaseModel, ids: &[u32]) -> candle_core::Result<Vec<f32>> {
    model.llama.weights.embed.rows(ids)
}

impl TensorAdapter for PromptVars {
    fn prompt(&self) -> candle_core::Result<Option<Tensor>> {
        if self.is_prefix() {
            return Ok(None);
        }
        self.output().map(Some)
    }

    fn kv_prefix(&self) -> candle_core::Result<Option<Tensor>> {
        if !self.is_prefix() {
            return Ok(None);
        }
        self.output().map(Some)
    }
}

impl Trainable for PromptVars {
    fn vars(&self) -> Vec<candle_core::Var> {
        self.named().into_iter().map(|(_, v)| v).collect()
    }

    fn names(&self) -> Vec<String> {
        self.named().into_iter().map(|(n, _)| n).collect()
    }

    fn export(&self) -> candle_core::Result<Parsed> {
        let out = self.output()?;
        let p = out.dim(0)?;
        let v: Vec<f32> = out.flatten_all()?.to_vec1()?;
        let (details, adapter, prompt) = match &self.method {
            MethodSpec::PromptTuning { .. } => (
                Details::PromptTuning {
                    num_virtual_tokens: p,
                },
                Adapter::default(),
                Some(v),
            ),
            MethodSpec::PTuning {
                encoder,
                encoder_hidden_size,
                ..
            } => (
                Details::PTuning {
                    num_virtual_tokens: p,
                    encoder: encoder.name().into(),
                    encoder_hidden_size: *encoder_hidden_size,
                },
                Adapter::default(),
                Some(v),
            ),
            m => {
                let details = match m {
                    MethodSpec::PrefixTuning {
                        encoder_hidden_size,
                        ..
                    } => Details::PrefixTuning {
                        num_virtual_tokens: p,
                        encoder_hidden_size: *encoder_hidden_size,
                    },
                    _ => Details::PTuningV2 {
                        num_virtual_tokens: p,
                    },
                };
                (
                    details,
                    Adapter::with_prefix(KvPrefix::from_rows(&v, p, self.num_layers, self.kv_dim)),
                    None,
                )
            }
        };
        Ok(Parsed {
            details,
            adapter,
            prompt,
        })
    }
}
