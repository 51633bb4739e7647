//! AdapterHub (`adapters` library) bottleneck adapters <-> an [`Adapter`] with bottlenecks
//! after the sublayers. The library saves `adapter_config.json` (`{"config": {...},
//! "model_type", "hidden_size", "name", ...}`) and the weights (`adapter.safetensors`, or a
//! torch pickle `pytorch_adapter.bin`, which graft does not read) named
//! `model.layers.N.{attention,output}_adapters.adapters.NAME.{adapter_down.0,adapter_up}.*`.
//! Supported: the sequential bottleneck configs (`DoubleSeqBnConfig`/Houlsby,
//! `SeqBnConfig`/Pfeiffer and any placement of theirs: residual and layer-norm flags, own
//! layer norms, per-layer reduction factors, `leave_out`, a constant `scaling`). Refused
//! with the field named: other architectures (prefix tuning, LoRA, union...), parallel
//! adapters, PHM/Compacter layers, gating, invertible adapters, learned scaling.

use std::collections::{BTreeMap, HashMap};

use safetensors::{tensor::TensorView, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    check_base, err, serialize, to_f32, Details, ImportError, ImportPolicy, Parsed, CONFIG_FILE,
};
use crate::model::{
    adapter::Bottleneck,
    bottleneck::{Activation, Placement},
    lora::transpose,
    Adapter, LlamaConfig, Sublayer,
};

/// AdapterHub's weights file (`SAFE_WEIGHTS_NAME`).
pub const WEIGHTS_FILE: &str = "adapter.safetensors";

/// A bottleneck adapter's settings, as AdapterHub's config has them (the `details` of a
/// stored version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BnSettings {
    /// The adapter's name inside the library (part of every weight's name).
    pub name: String,
    /// A bottleneck after attention (`mh_adapter`) / after the FFN (`output_adapter`).
    pub after_attention: bool,
    pub after_ffn: bool,
    pub reduction_factor: f64,
    /// Per-layer reduction factors (`{"3": 8}`), over `reduction_factor`.
    #[serde(default)]
    pub layer_reduction: BTreeMap<String, f64>,
    pub non_linearity: String,
    pub original_ln_before: bool,
    pub original_ln_after: bool,
    pub residual_before_ln: bool,
    pub adapter_residual_before_ln: bool,
    pub ln_before: bool,
    pub ln_after: bool,
    pub scaling: f64,
    /// Layers without adapters.
    #[serde(default)]
    pub leave_out: Vec<usize>,
}

impl BnSettings {
    /// Houlsby (`DoubleSeqBnConfig`) with the library's defaults.
    pub fn houlsby(name: &str) -> Self {
        Self {
            name: name.into(),
            after_attention: true,
            after_ffn: true,
            reduction_factor: 16.0,
            layer_reduction: BTreeMap::new(),
            non_linearity: "swish".into(),
            original_ln_before: false,
            original_ln_after: true,
            residual_before_ln: true,
            adapter_residual_before_ln: false,
            ln_before: false,
            ln_after: false,
            scaling: 1.0,
            leave_out: Vec::new(),
        }
    }

    pub fn placement(&self) -> Placement {
        Placement {
            residual_before_ln: self.residual_before_ln,
            original_ln_before: self.original_ln_before,
            original_ln_after: self.original_ln_after,
            adapter_residual_before_ln: self.adapter_residual_before_ln,
        }
    }

    /// The bottleneck width in `layer`: `int(hidden // reduction_factor)`, at least 1, as
    /// the library computes it.
    pub fn size(&self, layer: usize, hidden: usize) -> usize {
        let rf = self
            .layer_reduction
            .get(&layer.to_string())
            .copied()
            .unwrap_or(self.reduction_factor);
        ((hidden as f64 / rf).floor() as usize).max(1)
    }

    pub fn sites(&self, layer: usize) -> Vec<Sublayer> {
        if self.leave_out.contains(&layer) {
            return Vec::new();
        }
        let mut s = Vec::new();
        if self.after_attention {
            s.push(Sublayer::Attention);
        }
        if self.after_ffn {
            s.push(Sublayer::Ffn);
        }
        s
    }
}

fn site_name(site: Sublayer) -> &'static str {
    match site {
        Sublayer::Attention => "attention_adapters",
        Sublayer::Ffn => "output_adapters",
    }
}

fn field(f: &str) -> String {
    format!("{CONFIG_FILE}.config.{f}")
}

fn get_bool(
    c: &serde_json::Map<String, Value>,
    f: &str,
    default: bool,
) -> Result<bool, ImportError> {
    match c.get(f) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(err(field(f), format!("expected true or false, got {v}"))),
    }
}

