//! Hugging Face PEFT IA3 files <-> an [`Adapter`] of IA3 vectors in the model's layout.
//! PEFT saves one `ia3_l` per targeted module: `[out, 1]` scaling the output, or `[1, in]`
//! scaling the input of a module that is also in `feedforward_modules`. q/k output vectors
//! are permuted between the HF and the GGUF row order.
//! Invariant: a refused adapter produces an [`ImportError`] naming what is wrong; nothing is
//! partially accepted.

use std::collections::BTreeMap;

use safetensors::SafeTensors;
use serde::Deserialize;
use serde_json::Value;

use super::{
    check_base, err, module_tensor, permute_rows, serialize, to_f32, Details, ImportError,
    ImportPolicy, Parsed, Targets, CONFIG_FILE, WEIGHTS_FILE,
};
use crate::model::{adapter::LinearDelta, Adapter, LlamaConfig, Module};

#[derive(Debug, Deserialize)]
struct Ia3Config {
    #[serde(default)]
    target_modules: Value,
    #[serde(default)]
    feedforward_modules: Value,
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
}

/// PEFT's check: with both given as lists, `feedforward_modules` must be a subset of
/// `target_modules`.
fn check_subset(c: &Ia3Config) -> Result<(), ImportError> {
    let (Value::Array(t), Value::Array(f)) = (&c.target_modules, &c.feedforward_modules) else {
        return Ok(());
    };
    if let Some(x) = f.iter().find(|x| !t.contains(x)) {
        return Err(err(
            format!("{CONFIG_FILE}.feedforward_modules"),
            format!("{x} is not in target_modules; feedforward_modules must be a subset of them"),
        ));
    }
    Ok(())
}

pub(super) fn parse(
    config_json: &[u8],
    weights: &[u8],
    cfg: &LlamaConfig,
    base_name: &str,
    policy: &ImportPolicy,
) -> Result<Parsed, ImportError> {
    let c: Ia3Config = serde_json::from_slice(config_json)
        .map_err(|e| err(CONFIG_FILE, format!("not a valid PEFT config: {e}")))?;
    if c.fan_in_fan_out {
        return Err(err(
            format!("{CONFIG_FILE}.fan_in_fan_out"),
            "fan_in_fan_out is for Conv1D models; this model's modules are nn.Linear",
        ));
    }
    check_base(c.base_model_name_or_path.as_deref(), base_name, policy)?;
    let targets = Targets::parse(&c.target_modules, "target_modules")?;
    let feedforward = match &c.feedforward_modules {
        Value::Null => Targets::Names(Vec::new()),
        v => Targets::parse(v, "feedforward_modules")?,
    };
    check_subset(&c)?;
    let st = SafeTensors::deserialize(weights)
        .map_err(|e| err(WEIGHTS_FILE, format!("not a valid safetensors file: {e}")))?;
    let mut found = BTreeMap::new();
    for (name, view) in st.tensors() {
        let parsed = module_tensor(&name)
            .filter(|(_, _, rest)| matches!(rest.as_slice(), ["ia3_l", ..]))
            .filter(|(layer, _, _)| *layer < cfg.num_layers);
        let Some((layer, m, _)) = parsed else {
            return Err(err(
                WEIGHTS_FILE,
                format!("tensor {name:?} is not an IA3 vector of a module this model has"),
            ));
        };
        found.insert((layer, m), view);
    }
    if found.is_empty() {
        return Err(err(WEIGHTS_FILE, "holds no IA3 vectors"));
    }
    let mut out = Adapter::new(cfg.num_layers);
    let (mut target_modules, mut feedforward_modules) = (Vec::new(), Vec::new());
    for ((layer, m), view) in found {
        let key = m.hf_key(layer);
        if !targets.matches(&key, m) {
            return Err(err(
                WEIGHTS_FILE,
                format!("{key} has an IA3 vector but the config does not target it"),
            ));
        }
        let on_input = feedforward.matches(&key, m);
        let (out_f, in_f) = m.shape(cfg);
        let want = if on_input {
            vec![1, in_f]
        } else {
            vec![out_f, 1]
        };
        if view.shape() != want.as_slice() {
            return Err(err(
                format!("{WEIGHTS_FILE}.{key}.ia3_l"),
                format!(
                    "the IA3 vector is {:?}; this {} module needs {want:?}",
                    view.shape(),
                    if on_input {
                        "feed-forward (input-scaling)"
                    } else {
                        "output-scaling"
                    }
                ),
            ));
        }
        let mut scale = to_f32(&format!("{key}.ia3_l"), &view)?;
        if !on_input {
            scale = permute_for(m, cfg, &scale, true);
        }
        let name = m.hf_name().to_string();
        if !target_modules.contains(&name) {
            target_modules.push(name.clone());
        }
        if on_input && !feedforward_modules.contains(&name) {
            feedforward_modules.push(name);
        }
        out.linear[layer][m.index()] = Some(LinearDelta::Ia3 { scale, on_input });
    }
    Ok(Parsed {
        details: Details::Ia3 {
            target_modules,
            feedforward_modules,
        },
        adapter: out,
        prompt: None,
    })
}

/// q/k output vectors between HF and GGUF row order.
fn permute_for(m: Module, cfg: &LlamaConfig, v: &[f32], to_gguf: bool) -> Vec<f32> {
    match m {
        Module::Q => permute_rows(v, cfg.num_heads, v.len(), 1, to_gguf),
        Module::K => permute_rows(v, cfg.num_kv_heads, v.len(), 1, to_gguf),
        _ => v.to_vec(),
    }
}

/// Writes an IA3 adapter as PEFT files.
pub(super) fn write(
    p: &Parsed,
    cfg: &LlamaConfig,
    base_model: &str,
) -> Result<(Vec<u8>, Vec<u8>), ImportError> {
    let Details::Ia3 {
        target_modules,
        feedforward_modules,
    } = &p.details
    else {
        return Err(err("method", "not an IA3 adapter"));
    };
    let mut tensors = Vec::new();
    for layer in 0..p.adapter.linear.len() {
        for m in Module::ALL {
            let Some(LinearDelta::Ia3 { scale, on_input }) = p.adapter.linear(layer, m) else {
                continue;
            };
            let (shape, v) = if *on_input {
                (vec![1, scale.len()], scale.clone())
            } else {
                (vec![scale.len(), 1], permute_for(m, cfg, scale, false))
            };
            tensors.push((
                format!("base_model.model.{}.ia3_l", m.hf_key(layer)),
                shape,
                v,
            ));
        }
    }
    let config = serde_json::json!({
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": target_modules,
        "feedforward_modules": feedforward_modules,
        "fan_in_fan_out": false,
        "init_ia3_weights": true,
        "modules_to_save": null,
        "inference_mode": true,
    });
    let config = serde_json::to_vec_pretty(&config).map_err(|e| err(CONFIG_FILE, e.to_string()))?;
    Ok((config, serialize(&tensors)?))
}
