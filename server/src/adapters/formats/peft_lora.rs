//! Hugging Face PEFT LoRA files <-> an [`Adapter`] of LoRA pairs in the model's layout.
//! Reads `adapter_config.json` + `adapter_model.safetensors` as PEFT saves them, checks them
//! against the base model, and permutes q/k `lora_B` rows from the HF order into the GGUF
//! order (and back on export).
//! Invariant: a refused adapter produces an [`ImportError`] naming what is wrong; nothing is
//! partially accepted.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use rayon::prelude::*;

use regex::Regex;
use safetensors::{tensor::TensorView, SafeTensors};
use serde::Deserialize;
use serde_json::Value;

use super::{
    check_base, err, module_tensor, permute_rows, serialize, to_f32, to_f32s, Details, ImportError,
    ImportPolicy, Parsed, Scan, Targets, CONFIG_FILE, WEIGHTS_FILE,
};
use crate::model::{
    adapter::{Dora, LinearDelta},
    lora::LoraPair,
    Adapter, LlamaConfig, Module,
};

#[derive(Debug, Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    target_modules: Value,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    rank_pattern: HashMap<String, usize>,
    #[serde(default)]
    alpha_pattern: HashMap<String, f64>,
    #[serde(default)]
    layers_to_transform: Value,
    bias: Option<String>,
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
}

/// Most keys a `rank_pattern` or `alpha_pattern` may have, and the longest key.
pub const MAX_PATTERNS: usize = 1024;
pub const MAX_PATTERN_CHARS: usize = 256;

/// PEFT's pattern lookup, compiled once per adapter: a key `k` applies to module `name` when
/// `name` ends with `.k` (keys tried in sorted order, the first match wins).
struct Patterns<T> {
    compiled: Vec<(Regex, T)>,
}