/// Whether a config is AdapterHub's (rather than PEFT's).
pub fn is_adapterhub(config: &Value) -> bool {
    config.get("peft_type").is_none() && config.get("config").is_some_and(Value::is_object)
}

fn settings(top: &Value, cfg: &LlamaConfig) -> Result<BnSettings, ImportError> {
    let Some(c) = top.get("config").and_then(Value::as_object) else {
        return Err(err(format!("{CONFIG_FILE}.config"), "missing"));
    };
    match c.get("architecture") {
        None | Some(Value::Null) => {}
        Some(Value::String(a)) if a == "bottleneck" => {}
        Some(a) => {
            return Err(err(
                field("architecture"),
                format!("{a} is not supported; graft reads AdapterHub's bottleneck adapters"),
            ))
        }
    }
    if let Some(t) = top.get("model_type").and_then(Value::as_str) {
        if t != "llama" {
            return Err(err(
                format!("{CONFIG_FILE}.model_type"),
                format!("the adapter is for a {t:?} model; this server's model is a llama"),
            ));
        }
    }
    if let Some(h) = top.get("hidden_size").and_then(Value::as_u64) {
        if h as usize != cfg.hidden_size {
            return Err(err(
                format!("{CONFIG_FILE}.hidden_size"),
                format!("{h}; this model's hidden size is {}", cfg.hidden_size),
            ));
        }
    }
    for (f, what) in [
        ("is_parallel", "parallel adapters"),
        ("phm_layer", "PHM (Compacter) layers"),
        ("use_gating", "gated adapters"),
        ("cross_adapter", "cross adapters"),
    ] {
        if get_bool(c, f, false)? {
            return Err(err(field(f), format!("{what} are not supported")));
        }
    }
    if c.get("inv_adapter").is_some_and(|v| !v.is_null()) {
        return Err(err(
            field("inv_adapter"),
            "invertible adapters are not supported",
        ));
    }
    let non_linearity = c
        .get("non_linearity")
        .and_then(Value::as_str)
        .ok_or_else(|| err(field("non_linearity"), "missing"))?;
    if Activation::parse(non_linearity).is_none() {
        return Err(err(
            field("non_linearity"),
            format!("{non_linearity:?} is not supported (swish, silu, relu, gelu, gelu_new, tanh, sigmoid, leakyrelu, linear)"),
        ));
    }
    let scaling = match c.get("scaling") {
        None | Some(Value::Null) => 1.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(1.0),
        Some(v) => {
            return Err(err(
                field("scaling"),
                format!("{v} is not supported; only a constant factor"),
            ))
        }
    };
    let residual_before_ln = match c.get("residual_before_ln") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(err(
                field("residual_before_ln"),
                format!("{v} is not supported for Llama (the library passes it no layer norm)"),
            ))
        }
    };
    let positive = |v: &Value, f: &str| -> Result<f64, ImportError> {
        v.as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| err(field(f), format!("{v} is not a positive number")))
    };
    let (reduction_factor, layer_reduction) = match c.get("reduction_factor") {
        Some(Value::Object(m)) => {
            let mut per = BTreeMap::new();
            let mut default = None;
            for (k, v) in m {
                let rf = positive(v, "reduction_factor")?;
                if k == "default" {
                    default = Some(rf);
                } else if k.parse::<usize>().is_ok_and(|l| l < cfg.num_layers) {
                    per.insert(k.clone(), rf);
                } else {
                    return Err(err(
                        field("reduction_factor"),
                        format!("key {k:?} is neither \"default\" nor a layer of this model"),
                    ));
                }
            }
            let d = default.or_else(|| (per.len() == cfg.num_layers).then_some(16.0));
            let d = d.ok_or_else(|| {
                err(
                    field("reduction_factor"),
                    "needs a \"default\" for the layers it does not list",
                )
            })?;
            (d, per)
        }
        Some(v) => (positive(v, "reduction_factor")?, BTreeMap::new()),
        None => return Err(err(field("reduction_factor"), "missing")),
    };
    let leave_out = match c.get("leave_out") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| err(field("leave_out"), "expected a list of layer numbers"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(err(field("leave_out"), "expected a list of layer numbers")),
    };
    let s = BnSettings {
        name: top
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty() && !n.contains('.'))
            .ok_or_else(|| {
                err(
                    format!("{CONFIG_FILE}.name"),
                    "missing, or not a plain name",
                )
            })?
            .to_string(),
        after_attention: get_bool(c, "mh_adapter", false)?,
        after_ffn: get_bool(c, "output_adapter", false)?,
        reduction_factor,
        layer_reduction,
        non_linearity: non_linearity.to_string(),
        original_ln_before: get_bool(c, "original_ln_before", false)?,
        original_ln_after: get_bool(c, "original_ln_after", true)?,
        residual_before_ln,
        adapter_residual_before_ln: get_bool(c, "adapter_residual_before_ln", false)?,
        ln_before: get_bool(c, "ln_before", false)?,
        ln_after: get_bool(c, "ln_after", false)?,
        scaling,
        leave_out,
    };
    if !s.after_attention && !s.after_ffn {
        return Err(err(
            field("mh_adapter"),
            "neither mh_adapter nor output_adapter is set: the adapter has no bottleneck",
        ));
    }
    Ok(s)
}

