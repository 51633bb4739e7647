//! Adapter file formats: readers and writers side by side, each turning one library's files
//! into the parts of an [`Adapter`] (and back), chosen by the config's `peft_type`.
//! - [`peft_lora`]: PEFT `LORA` (with DoRA's `use_dora`);
//! - [`peft_ia3`]: PEFT `IA3`;
//! - [`peft_prompt`]: PEFT `PROMPT_TUNING`, `P_TUNING` and `PREFIX_TUNING` (with and without
//!   `prefix_projection`);
//! - [`adapterhub`]: AdapterHub's bottleneck adapters (its own config, no `peft_type`);
//! - [`heads`]: a classification head saved through PEFT's `modules_to_save`, beside any
//!   PEFT method.
//!
//! Invariant: a refused adapter produces an [`ImportError`] naming the file or field at
//! fault; nothing is partially accepted.

pub mod adapterhub;
pub mod heads;
pub mod peft_ia3;
pub mod peft_lora;
pub mod peft_prompt;

pub use adapterhub::BnSettings;

use bytes::Bytes;
use safetensors::{tensor::TensorView, Dtype};
use serde::{Deserialize, Serialize};

use crate::model::{f32s::F32s, lora::LoraDtype, Adapter, Llama, LlamaConfig, Module};

/// Largest `adapter_config.json` accepted: a full per-module `rank_pattern` of a large model
/// is a few tens of KB.
pub const MAX_CONFIG_BYTES: usize = 256 << 10;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Why an adapter was refused: the file (or field) at fault and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ImportError {
    pub field: String,
    pub reason: String,
}

pub(crate) fn err(field: impl Into<String>, reason: impl Into<String>) -> ImportError {
    ImportError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// What the importer checks against.
#[derive(Debug, Clone)]
pub struct ImportPolicy {
    pub max_rank: usize,
    /// Accept an adapter whose `base_model_name_or_path` names another model.
    pub force: bool,
    /// Names under which this base model is known (HF repo ids); matched case-insensitively
    /// on the last path component.
    pub base_aliases: Vec<String>,
    /// Most virtual tokens a prompt-method adapter may put in front of a sequence.
    pub max_virtual_tokens: usize,
}

/// What a stored version is, per method: the settings a user reads back and the exporter
/// writes (the `details` of an adapter version's row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Details {
    Lora {
        /// Largest rank of any module.
        rank: usize,
        alpha: f64,
        target_modules: Vec<String>,
        #[serde(default)]
        use_rslora: bool,
        /// DoRA: a magnitude per output feature besides the pair.
        #[serde(default)]
        use_dora: bool,
    },
    PromptTuning {
        num_virtual_tokens: usize,
    },
    PTuning {
        num_virtual_tokens: usize,
        /// `mlp` or `lstm` (the encoder that was trained; only its output is stored).
        encoder: String,
        encoder_hidden_size: usize,
    },
    /// PEFT `PREFIX_TUNING` with `prefix_projection` (an MLP reparameterisation).
    PrefixTuning {
        num_virtual_tokens: usize,
        encoder_hidden_size: usize,
    },
    /// PEFT `PREFIX_TUNING` without projection: deep prompts in every layer.
    PTuningV2 {
        num_virtual_tokens: usize,
    },
    Ia3 {
        target_modules: Vec<String>,
        /// The targeted modules whose input (rather than output) is scaled.
        feedforward_modules: Vec<String>,
    },
    /// A bottleneck adapter in AdapterHub's terms.
    Bottleneck(BnSettings),
    /// A fully fine-tuned model: an HF model directory, served by its own engine
    /// ([`crate::engine::hosted`]), not an adapter of the base.
    Full {
        /// The decoder layers that trained (empty: all).
        layers: Vec<usize>,
        embeddings: bool,
        norms: bool,
        /// Weights that trained.
        trained_parameters: u64,
    },
}

/// What a stored version's output head is: a classification head's labels, in the order of
/// its outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadInfo {
    pub labels: Vec<String>,
}

impl HeadInfo {
    pub fn of(adapter: &Adapter) -> Option<Self> {
        adapter.head.as_ref().map(|h| Self {
            labels: h.labels.clone(),
        })
    }
}

