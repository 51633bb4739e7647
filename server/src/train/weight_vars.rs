//! Trainable IA3 vectors and bottleneck adapters, initialised as their libraries do: IA3's
//! vectors at one (PEFT's `init_ia3_weights`, so training starts from the base model), a
//! bottleneck's linear weights normal with std 0.02 and zero biases (AdapterHub's default
//! `init_weights: "bert"`), its own layer norms at weight one, bias zero.

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};

use super::{prompt_vars::normal, trainable::Trainable};
use crate::{
    adapters::formats::{BnSettings, Details, Parsed},
    model::{
        adapter::{Bottleneck, LinearDelta, LinearHook, SublayerHook, TensorAdapter},
        bottleneck::{after_sublayer, Activation, BottleneckTensors},
        lora::transpose,
        Adapter, LlamaConfig, Module, Sublayer,
    },
};

fn to_vec(v: &Var) -> candle_core::Result<Vec<f32>> {
    v.flatten_all()?.to_vec1()
}

/// One module's IA3 vector.
pub struct Ia3Var {
    pub l: Var,
    pub on_input: bool,
}

impl LinearHook for Ia3Var {
    fn pre_linear(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.on_input {
            x.broadcast_mul(self.l.as_tensor())
        } else {
            Ok(x.clone())
        }
    }

    fn post_linear(&self, _x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        if self.on_input {
            Ok(y)
        } else {
            y.broadcast_mul(self.l.as_tensor())
        }
    }
}

pub struct Ia3Vars {
    pub layers: Vec<[Option<Ia3Var>; 7]>,
    pub target_modules: Vec<String>,
    pub feedforward_modules: Vec<String>,
}

impl Ia3Vars {
    pub fn init(
        cfg: &LlamaConfig,
        target_modules: &[String],
        feedforward_modules: &[String],
    ) -> candle_core::Result<Self> {
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            let mut l: [Option<Ia3Var>; 7] = Default::default();
            for m in target_modules
                .iter()
                .filter_map(|t| Module::from_hf_name(t))
            {
                let on_input = feedforward_modules.iter().any(|f| f == m.hf_name());
                let (out, inp) = m.shape(cfg);
                let n = if on_input { inp } else { out };
                l[m.index()] = Some(Ia3Var {
                    l: Var::ones(n, DType::F32, &Device::Cpu)?,
                    on_input,
                });
            }
            layers.push(l);
        }
        Ok(Self {
            layers,
            target_modules: target_modules.to_vec(),
            feedforward_modules: feedforward_modules.to_vec(),
        })
    }
}

impl TensorAdapter for Ia3Vars {
    fn linear(&self, layer: usize, m: Module) -> Option<&dyn LinearHook> {
        self.layers.get(layer)?[m.index()]
            .as_ref()
            .map(|v| v as &dyn LinearHook)
    }
}

impl Trainable for Ia3Vars {
    fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| l.iter().flatten())
            .map(|v| v.l.clone())
            .collect()
    }

    fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (li, l) in self.layers.iter().enumerate() {
            for m in Module::ALL {
                if l[m.index()].is_some() {
                    out.push(format!("{li}.{}.ia3_l", m.hf_name()));
                }
            }
        }
        out
    }

    fn export(&self) -> candle_core::Result<Parsed> {
        let mut a = Adapter::new(self.layers.len());
        for (li, l) in self.layers.iter().enumerate() {
            for m in Module::ALL {
                if let Some(v) = &l[m.index()] {
                    a.linear[li][m.index()] = Some(LinearDelta::Ia3 {
                        scale: to_vec(&v.l)?,
                        on_input: v.on_input,
                    });
                }
            }
        }
        Ok(Parsed {
            details: Details::Ia3 {
                target_modules: self.target_modules.clone(),
                feedforward_modules: self.feedforward_modules.clone(),
            },
            adapter: a,
            prompt: None,
        })
    }
}

/// One bottleneck's parameters.
pub struct BottleneckVar {
    down: Var,
    down_bias: Var,
    up: Var,
    up_bias: Var,
    ln_before: Option<(Var, Var)>,
    ln_after: Option<(Var, Var)>,
    act: Activation,
    settings: std::sync::Arc<BnSettings>,
}

impl BottleneckVar {
    fn all(&self) -> Vec<(&'static str, Var)> {
        let mut v = vec![
            ("down", self.down.clone()),
            ("down_bias", self.down_bias.clone()),
            ("up", self.up.clone()),
            ("up_bias", self.up_bias.clone()),
        ];
        if let Some((w, b)) = &self.ln_before {
            v.push(("ln_before.weight", w.clone()));
            v.push(("ln_before.bias", b.clone()));
        }
        if let Some((w, b)) = &self.ln_after {
            v.push(("ln_after.weight", w.clone()));
            v.push(("ln_after.bias", b.clone()));
        }
        v
    }
}