pub(super) fn parse(
    config_json: &[u8],
    weights: &[u8],
    cfg: &LlamaConfig,
    base_name: &str,
    policy: &ImportPolicy,
) -> Result<Parsed, ImportError> {
    let top: Value = serde_json::from_slice(config_json)
        .map_err(|e| err(CONFIG_FILE, format!("not a valid AdapterHub config: {e}")))?;
    let s = settings(&top, cfg)?;
    check_base(
        top.get("model_name").and_then(Value::as_str),
        base_name,
        policy,
    )?;
    let st = SafeTensors::deserialize(weights)
        .map_err(|e| err(WEIGHTS_FILE, format!("not a valid safetensors file: {e}")))?;
    let mut views: HashMap<String, TensorView<'_>> = HashMap::new();
    for (name, view) in st.tensors() {
        views.insert(name, view);
    }
    let hidden = cfg.hidden_size;
    let mut out = Adapter::new(cfg.num_layers);
    out.sublayer = (0..cfg.num_layers).map(|_| Default::default()).collect();
    let act = Activation::parse(&s.non_linearity)
        .ok_or_else(|| err(field("non_linearity"), "unknown"))?;
    // The down projection sits after the adapter's own layer norm, if it has one.
    let down = if s.ln_before {
        "adapter_down.1"
    } else {
        "adapter_down.0"
    };
    for layer in 0..cfg.num_layers {
        for site in s.sites(layer) {
            let d = s.size(layer, hidden);
            let prefix = format!(
                "model.layers.{layer}.{}.adapters.{}",
                site_name(site),
                s.name
            );
            let ln_before = if s.ln_before {
                let w = take(&mut views, &prefix, "adapter_down.0.weight", &[hidden])?;
                let b = take(&mut views, &prefix, "adapter_down.0.bias", &[hidden])?;
                // The library registers the same norm under its own name too.
                views.remove(&format!("{prefix}.adapter_norm_before.weight"));
                views.remove(&format!("{prefix}.adapter_norm_before.bias"));
                Some((w, b))
            } else {
                None
            };
            let mut take = |part: &str, shape: &[usize]| take(&mut views, &prefix, part, shape);
            let down_w = take(&format!("{down}.weight"), &[d, hidden])?;
            let down_b = take(&format!("{down}.bias"), &[d])?;
            let up_w = take("adapter_up.weight", &[hidden, d])?;
            let up_b = take("adapter_up.bias", &[hidden])?;
            let ln_after = if s.ln_after {
                Some((
                    take("adapter_norm_after.weight", &[hidden])?,
                    take("adapter_norm_after.bias", &[hidden])?,
                ))
            } else {
                None
            };
            out.sublayer[layer][site.index()] = Some(Bottleneck {
                hidden,
                size: d,
                down: down_w,
                down_bias: down_b,
                up_t: transpose(&up_w, hidden, d),
                up_bias: up_b,
                act,
                scaling: s.scaling as f32,
                placement: s.placement(),
                ln_before,
                ln_after,
            });
        }
    }
    if let Some(extra) = views.keys().min() {
        return Err(err(
            WEIGHTS_FILE,
            format!("tensor {extra:?} is not a weight of this adapter's bottlenecks (as its config describes them)"),
        ));
    }
    out.linear.clear();
    Ok(Parsed {
        details: Details::Bottleneck(s),
        adapter: out,
        prompt: None,
    })
}

/// Removes the tensor `prefix.part` from `views`, checked to have `shape`.
fn take(
    views: &mut HashMap<String, TensorView<'_>>,
    prefix: &str,
    part: &str,
    shape: &[usize],
) -> Result<Vec<f32>, ImportError> {
    let n = format!("{prefix}.{part}");
    let v = views
        .remove(&n)
        .ok_or_else(|| err(WEIGHTS_FILE, format!("{n} is missing")))?;
    if v.shape() != shape {
        return Err(err(
            format!("{WEIGHTS_FILE}.{n}"),
            format!("{:?}; the config and this model need {shape:?}", v.shape()),
        ));
    }
    to_f32(&n, &v)
}