impl Details {
    /// The method's name (`lora`, `prompt_tuning`, `p_tuning`, `prefix_tuning`,
    /// `p_tuning_v2`).
    pub fn method(&self) -> &'static str {
        match self {
            Details::Lora { .. } => "lora",
            Details::PromptTuning { .. } => "prompt_tuning",
            Details::PTuning { .. } => "p_tuning",
            Details::PrefixTuning { .. } => "prefix_tuning",
            Details::PTuningV2 { .. } => "p_tuning_v2",
            Details::Ia3 { .. } => "ia3",
            Details::Bottleneck(_) => "bottleneck",
            Details::Full { .. } => "full",
        }
    }

    /// The name of the weights file as the method's library writes it.
    pub fn weights_file(&self) -> &'static str {
        match self {
            Details::Bottleneck(_) => adapterhub::WEIGHTS_FILE,
            Details::Full { .. } => crate::model::save::HF_FILES[1],
            _ => WEIGHTS_FILE,
        }
    }

    /// Virtual tokens the method puts in front of every sequence.
    pub fn virtual_tokens(&self) -> usize {
        match self {
            Details::Lora { .. }
            | Details::Ia3 { .. }
            | Details::Bottleneck(_)
            | Details::Full { .. } => 0,
            Details::PromptTuning { num_virtual_tokens }
            | Details::PTuning {
                num_virtual_tokens, ..
            }
            | Details::PrefixTuning {
                num_virtual_tokens, ..
            }
            | Details::PTuningV2 { num_virtual_tokens } => *num_virtual_tokens,
        }
    }
}

/// A parsed, validated adapter: its parts, and what the method needs to write it back.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub details: Details,
    /// The served parts (for prompt tuning and P-tuning, without the KV prefix until
    /// [`Parsed::compile`]).
    pub adapter: Adapter,
    /// Prompt tuning and P-tuning: the virtual tokens' input embeddings `(P, hidden)`.
    pub prompt: Option<Vec<f32>>,
}

impl Parsed {
    /// The servable adapter: virtual input embeddings are run through the base once, here,
    /// and kept as the KV prefix every sequence of this version starts from.
    /// DoRA's gains are computed from the base weights here too.
    pub fn compile(&self, llama: &Llama) -> Result<Adapter, ImportError> {
        self.clone().into_compiled(llama)
    }

    /// [`Parsed::compile`] without copying the adapter's weights (a rank-16 LoRA on every
    /// module is ~20 MB here: the copy was ~3 ms of every cold load).
    pub fn into_compiled(self, llama: &Llama) -> Result<Adapter, ImportError> {
        let mut a = self.adapter;
        a.compile(&llama.weights)
            .map_err(|e| err(WEIGHTS_FILE, e.to_string()))?;
        if let Some(p) = &self.prompt {
            let hidden = llama.cfg.hidden_size;
            let t = candle_core::Tensor::from_slice(p, (p.len() / hidden, hidden), llama.device())
                .and_then(|t| t.contiguous())
                .map_err(|e| err(WEIGHTS_FILE, e.to_string()))?;
            let prefix = llama
                .prefix_from_embeddings(&t)
                .map_err(|e| err(WEIGHTS_FILE, e.to_string()))?;
            a.prefix = Some(std::sync::Arc::new(prefix));
        }
        Ok(a)
    }
}

impl Parsed {
    /// [`Parsed::into_compiled`] with the LoRA and DoRA pairs in `dtype` (what the registry
    /// serves, `--lora-dtype`); a value `dtype` cannot hold is refused naming its module.
    pub fn into_served(mut self, llama: &Llama, dtype: LoraDtype) -> Result<Adapter, ImportError> {
        self.adapter.set_lora_dtype(dtype).map_err(|e| {
            err(
                WEIGHTS_FILE,
                format!("served as --lora-dtype {}: {e}", dtype.name()),
            )
        })?;
        self.into_compiled(llama)
    }
}

/// Parses and checks a PEFT adapter of any supported method against the model `cfg`
/// (named `base_name`). The adapter's weights are a copy of `weights`; [`parse_bytes`]
/// reads them in place instead.
pub fn parse(
    config_json: &[u8],
    weights: &[u8],
    cfg: &LlamaConfig,
    base_name: &str,
    policy: &ImportPolicy,
) -> Result<Parsed, ImportError> {
    let weights = Bytes::copy_from_slice(weights);
    parse_bytes(config_json, &weights, cfg, base_name, policy, Scan::Values)
}

