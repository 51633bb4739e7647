//! Trainable LoRA parameters: `Var`s for A and B of each targeted module, initialised as PEFT
//! does (A uniform in ±1/sqrt(in), B zero, so training starts from the base model exactly).
//! Only these are trained; the base weights are never `Var`s.
//! DoRA adds a magnitude `m` per output feature, initialised to the row norms of `W` (so
//! again the base model at step 0); the forward is PEFT's: `y = (m / ||W + sBA||) (Wx +
//! sBAx)` with the norm detached from the graph (the DoRA paper's section 4.3), and with
//! dropout `Wx + (g - 1) W x' + g sBA x'` on the dropped input `x'`.
//! Dropout masks are a pure function of (job seed, step, micro-batch, layer, module) —
//! [`LoraVars::set_dropout_seed`] — so a run resumed from a checkpoint at step `s` draws the
//! very masks the uninterrupted run drew there: the RNG's whole state is the step, which the
//! checkpoint already holds.

use std::cell::Cell;

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::trainable::Trainable;
use crate::{
    adapters::formats::{Details, Parsed},
    model::{
        adapter::{composed, Dora, LinearDelta, LinearHook, TensorAdapter},
        lora::LoraPair,
        weights::{Linear, Weights},
        Adapter, LlamaConfig, Module,
    },
};

/// DoRA's part of a module: the magnitude and the frozen base weight its norm needs.
pub struct DoraVar {
    pub magnitude: Var,
    weight: Tensor,
}

/// One module's trainable pair.
pub struct VarPair {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
    pub train: bool,
    pub dora: Option<DoraVar>,
    /// This module's stream: (layer, module) mixed in at init, the step's seed set before
    /// each forward.
    stream: u64,
    seed: Cell<u64>,
}

/// splitmix64: a counter-based generator, so element `i` of a mask needs no state.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverted dropout of `x` with drop probability `p`, its mask drawn from `seed`.
fn seeded_dropout(x: &Tensor, p: f32, seed: u64) -> candle_core::Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let threshold = (p as f64 * (1u64 << 53) as f64) as u64;
    let mask: Vec<f32> = (0..x.elem_count() as u64)
        .map(|i| {
            if splitmix(seed ^ splitmix(i)) >> 11 < threshold {
                0.0
            } else {
                keep
            }
        })
        .collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?
}

impl VarPair {
    /// Whether this forward drops inputs of the update.
    fn dropping(&self) -> bool {
        self.train && self.dropout > 0.0
    }

    /// The update's input: `x`, or its dropout in training.
    fn update_input(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.dropping() {
            seeded_dropout(x, self.dropout, splitmix(self.seed.get() ^ self.stream))
        } else {
            Ok(x.clone())
        }
    }
}

impl LinearHook for VarPair {
    /// Plain LoRA as one fused op, `x W^T + (s x' A^T) B^T`, keeping one `(rows, out)`
    /// tensor for the backward instead of three; DoRA op by op.
    fn project(&self, lin: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.dora.is_some() {
            return composed(self, lin, x);
        }
        let t = (self.update_input(x)?.matmul(&self.a.as_tensor().t()?)? * self.scale)?;
        lin.forward_train_plus(x, &t, self.b.as_tensor())
    }

    fn post_linear(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        let dropped = self.dropping();
        let xd = self.update_input(x)?;
        let lora = (xd
            .matmul(&self.a.as_tensor().t()?)?
            .matmul(&self.b.as_tensor().t()?)?
            * self.scale)?;
        let Some(d) = &self.dora else {
            return y + lora;
        };
        let ba = (self
            .b
            .as_tensor()
            .detach()
            .matmul(&self.a.as_tensor().detach())?
            * self.scale)?;
        let norm = (&d.weight + ba)?.sqr()?.sum(1)?.sqrt()?.detach();
        let g = (d.magnitude.as_tensor() / norm)?;
        if dropped {
            let base_d = xd.matmul(&d.weight.t()?)?;
            let g1 = (&g - 1.0)?;
            y + (base_d.broadcast_mul(&g1)? + lora.broadcast_mul(&g)?)?
        } else {
            (y + lora)?.broadcast_mul(&g)
        }
    }
}