/// Writes a bottleneck adapter as AdapterHub files: `(adapter_config.json,
/// adapter.safetensors)`, loadable by `model.load_adapter(dir, use_safetensors=True)`.
pub(super) fn write(
    p: &Parsed,
    cfg: &LlamaConfig,
    base_model: &str,
) -> Result<(Vec<u8>, Vec<u8>), ImportError> {
    let Details::Bottleneck(s) = &p.details else {
        return Err(err("method", "not a bottleneck adapter"));
    };
    let hidden = cfg.hidden_size;
    let down = if s.ln_before {
        "adapter_down.1"
    } else {
        "adapter_down.0"
    };
    let mut tensors = Vec::new();
    for (layer, sites) in p.adapter.sublayer.iter().enumerate() {
        for site in Sublayer::ALL {
            let Some(b) = &sites[site.index()] else {
                continue;
            };
            let prefix = format!(
                "model.layers.{layer}.{}.adapters.{}",
                site_name(site),
                s.name
            );
            let d = b.size;
            if let Some((w, bias)) = &b.ln_before {
                tensors.push((
                    format!("{prefix}.adapter_down.0.weight"),
                    vec![hidden],
                    w.clone(),
                ));
                tensors.push((
                    format!("{prefix}.adapter_down.0.bias"),
                    vec![hidden],
                    bias.clone(),
                ));
            }
            tensors.push((
                format!("{prefix}.{down}.weight"),
                vec![d, hidden],
                b.down.clone(),
            ));
            tensors.push((
                format!("{prefix}.{down}.bias"),
                vec![d],
                b.down_bias.clone(),
            ));
            tensors.push((
                format!("{prefix}.adapter_up.weight"),
                vec![hidden, d],
                transpose(&b.up_t, d, hidden),
            ));
            tensors.push((
                format!("{prefix}.adapter_up.bias"),
                vec![hidden],
                b.up_bias.clone(),
            ));
            if let Some((w, bias)) = &b.ln_after {
                tensors.push((
                    format!("{prefix}.adapter_norm_after.weight"),
                    vec![hidden],
                    w.clone(),
                ));
                tensors.push((
                    format!("{prefix}.adapter_norm_after.bias"),
                    vec![hidden],
                    bias.clone(),
                ));
            }
        }
    }
    // Whole factors as integers, as the library's configs write them.
    let number = |x: f64| {
        if x.fract() == 0.0 && x.abs() < 1e15 {
            serde_json::json!(x as i64)
        } else {
            serde_json::json!(x)
        }
    };
    let mut rf = serde_json::Map::new();
    for (k, v) in &s.layer_reduction {
        rf.insert(k.clone(), number(*v));
    }
    let reduction_factor = if rf.is_empty() {
        number(s.reduction_factor)
    } else {
        rf.insert("default".into(), number(s.reduction_factor));
        Value::Object(rf)
    };
    let config = serde_json::json!({
        "config": {
            "adapter_residual_before_ln": s.adapter_residual_before_ln,
            "cross_adapter": false,
            "dropout": 0.0,
            "factorized_phm_W": true,
            "factorized_phm_rule": false,
            "hypercomplex_nonlinearity": "glorot-uniform",
            "init_weights": "bert",
            "init_weights_seed": null,
            "inv_adapter": null,
            "inv_adapter_reduction_factor": null,
            "is_parallel": false,
            "learn_phm": true,
            "leave_out": s.leave_out,
            "ln_after": s.ln_after,
            "ln_before": s.ln_before,
            "mh_adapter": s.after_attention,
            "non_linearity": s.non_linearity,
            "original_ln_after": s.original_ln_after,
            "original_ln_before": s.original_ln_before,
            "output_adapter": s.after_ffn,
            "phm_bias": true,
            "phm_c_init": "normal",
            "phm_dim": 4,
            "phm_init_range": 0.0001,
            "phm_layer": false,
            "phm_rank": 1,
            "reduction_factor": reduction_factor,
            "residual_before_ln": s.residual_before_ln,
            "scaling": s.scaling,
            "shared_W_phm": false,
            "shared_phm_rule": true,
            "stochastic_depth": 0.0,
            "use_gating": false,
        },
        "hidden_size": hidden,
        "model_class": "LlamaForCausalLM",
        "model_name": base_model,
        "model_type": "llama",
        "name": s.name,
        "version": "adapters.1.3.0",
    });
    let config = serde_json::to_vec_pretty(&config).map_err(|e| err(CONFIG_FILE, e.to_string()))?;
    Ok((config, serialize(&tensors)?))
}