impl<T: Copy> Patterns<T> {
    fn compile(patterns: &HashMap<String, T>, field: &str) -> Result<Self, ImportError> {
        if patterns.len() > MAX_PATTERNS {
            return Err(err(
                format!("{CONFIG_FILE}.{field}"),
                format!("{} keys; at most {MAX_PATTERNS}", patterns.len()),
            ));
        }
        let mut keys: Vec<(&String, &T)> = patterns.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        let compiled = keys
            .into_iter()
            .map(|(k, v)| {
                if k.chars().count() > MAX_PATTERN_CHARS {
                    return Err(err(
                        format!("{CONFIG_FILE}.{field}"),
                        format!("a key is longer than {MAX_PATTERN_CHARS} characters"),
                    ));
                }
                let re = Regex::new(&format!("^(.*\\.)?(?:{k})$")).map_err(|e| {
                    err(
                        format!("{CONFIG_FILE}.{field}"),
                        format!("bad pattern {k:?}: {e}"),
                    )
                })?;
                Ok((re, *v))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { compiled })
    }

    fn get(&self, name: &str) -> Option<T> {
        self.compiled
            .iter()
            .find(|(re, _)| re.is_match(name))
            .map(|(_, v)| *v)
    }
}

/// Parses and checks a PEFT LoRA adapter against the model `cfg` (named `base_name`).
/// Called through [`super::parse`], which checks the config's size and picks the reader.
pub(super) fn parse(
    config_json: &[u8],
    weights: &Bytes,
    cfg: &LlamaConfig,
    base_name: &str,
    policy: &ImportPolicy,
    scan: Scan,
) -> Result<Parsed, ImportError> {
    let c: PeftConfig = serde_json::from_slice(config_json)
        .map_err(|e| err(CONFIG_FILE, format!("not a valid PEFT config: {e}")))?;
    let rank_pattern = Patterns::compile(&c.rank_pattern, "rank_pattern")?;
    let alpha_pattern = Patterns::compile(&c.alpha_pattern, "alpha_pattern")?;
    debug_assert_eq!(c.peft_type.as_deref(), Some("LORA"));
    // modules_to_save (a head) was split off by `heads::split`.
    if let Some(b) = c.bias.as_deref() {
        if b != "none" {
            return Err(err(
                format!("{CONFIG_FILE}.bias"),
                format!("bias {b:?} is not supported; only \"none\""),
            ));
        }
    }
    let r =
        c.r.ok_or_else(|| err(format!("{CONFIG_FILE}.r"), "missing"))?;
    let alpha = c.lora_alpha.unwrap_or(8.0);
    if r == 0 {
        return Err(err(format!("{CONFIG_FILE}.r"), "rank must be at least 1"));
    }
    check_base(c.base_model_name_or_path.as_deref(), base_name, policy)?;
    let targets = Targets::parse(&c.target_modules, "target_modules")?;
    let layers: Option<Vec<usize>> = match &c.layers_to_transform {
        Value::Null => None,
        Value::Number(n) => Some(vec![n.as_u64().unwrap_or(u64::MAX) as usize]),
        Value::Array(a) => Some(
            a.iter()
                .map(|v| v.as_u64().unwrap_or(u64::MAX) as usize)
                .collect(),
        ),
        _ => {
            return Err(err(
                format!("{CONFIG_FILE}.layers_to_transform"),
                "expected an int or a list of ints",
            ))
        }
    };
    let _ = c.fan_in_fan_out; // lora_A/lora_B shapes are the same either way.

    let st = SafeTensors::deserialize(weights)
        .map_err(|e| err(WEIGHTS_FILE, format!("not a valid safetensors file: {e}")))?;
    // key -> (A, B) views
    let mut pairs: BTreeMap<(usize, Module), [Option<TensorView<'_>>; 3]> = BTreeMap::new();
    for (name, view) in st.tensors() {
        // model.layers.N.parent.module.lora_A[.adapter].weight, ...lora_magnitude_vector
        let parsed = module_tensor(&name).and_then(|(layer, m, rest)| {
            let which = match rest.as_slice() {
                ["lora_A", .., "weight"] => 0,
                ["lora_B", .., "weight"] => 1,
                ["lora_magnitude_vector"] | ["lora_magnitude_vector", "weight"] => 2,
                _ => return None,
            };
            Some((layer, m, which))
        });
        let Some((layer, m, which)) = parsed else {
            return Err(err(
                WEIGHTS_FILE,
                format!("tensor {name:?} is not a LoRA weight of a module this model has"),
            ));
        };
        if layer >= cfg.num_layers {
            return Err(err(
                WEIGHTS_FILE,
                format!(
                    "tensor {name:?} names layer {layer}; the model has {}",
                    cfg.num_layers
                ),
            ));
        }
        pairs.entry((layer, m)).or_insert([None, None, None])[which] = Some(view);
    }
    // PEFT's marker for an adapter that adapts no module (only `modules_to_save`, a head).
    let head_only = c.target_modules.as_str() == Some(DUMMY_TARGET_MODULES);
    if pairs.is_empty() && !head_only {
        return Err(err(WEIGHTS_FILE, "holds no LoRA tensors"));
    }
    if head_only && !pairs.is_empty() {
        return Err(err(
            format!("{CONFIG_FILE}.target_modules"),
            format!(
                "{DUMMY_TARGET_MODULES:?} targets no module, but {WEIGHTS_FILE} holds LoRA tensors"
            ),
        ));
    }
    // Each module's tensors converted on its own (in parallel: this is most of a cold
    // load's time), the first problem in module order reported.
    let module = |((layer, m), [a, b, mag]): ((usize, Module), [Option<TensorView<'_>>; 3])| -> Result<(usize, Module, usize, LinearDelta), ImportError> {
        let key = m.hf_key(layer);
        if !targets.matches(&key, m) || layers.as_ref().is_some_and(|l| !l.contains(&layer)) {
            return Err(err(
                WEIGHTS_FILE,
                format!("{key} has LoRA weights but the config does not target it"),
            ));
        }
        let (Some(a), Some(b)) = (a, b) else {
            return Err(err(
                WEIGHTS_FILE,
                format!("{key} needs both lora_A and lora_B"),
            ));
        };
        let mr = rank_pattern.get(&key).unwrap_or(r);
        let ma = alpha_pattern.get(&key).unwrap_or(alpha);
        if mr > policy.max_rank {
            return Err(err(
                format!("{CONFIG_FILE}.r"),
                format!(
                    "rank {mr} of {key} is above this server's maximum {}",
                    policy.max_rank
                ),
            ));
        }
        let (out_f, in_f) = m.shape(cfg);
        if a.shape() != [mr, in_f] || b.shape() != [out_f, mr] {
            return Err(err(
                WEIGHTS_FILE,
                format!("{key}: lora_A is {:?} and lora_B {:?}; this model needs [{mr}, {in_f}] and [{out_f}, {mr}]", a.shape(), b.shape()),
            ));
        }
        // Read in place from the file where they can be (f32, aligned): only q's and k's
        // `B` are copied, their rows permuted into the model's order.
        let av = to_f32s(&format!("{key}.lora_A"), &a, weights, scan)?;
        let mut bv = to_f32s(&format!("{key}.lora_B"), &b, weights, scan)?;
        match m {
            Module::Q => bv = permute_rows(&bv, cfg.num_heads, out_f, mr, true).into(),
            Module::K => bv = permute_rows(&bv, cfg.num_kv_heads, out_f, mr, true).into(),
            _ => {}
        }
        let scale = if c.use_rslora {
            ma / (mr as f64).sqrt()
        } else {
            ma / mr as f64
        } as f32;
        let pair = LoraPair {
            a: av.into(),
            b: bv.into(),
            rank: mr,
            in_features: in_f,
            out_features: out_f,
            scale,
        };
        let delta = match (mag, c.use_dora) {
            (None, false) => LinearDelta::Lora(pair),
            (Some(_), false) => {
                return Err(err(
                    WEIGHTS_FILE,
                    format!("{key} has a lora_magnitude_vector but the config's use_dora is false"),
                ))
            }
            (None, true) => {
                return Err(err(
                    format!("{CONFIG_FILE}.use_dora"),
                    format!("use_dora is true but {key} has no lora_magnitude_vector in {WEIGHTS_FILE} (DoRA needs one per module)"),
                ))
            }
            (Some(mv), true) => {
                if mv.shape() != [out_f] {
                    return Err(err(
                        format!("{WEIGHTS_FILE}.{key}.lora_magnitude_vector"),
                        format!(
                            "the DoRA magnitude is {:?}; this module needs [{out_f}] (one per output feature)",
                            mv.shape()
                        ),
                    ));
                }
                let mut magnitude = to_f32(&format!("{key}.lora_magnitude_vector"), &mv)?;
                match m {
                    Module::Q => {
                        magnitude = permute_rows(&magnitude, cfg.num_heads, out_f, 1, true)
                    }
                    Module::K => {
                        magnitude = permute_rows(&magnitude, cfg.num_kv_heads, out_f, 1, true)
                    }
                    _ => {}
                }
                LinearDelta::Dora(Box::new(Dora {
                    lora: pair,
                    magnitude,
                    gain: Vec::new(),
                }))
            }
        };
        Ok((layer, m, mr, delta))
    };
    let modules: Vec<_> = pairs.into_par_iter().map(module).collect();
    let mut out = Adapter::new(cfg.num_layers);
    let mut max_rank = 0;
    for r in modules {
        let (layer, m, mr, delta) = r?;
        max_rank = max_rank.max(mr);
        out.linear[layer][m.index()] = Some(delta);
    }
    let target_modules = out
        .modules()
        .iter()
        .map(|m| m.hf_name().to_string())
        .collect();
    Ok(Parsed {
        details: Details::Lora {
            rank: max_rank,
            alpha,
            target_modules,
            use_rslora: c.use_rslora,
            use_dora: c.use_dora,
        },
        adapter: out,
        prompt: None,
    })
}

/// PEFT's `target_modules` for a LoRA adapter of no module (`peft.utils.constants`).
pub const DUMMY_TARGET_MODULES: &str = "dummy-target-modules";

/// Writes a LoRA adapter as PEFT files (HF layout, f32): `(adapter_config.json,
/// adapter_model.safetensors)`. `alpha` is recorded so that `alpha / r` (or `/ sqrt(r)`)
/// gives back each pair's scale.
pub(super) fn write(
    p: &Parsed,
    cfg: &LlamaConfig,
    base_model: &str,
) -> Result<(Vec<u8>, Vec<u8>), ImportError> {
    let Details::Lora {
        rank,
        alpha,
        target_modules,
        use_rslora,
        use_dora,
    } = &p.details
    else {
        return Err(err("method", "not a LoRA adapter"));
    };
    let (rank, alpha, use_rslora) = (*rank, *alpha, *use_rslora);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    for layer in 0..p.adapter.linear.len() {
        for m in Module::ALL {
            let Some(d) = p.adapter.linear(layer, m) else {
                continue;
            };
            let Some(pair) = d.low_rank() else {
                return Err(err("method", "a LoRA adapter holds a non-LoRA module"));
            };
            let key = m.hf_key(layer);
            let b = pair.b.to_f32();
            let b = match m {
                Module::Q | Module::K => {
                    let heads = if m == Module::Q {
                        cfg.num_heads
                    } else {
                        cfg.num_kv_heads
                    };
                    permute_rows(&b, heads, pair.out_features, pair.rank, false)
                }
                _ => b.into_owned(),
            };
            tensors.push((
                format!("base_model.model.{key}.lora_A.weight"),
                vec![pair.rank, pair.in_features],
                pair.a.to_f32().into_owned(),
            ));
            tensors.push((
                format!("base_model.model.{key}.lora_B.weight"),
                vec![pair.out_features, pair.rank],
                b,
            ));
            if let LinearDelta::Dora(d) = d {
                let n = pair.out_features;
                let mag = match m {
                    Module::Q => permute_rows(&d.magnitude, cfg.num_heads, n, 1, false),
                    Module::K => permute_rows(&d.magnitude, cfg.num_kv_heads, n, 1, false),
                    _ => d.magnitude.clone(),
                };
                tensors.push((
                    format!("base_model.model.{key}.lora_magnitude_vector"),
                    vec![n],
                    mag,
                ));
            }
            let denom = if use_rslora {
                (pair.rank as f64).sqrt()
            } else {
                pair.rank as f64
            };
            let a = pair.scale as f64 * denom;
            if pair.rank != rank {
                rank_pattern.insert(key.clone(), pair.rank.into());
            }
            if (a - alpha).abs() > 1e-6 * alpha.abs().max(1.0) {
                alpha_pattern.insert(key, serde_json::json!(a));
            }
        }
    }
    let st = serialize(&tensors)?;
    let target_modules = if target_modules.is_empty() {
        serde_json::json!(DUMMY_TARGET_MODULES)
    } else {
        serde_json::json!(target_modules)
    };
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "modules_to_save": null,
        "inference_mode": true,
    });
    let config = serde_json::to_vec_pretty(&config).map_err(|e| err(CONFIG_FILE, e.to_string()))?;
    Ok((config, st))
}

#[cfg(test)]
mod tests {
    use super::{super::normalise, *};

    #[test]
    fn permutation_round_trips() {
        let v: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let g = permute_rows(&v, 2, 12, 2, true);
        assert_ne!(g, v);
        assert_eq!(permute_rows(&g, 2, 12, 2, false), v);
    }

    #[test]
    fn permutation_matches_the_weight_permutation() {
        use candle_core::{Device, Tensor};
        let v: Vec<f32> = (0..48).map(|x| x as f32).collect();
        let t = Tensor::from_vec(v.clone(), (12, 4), &Device::Cpu).expect("t");
        let want: Vec<f32> = crate::model::weights::permute_hf_to_gguf(&t, 3)
            .expect("permute")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec");
        assert_eq!(permute_rows(&v, 3, 12, 4, true), want);
    }

    #[test]
    fn names_are_normalised_for_base_matching() {
        assert_eq!(
            normalise("HuggingFaceTB/SmolLM2-135M-Instruct"),
            "smollm2135minstruct"
        );
    }
}