/// All trainable pairs of a model.
pub struct LoraVars {
    pub layers: Vec<[Option<VarPair>; 7]>,
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
}

impl TensorAdapter for LoraVars {
    fn linear(&self, layer: usize, m: Module) -> Option<&dyn LinearHook> {
        self.layers.get(layer)?[m.index()]
            .as_ref()
            .map(|p| p as &dyn LinearHook)
    }
}

impl LoraVars {
    /// Fresh parameters for `targets` in every layer; with `dora` (the base weights), DoRA's
    /// magnitudes too.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        dev: &Device,
        cfg: &LlamaConfig,
        dora: Option<&Weights>,
        targets: &[Module],
        rank: usize,
        alpha: f64,
        use_rslora: bool,
        dropout: f32,
        seed: u64,
    ) -> candle_core::Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let scale = if use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            let mut l: [Option<VarPair>; 7] = Default::default();
            for &m in targets {
                let (out, inp) = m.shape(cfg);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                l[m.index()] = Some(VarPair {
                    a: Var::from_tensor(&Tensor::from_vec(a, (rank, inp), dev)?)?,
                    b: Var::zeros((out, rank), DType::F32, dev)?,
                    scale,
                    dropout,
                    train: true,
                    dora: match dora {
                        Some(w) => {
                            // f32 on any device (a GPU holds the base in bf16).
                            let weight = m
                                .of(&w.layers[layers.len()])
                                .weight_kept()?
                                .to_dtype(DType::F32)?;
                            let norm = weight.sqr()?.sum(1)?.sqrt()?;
                            Some(DoraVar {
                                magnitude: Var::from_tensor(&norm)?,
                                weight,
                            })
                        }
                        None => None,
                    },
                    stream: splitmix(seed ^ splitmix((layers.len() * 7 + m.index()) as u64)),
                    seed: Cell::new(0),
                });
            }
            layers.push(l);
        }
        Ok(Self {
            layers,
            rank,
            alpha,
            use_rslora,
            use_dora: dora.is_some(),
        })
    }
}

impl Trainable for LoraVars {
    /// A and B of every target from the adapter's LoRA pairs (PEFT's scale included in
    /// them already, so the scales must agree); the targets must be the same.
    fn start_from(&self, adapter: &Adapter) -> Result<(), String> {
        if self.use_dora {
            return Err("a DoRA adapter cannot be continued".into());
        }
        for (l, layer) in self.layers.iter().enumerate() {
            for (m, pair) in layer.iter().enumerate() {
                let delta = adapter.linear.get(l).and_then(|d| d[m].as_ref());
                match (pair, delta) {
                    (None, None) => {}
                    (Some(p), Some(LinearDelta::Lora(d))) => {
                        if (d.scale as f64 - p.scale).abs() > 1e-6 * p.scale.abs().max(1.0) {
                            return Err(format!(
                                "layer {l} module {m}: scale {} against the job's {}",
                                d.scale, p.scale
                            ));
                        }
                        let dev = p.a.device();
                        let a = Tensor::from_slice(&d.a.to_f32(), (d.rank, d.in_features), dev)
                            .map_err(|e| e.to_string())?;
                        let b = Tensor::from_slice(&d.b.to_f32(), (d.out_features, d.rank), dev)
                            .map_err(|e| e.to_string())?;
                        if a.dims() != p.a.dims() || b.dims() != p.b.dims() {
                            return Err(format!("layer {l} module {m}: shapes differ"));
                        }
                        p.a.set(&a).map_err(|e| e.to_string())?;
                        p.b.set(&b).map_err(|e| e.to_string())?;
                    }
                    _ => return Err(format!("layer {l} module {m}: not a LoRA pair of both")),
                }
            }
        }
        Ok(())
    }

