//! AdamW with decoupled weight decay, learning-rate schedules and gradient clipping.
//! Written here rather than taken from candle-nn because checkpoints must save and restore
//! the moment estimates, which candle-nn's `AdamW` keeps private.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Tensor, Var};

/// Learning-rate schedule after warm-up (stored in job specs by name: an unknown name is an
/// error, never a silent default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// `lr` at optimizer step `step` (0-based) of `total`: linear warm-up over `warmup` steps,
/// then the schedule down to 0 at `total`.
impl Schedule {
    /// `constant`, `linear` or `cosine`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "constant" => Some(Self::Constant),
            "linear" => Some(Self::Linear),
            "cosine" => Some(Self::Cosine),
            _ => None,
        }
    }
}

pub fn lr_at(base: f64, schedule: Schedule, warmup: usize, total: usize, step: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - p),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
    }
}

pub struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: usize,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, weight_decay: f64) -> candle_core::Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<_>>()?;
        let v2 = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            vars,
            m,
            v: v2,
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    /// One update with learning rate `lr`; `grads` already averaged and clipped.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        for (i, var) in self.vars.iter().enumerate() {
            let g = &grads[i];
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moment estimates by index (for checkpoints).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for i in 0..self.vars.len() {
            out.insert(format!("adam.m.{i}"), self.m[i].clone());
            out.insert(format!("adam.v.{i}"), self.v[i].clone());
        }
        // The optimizer's own step count (bias correction): several updates per training
        // step (RL's iterations and epochs) make it differ from the training step.
        if let Ok(t) = Tensor::new(&[self.step as u32], &candle_core::Device::Cpu) {
            out.insert("adam.step".into(), t);
        }
        out
    }

    pub fn load_state(
        &mut self,
        saved: &HashMap<String, Tensor>,
        step: usize,
    ) -> Result<(), String> {
        for i in 0..self.vars.len() {
            let get = |k: String| {
                saved
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| format!("checkpoint lacks {k}"))
            };
            self.m[i] = get(format!("adam.m.{i}"))?;
            self.v[i] = get(format!("adam.v.{i}"))?;
        }
        // Checkpoints from before the count was saved: one update per training step.
        self.step = match saved.get("adam.step") {
            Some(t) => t
                .to_vec1::<u32>()
                .ok()
                .and_then(|v| v.first().copied())
                .ok_or("checkpoint's adam.step is not a count")? as usize,
            None => step,
        };
        Ok(())
    }
}

/// The gradients of `vars` from `grads` (zeros where a var got none).
pub fn collect(grads: &GradStore, vars: &[Var]) -> candle_core::Result<Vec<Tensor>> {
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            // Detached: a gradient that kept a graph would keep the step's forward alive
            // in the accumulated sum and the optimizer's moments.
            Some(g) => Ok(g.detach()),
            None => v.zeros_like(),
        })
        .collect()
}

/// Adds `grads` into the running sum `acc` (gradient accumulation over micro-batches).
pub fn accumulate(acc: &mut Option<Vec<Tensor>>, grads: Vec<Tensor>) -> candle_core::Result<()> {
    *acc = Some(match acc.take() {
        None => grads,
        Some(a) => a
            .iter()
            .zip(&grads)
            .map(|(x, y)| x + y)
            .collect::<candle_core::Result<_>>()?,
    });
    Ok(())
}

/// The mean of `n` accumulated gradients, scaled down to `max_norm` when above it (0: no
/// clipping), and their global norm before clipping (not finite: the caller's NaN).
pub fn mean_clipped(
    acc: Option<Vec<Tensor>>,
    n: usize,
    max_norm: f64,
) -> candle_core::Result<(Vec<Tensor>, f64)> {
    let n = n.max(1) as f64;
    let mut grads: Vec<Tensor> = acc
        .unwrap_or_default()
        .into_iter()
        .map(|g| g / n)
        .collect::<candle_core::Result<_>>()?;
    let norm = global_norm(&grads)?;
    if norm.is_finite() && max_norm > 0.0 && norm > max_norm {
        let f = max_norm / (norm + 1e-6);
        grads = grads
            .into_iter()
            .map(|g| g * f)
            .collect::<candle_core::Result<_>>()?;
    }
    Ok((grads, norm))
}

/// Global L2 norm of `grads`.
pub fn global_norm(grads: &[Tensor]) -> candle_core::Result<f64> {
    let mut s = 0f64;
    for g in grads {
        s += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(s.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_named_and_an_unknown_name_is_an_error() {
        for (name, s) in [
            ("constant", Schedule::Constant),
            ("linear", Schedule::Linear),
            ("cosine", Schedule::Cosine),
        ] {
            assert_eq!(Schedule::parse(name), Some(s));
            let json = serde_json::to_string(&s).expect("json");
            assert_eq!(json, format!("{name:?}"));
            assert_eq!(serde_json::from_str::<Schedule>(&json).expect("back"), s);
        }
        assert_eq!(Schedule::parse("linear_with_restarts"), None);
        // A stored job spec naming an unknown schedule fails to load, never runs as linear.
        assert!(serde_json::from_str::<Schedule>("\"weird\"").is_err());
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        assert!((lr_at(1.0, Schedule::Linear, 10, 110, 0) - 0.1).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Linear, 10, 110, 9) - 1.0).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Linear, 10, 110, 60) - 0.5).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Cosine, 0, 100, 50) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(1.0, Schedule::Constant, 0, 100, 99), 1.0);
    }

    #[test]
    fn adamw_moves_against_the_gradient() {
        let dev = candle_core::Device::Cpu;
        let v = Var::from_tensor(&Tensor::new(&[1.0f32, -1.0], &dev).expect("t")).expect("var");
        let mut opt = AdamW::new(vec![v.clone()], 0.0).expect("opt");
        let g = Tensor::new(&[0.5f32, -0.5], &dev).expect("g");
        opt.apply(&[g], 0.1).expect("step");
        let got: Vec<f32> = v.as_tensor().to_vec1().expect("vec");
        assert!(
            (got[0] - 0.9).abs() < 1e-5 && (got[1] + 0.9).abs() < 1e-5,
            "{got:?}"
        );
    }
}