/// [`parse`] whose adapter keeps `weights` (an upload, a stored version's mapped file) and
/// reads its `f32` values in place where it can; `scan` says whether those are checked for
/// NaN and infinities.
pub fn parse_bytes(
    config_json: &[u8],
    weights: &Bytes,
    cfg: &LlamaConfig,
    base_name: &str,
    policy: &ImportPolicy,
    scan: Scan,
) -> Result<Parsed, ImportError> {
    if config_json.len() > MAX_CONFIG_BYTES {
        return Err(err(
            CONFIG_FILE,
            format!(
                "{} bytes; a PEFT config may have at most {MAX_CONFIG_BYTES}",
                config_json.len()
            ),
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(config_json)
        .map_err(|e| err(CONFIG_FILE, format!("not a valid adapter config: {e}")))?;
    if adapterhub::is_adapterhub(&v) {
        return adapterhub::parse(config_json, weights, cfg, base_name, policy);
    }
    let Some(split) = heads::split(&v, weights, cfg)? else {
        let p = parse_peft(&v, config_json, weights, cfg, base_name, policy, scan)?;
        if matches!(p.details, Details::Lora { .. }) && p.adapter.modules().is_empty() {
            return Err(err(
                WEIGHTS_FILE,
                "holds no LoRA tensors and the config no head (modules_to_save): nothing to serve",
            ));
        }
        return Ok(p);
    };
    let mut p = parse_peft(
        &v,
        &split.config,
        &Bytes::from(split.weights),
        cfg,
        base_name,
        policy,
        scan,
    )?;
    p.adapter.head = split.head.map(std::sync::Arc::new);
    p.adapter.lm_head = split.lm_head.map(std::sync::Arc::new);
    Ok(p)
}

/// A PEFT method's files, without a head.
fn parse_peft(
    v: &serde_json::Value,
    config_json: &[u8],
    weights: &Bytes,
    cfg: &LlamaConfig,
    base_name: &str,
    policy: &ImportPolicy,
    scan: Scan,
) -> Result<Parsed, ImportError> {
    match v.get("peft_type").and_then(serde_json::Value::as_str) {
        Some("LORA") => peft_lora::parse(config_json, weights, cfg, base_name, policy, scan),
        Some("IA3") => peft_ia3::parse(config_json, weights, cfg, base_name, policy),
        Some("PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING") => {
            peft_prompt::parse(config_json, weights, cfg, base_name, policy)
        }
        other => Err(err(
            format!("{CONFIG_FILE}.peft_type"),
            format!("{other:?} is not supported; graft imports PEFT's LORA (and DoRA), IA3, PROMPT_TUNING, P_TUNING and PREFIX_TUNING adapters and AdapterHub's bottleneck adapters"),
        )),
    }
}

/// Writes `p` as its library's files: `(adapter_config.json, weights)` (the weights file's
/// name is [`Details::weights_file`]).
pub fn write(
    p: &Parsed,
    cfg: &LlamaConfig,
    base_model: &str,
) -> Result<(Vec<u8>, Vec<u8>), ImportError> {
    let (config, weights) = match &p.details {
        Details::Lora { .. } => peft_lora::write(p, cfg, base_model),
        Details::Ia3 { .. } => peft_ia3::write(p, cfg, base_model),
        Details::Bottleneck(_) => adapterhub::write(p, cfg, base_model),
        _ => peft_prompt::write(p, cfg, base_model),
    }?;
    let out = match (&p.adapter.head, &p.adapter.lm_head) {
        (None, None) => return Ok((config, weights)),
        (Some(h), None) => heads::Output::Class(h),
        (None, Some(h)) => heads::Output::Lm(h),
        (Some(_), Some(_)) => return Err(err(
            "head",
            "both a classification head and a replaced LM head; an adapter has one output layer",
        )),
    };
    if matches!(p.details, Details::Bottleneck(_)) {
        return Err(err(
            "head",
            "a bottleneck adapter with its own output layer cannot be written in AdapterHub's format",
        ));
    }
    heads::attach(config, weights, out)
}

/// PEFT's `target_modules` (and IA3's `feedforward_modules`): names, a regex over the
/// module's full name, or `all-linear`.
pub(crate) enum Targets {
    Names(Vec<String>),
    Regex(regex::Regex),
    AllLinear,
}

impl Targets {
    /// From the config's value of `field`.
    pub(crate) fn parse(v: &serde_json::Value, field: &str) -> Result<Self, ImportError> {
        use serde_json::Value;
        Ok(match v {
            Value::String(s) if s == "all-linear" => Targets::AllLinear,
            Value::String(s) => {
                Targets::Regex(regex::Regex::new(&format!("^(?:{s})$")).map_err(|e| {
                    err(format!("{CONFIG_FILE}.{field}"), format!("bad regex: {e}"))
                })?)
            }
            Value::Array(a) => {
                let names: Vec<String> = a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                for n in &names {
                    if Module::from_hf_name(n).is_none() {
                        return Err(err(format!("{CONFIG_FILE}.{field}"), format!("target module {n:?} does not exist in this model (it has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")));
                    }
                }
                Targets::Names(names)
            }
            _ => {
                return Err(err(
                    format!("{CONFIG_FILE}.{field}"),
                    "missing; expected a list, a regex or \"all-linear\"",
                ))
            }
        })
    }

    pub(crate) fn matches(&self, key: &str, module: Module) -> bool {
        match self {
            Targets::Names(n) => n
                .iter()
                .any(|t| t == module.hf_name() || key.ends_with(&format!(".{t}"))),
            Targets::Regex(r) => r.is_match(key),
            Targets::AllLinear => true,
        }
    }
}

/// Splits a tensor name `[base_model.model.]model.layers.N.parent.module.rest...` into the
/// layer, the module and the rest; `None` when it names no module of a Llama block.
pub(crate) fn module_tensor(name: &str) -> Option<(usize, Module, Vec<&str>)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let parts: Vec<&str> = rest.split('.').collect();
    if parts.len() < 6 || parts[0] != "model" || parts[1] != "layers" {
        return None;
    }
    let layer: usize = parts[2].parse().ok()?;
    let m = Module::from_hf_name(parts[4])?;
    if parts[3] != m.hf_parent() {
        return None;
    }
    Some((layer, m, parts[5..].to_vec()))
}

/// Checks `base_model_name_or_path` against the names this base model goes by.
pub(crate) fn check_base(
    base: Option<&str>,
    base_name: &str,
    policy: &ImportPolicy,
) -> Result<(), ImportError> {
    let Some(base) = base.filter(|b| !b.is_empty()) else {
        return Ok(());
    };
    let ours: Vec<String> = policy
        .base_aliases
        .iter()
        .map(|a| normalise(a))
        .chain([normalise(base_name)])
        .collect();
    let theirs = normalise(base);
    let known = ours.iter().any(|o| {
        !o.is_empty()
            && (theirs == *o || theirs.contains(o.as_str()) || o.contains(theirs.as_str()))
    });
    if !known && !policy.force {
        return Err(err(
            format!("{CONFIG_FILE}.base_model_name_or_path"),
            format!("the adapter was made for {base:?}, not this server's base model ({base_name}); import with force to override"),
        ));
    }
    Ok(())
}

/// f32 tensors as safetensors bytes.
pub(crate) fn serialize(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<Vec<u8>, ImportError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), d)| {
            Ok((
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d)
                    .map_err(|e| err(WEIGHTS_FILE, e.to_string()))?,
            ))
        })
        .collect::<Result<_, ImportError>>()?;
    safetensors::serialize(views, None).map_err(|e| err(WEIGHTS_FILE, e.to_string()))
}