impl SublayerHook for BottleneckVar {
    fn after_sublayer(&self, h: &Tensor, r: &Tensor) -> candle_core::Result<Tensor> {
        let ln = |l: &Option<(Var, Var)>| {
            l.as_ref()
                .map(|(w, b)| (w.as_tensor().clone(), b.as_tensor().clone()))
        };
        let t = BottleneckTensors {
            down: self.down.as_tensor().clone(),
            down_bias: self.down_bias.as_tensor().clone(),
            up: self.up.as_tensor().clone(),
            up_bias: self.up_bias.as_tensor().clone(),
            ln_before: ln(&self.ln_before),
            ln_after: ln(&self.ln_after),
        };
        after_sublayer(
            &t,
            self.act,
            self.settings.scaling,
            self.settings.placement(),
            h,
            r,
        )
    }
}

pub struct BottleneckVars {
    pub layers: Vec<[Option<BottleneckVar>; 2]>,
    pub settings: std::sync::Arc<BnSettings>,
}

impl BottleneckVars {
    pub fn init(cfg: &LlamaConfig, settings: &BnSettings, seed: u64) -> candle_core::Result<Self> {
        let act = Activation::parse(&settings.non_linearity).ok_or_else(|| {
            candle_core::Error::Msg(format!("unknown non-linearity {}", settings.non_linearity))
        })?;
        let dev = Device::Cpu;
        let settings = std::sync::Arc::new(settings.clone());
        let mut rng = StdRng::seed_from_u64(seed);
        let h = cfg.hidden_size;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for li in 0..cfg.num_layers {
            let mut l: [Option<BottleneckVar>; 2] = Default::default();
            for site in settings.sites(li) {
                let d = settings.size(li, h);
                let w = |rng: &mut StdRng, shape: (usize, usize)| -> candle_core::Result<Var> {
                    let v: Vec<f32> = normal(rng, shape.0 * shape.1)
                        .into_iter()
                        .map(|x| x * 0.02)
                        .collect();
                    Var::from_tensor(&Tensor::from_vec(v, shape, &dev)?)
                };
                let norm = |on: bool| -> candle_core::Result<Option<(Var, Var)>> {
                    on.then(|| {
                        Ok((
                            Var::ones(h, DType::F32, &dev)?,
                            Var::zeros(h, DType::F32, &dev)?,
                        ))
                    })
                    .transpose()
                };
                l[site.index()] = Some(BottleneckVar {
                    down: w(&mut rng, (d, h))?,
                    down_bias: Var::zeros(d, DType::F32, &dev)?,
                    up: w(&mut rng, (h, d))?,
                    up_bias: Var::zeros(h, DType::F32, &dev)?,
                    ln_before: norm(settings.ln_before)?,
                    ln_after: norm(settings.ln_after)?,
                    act,
                    settings: settings.clone(),
                });
            }
            layers.push(l);
        }
        Ok(Self { layers, settings })
    }
}

impl TensorAdapter for BottleneckVars {
    fn sublayer(&self, layer: usize, site: Sublayer) -> Option<&dyn SublayerHook> {
        self.layers.get(layer)?[site.index()]
            .as_ref()
            .map(|b| b as &dyn SublayerHook)
    }
}

impl Trainable for BottleneckVars {
    fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| l.iter().flatten())
            .flat_map(|b| b.all().into_iter().map(|(_, v)| v))
            .collect()
    }

    fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (li, l) in self.layers.iter().enumerate() {
            for site in Sublayer::ALL {
                if let Some(b) = &l[site.index()] {
                    for (n, _) in b.all() {
                        out.push(format!("{li}.{site:?}.{n}"));
                    }
                }
            }
        }
        out
    }

    fn export(&self) -> candle_core::Result<Parsed> {
        let mut a = Adapter::new(self.layers.len());
        a.linear.clear();
        a.sublayer = (0..self.layers.len()).map(|_| Default::default()).collect();
        for (li, l) in self.layers.iter().enumerate() {
            for site in Sublayer::ALL {
                let Some(b) = &l[site.index()] else {
                    continue;
                };
                let (hidden, size) = b.up.dims2()?;
                let ln =
                    |l: &Option<(Var, Var)>| -> candle_core::Result<Option<(Vec<f32>, Vec<f32>)>> {
                        l.as_ref()
                            .map(|(w, b)| Ok((to_vec(w)?, to_vec(b)?)))
                            .transpose()
                    };
                a.sublayer[li][site.index()] = Some(Bottleneck {
                    hidden,
                    size,
                    down: to_vec(&b.down)?,
                    down_bias: to_vec(&b.down_bias)?,
                    up_t: transpose(&to_vec(&b.up)?, hidden, size),
                    up_bias: to_vec(&b.up_bias)?,
                    act: b.act,
                    scaling: self.settings.scaling as f32,
                    placement: self.settings.placement(),
                    ln_before: ln(&b.ln_before)?,
                    ln_after: ln(&b.ln_after)?,
                });
            }
        }
        Ok(Parsed {
            details: Details::Bottleneck((*self.settings).clone()),
            adapter: a,
            prompt: None,
        })
    }
}