    /// Layer by layer, module by module, A then B.
    fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| l.iter().flatten())
            .flat_map(|p| {
                let mut v = vec![p.a.clone(), p.b.clone()];
                v.extend(p.dora.as_ref().map(|d| d.magnitude.clone()));
                v
            })
            .collect()
    }

    fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (li, l) in self.layers.iter().enumerate() {
            for m in Module::ALL {
                if let Some(p) = &l[m.index()] {
                    out.push(format!("{li}.{}.a", m.hf_name()));
                    out.push(format!("{li}.{}.b", m.hf_name()));
                    if p.dora.is_some() {
                        out.push(format!("{li}.{}.magnitude", m.hf_name()));
                    }
                }
            }
        }
        out
    }

    fn set_dropout_seed(&self, seed: u64) {
        for p in self.layers.iter().flat_map(|l| l.iter().flatten()) {
            p.seed.set(seed);
        }
    }

    fn set_train(&mut self, train: bool) {
        for p in self.layers.iter_mut().flat_map(|l| l.iter_mut().flatten()) {
            p.train = train;
        }
    }

    fn export(&self) -> candle_core::Result<Parsed> {
        let mut w = Adapter::new(self.layers.len());
        for (li, l) in self.layers.iter().enumerate() {
            for m in Module::ALL {
                if let Some(p) = &l[m.index()] {
                    let (rank, inp) = p.a.dims2()?;
                    let (out, _) = p.b.dims2()?;
                    let pair = LoraPair {
                        a: p.a.flatten_all()?.to_vec1::<f32>()?.into(),
                        b: p.b.flatten_all()?.to_vec1::<f32>()?.into(),
                        rank,
                        in_features: inp,
                        out_features: out,
                        scale: p.scale as f32,
                    };
                    w.linear[li][m.index()] = Some(match &p.dora {
                        None => LinearDelta::Lora(pair),
                        // The gain is computed from the base when the adapter is compiled.
                        Some(d) => LinearDelta::Dora(Box::new(Dora {
                            lora: pair,
                            magnitude: d.magnitude.flatten_all()?.to_vec1()?,
                            gain: Vec::new(),
                        })),
                    });
                }
            }
        }
        Ok(Parsed {
            details: Details::Lora {
                rank: self.rank,
                alpha: self.alpha,
                target_modules: w
                    .modules()
                    .iter()
                    .map(|m| m.hf_name().to_string())
                    .collect(),
                use_rslora: self.use_rslora,
                use_dora: self.use_dora,
            },
            adapter: w,
            prompt: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Result, Tensor, Var};

    use super::{composed, splitmix, Cell, Linear, LinearHook, VarPair};
    use crate::model::fused::check::same;

    /// A trained LoRA pair's fused `project` gives the hook points' values and gradients,
    /// with and without dropout (the same mask both ways).
    #[test]
    fn a_pairs_fused_projection_is_its_hook_points() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, inp, out, r) = (5, 16, 10, 4);
        let lin = Linear::new(Tensor::randn(0f32, 1.0, (out, inp), &dev)?);
        for dropout in [0.0, 0.3] {
            let pair = VarPair {
                a: Var::randn(0f32, 1.0, (r, inp), &dev)?,
                b: Var::randn(0f32, 1.0, (out, r), &dev)?,
                scale: 2.0,
                dropout,
                train: true,
                dora: None,
                stream: splitmix(3),
                seed: Cell::new(11),
            };
            let x = Var::randn(0f32, 1.0, (rows, inp), &dev)?;
            let fused = pair.project(&lin, &x)?;
            let plain = composed(&pair, &lin, &x)?;
            same(&[&x, &pair.a, &pair.b], &fused, &plain, 1e-4)?;
        }
        Ok(())
    }
}