pub(crate) fn normalise(s: &str) -> String {
    s.rsplit('/')
        .next()
        .unwrap_or(s)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Whether values read in place are scanned for NaN and infinities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    Values,
    /// A stored version's files: scanned when they were imported and never rewritten
    /// since, so not again (a rank-16 LoRA's ~20 MB scan was ~2 ms of every cold load).
    /// Everything else is checked as at import.
    Stored,
}

/// [`to_f32`] read in place from `file`, the bytes `t` views, where they are aligned `f32`s.
pub(crate) fn to_f32s(
    name: &str,
    t: &TensorView<'_>,
    file: &Bytes,
    scan: Scan,
) -> Result<F32s, ImportError> {
    if t.dtype() == Dtype::F32 {
        if let Some(v) = F32s::view(file.slice_ref(t.data())) {
            if scan == Scan::Values {
                finite(name, &v)?;
            }
            return Ok(v);
        }
    }
    to_f32(name, t).map(F32s::from)
}

pub(crate) fn to_f32(name: &str, t: &TensorView<'_>) -> Result<Vec<f32>, ImportError> {
    let d = t.data();
    let v: Vec<f32> = match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(err(
                WEIGHTS_FILE,
                format!("tensor {name} has dtype {other:?}; expected F32, F16 or BF16"),
            ))
        }
    };
    finite(name, &v)?;
    Ok(v)
}

fn finite(name: &str, v: &[f32]) -> Result<(), ImportError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(err(
            WEIGHTS_FILE,
            format!("tensor {name} holds a non-finite value (NaN or Inf) at index {i}"),
        )),
        None => Ok(()),
    }
}

/// Permutes rows (first dim `rows = n_head * head_dim`, `cols` columns) HF -> GGUF order.
pub(crate) fn permute_rows(
    v: &[f32],
    n_head: usize,
    rows: usize,
    cols: usize,
    to_gguf: bool,
) -> Vec<f32> {
    let hd = rows / n_head;
    let mut out = vec![0f32; v.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..hd / 2 {
                let hf = h * hd + s * (hd / 2) + i;
                let gg = h * hd + 2 * i + s;
                let (src, dst) = if to_gguf { (hf, gg) } else { (gg, hf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}
