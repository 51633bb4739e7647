//! Hugging Face PEFT prompt-learning files <-> [`Parsed`]: `PROMPT_TUNING`, `P_TUNING` and
//! `PREFIX_TUNING` as PEFT saves them (`inference_mode`: one tensor `prompt_embeddings`).
//! - Prompt tuning and P-tuning: `(P, hidden)`, the virtual tokens' input embeddings (for
//!   P-tuning PEFT saves the encoder's output, not the encoder).
//! - Prefix tuning (with or without `prefix_projection`): `(P, layers * 2 * token_dim)`,
//!   per virtual token and layer a key then a value for the KV heads (`token_dim` is
//!   `kv_heads * head_dim`: PEFT gives a GQA model's prefix its KV heads), already rotated.
//!   Keys are in HF's rotate-half order; the model's are interleaved (GGUF), so each key
//!   head's dimensions are permuted on import and back on export (a rotation commutes with
//!   that permutation, so rotated keys stay rotated).

use safetensors::SafeTensors;
use serde::Deserialize;

use super::{
    check_base, err, permute_rows, serialize, to_f32, Details, ImportError, ImportPolicy, Parsed,
    CONFIG_FILE, WEIGHTS_FILE,
};
use crate::model::{Adapter, KvPrefix, LlamaConfig};

/// The one tensor PEFT saves for these methods.
pub const TENSOR: &str = "prompt_embeddings";

#[derive(Debug, Deserialize)]
struct PromptConfig {
    peft_type: String,
    task_type: Option<String>,
    num_virtual_tokens: Option<usize>,
    token_dim: Option<usize>,
    num_transformer_submodules: Option<usize>,
    num_attention_heads: Option<usize>,
    num_layers: Option<usize>,
    #[serde(default)]
    prefix_projection: bool,
    encoder_hidden_size: Option<usize>,
    encoder_reparameterization_type: Option<String>,
    base_model_name_or_path: Option<String>,
}

fn field(name: &str) -> String {
    format!("{CONFIG_FILE}.{name}")
}

/// `expected` for `name`, when the config states it.
fn check_eq(
    name: &str,
    got: Option<usize>,
    expected: usize,
    what: &str,
) -> Result<(), ImportError> {
    match got {
        Some(g) if g != expected => Err(err(
            field(name),
            format!("{g}; this model needs {expected} ({what})"),
        )),
        _ => Ok(()),
    }
}

/// Parses and checks a prompt-learning adapter against the model `cfg`.
/// Called through [`super::parse`], which checks the config's size and picks the reader.
pub(super) fn parse(
    config_json: &[u8],
    weights: &[u8],
    cfg: &LlamaConfig,
    base_name: &str,
    policy: &ImportPolicy,
) -> Result<Parsed, ImportError> {
    let c: PromptConfig = serde_json::from_slice(config_json)
        .map_err(|e| err(CONFIG_FILE, format!("not a valid PEFT config: {e}")))?;
    match c.task_type.as_deref() {
        Some("CAUSAL_LM") => {}
        other => {
            return Err(err(
                field("task_type"),
                format!(
                    "{other:?}; {} adapters are served for CAUSAL_LM only",
                    c.peft_type
                ),
            ))
        }
    }
    check_base(c.base_model_name_or_path.as_deref(), base_name, policy)?;
    let p = c
        .num_virtual_tokens
        .ok_or_else(|| err(field("num_virtual_tokens"), "missing"))?;
    if p == 0 || p > policy.max_virtual_tokens {
        return Err(err(
            field("num_virtual_tokens"),
            format!(
                "{p}; this server accepts 1 to {}",
                policy.max_virtual_tokens
            ),
        ));
    }
    check_eq(
        "num_transformer_submodules",
        c.num_transformer_submodules,
        1,
        "a decoder-only model",
    )?;
    let prefix = c.peft_type == "PREFIX_TUNING";
    let (hidden, kv_dim, layers) = (cfg.hidden_size, cfg.kv_dim(), cfg.num_layers);
    let width = if prefix {
        check_eq("token_dim", c.token_dim, kv_dim, "KV heads x head_dim")?;
        check_eq(
            "num_attention_heads",
            c.num_attention_heads,
            cfg.num_kv_heads,
            "the KV heads",
        )?;
        check_eq("num_layers", c.num_layers, layers, "its layers")?;
        layers * 2 * kv_dim
    } else {
        check_eq("token_dim", c.token_dim, hidden, "its hidden size")?;
        hidden
    };
    let st = SafeTensors::deserialize(weights)
        .map_err(|e| err(WEIGHTS_FILE, format!("not a valid safetensors file: {e}")))?;
    if let Some(other) = st.names().into_iter().find(|n| *n != TENSOR) {
        return Err(err(
            WEIGHTS_FILE,
            format!(
                "tensor {other:?} is not part of a {} adapter (only {TENSOR})",
                c.peft_type
            ),
        ));
    }
    let t = st
        .tensor(TENSOR)
        .map_err(|_| err(WEIGHTS_FILE, format!("holds no {TENSOR} tensor")))?;
    if t.shape() != [p, width] {
        let what = if prefix {
            format!(
                "layers {layers} x 2 x KV heads {} x head_dim {}",
                cfg.num_kv_heads,
                cfg.head_dim()
            )
        } else {
            "the hidden size".to_string()
        };
        return Err(err(
            WEIGHTS_FILE,
            format!(
                "{TENSOR} is {:?}; this model needs [{p}, {width}] ({what})",
                t.shape()
            ),
        ));
    }
    let v = to_f32(TENSOR, &t)?;
    if !prefix {
        let details = match c.peft_type.as_str() {
            "PROMPT_TUNING" => Details::PromptTuning {
                num_virtual_tokens: p,
            },
            _ => Details::PTuning {
                num_virtual_tokens: p,
                encoder: c
                    .encoder_reparameterization_type
                    .as_deref()
                    .unwrap_or("MLP")
                    .to_ascii_lowercase(),
                encoder_hidden_size: c.encoder_hidden_size.unwrap_or(0),
            },
        };
        return Ok(Parsed {
            details,
            adapter: Adapter::default(),
            prompt: Some(v),
        });
    }
    let rows = permute_keys(&v, cfg, true);
    let details = if c.prefix_projection {
        Details::PrefixTuning {
            num_virtual_tokens: p,
            encoder_hidden_size: c.encoder_hidden_size.unwrap_or(0),
        }
    } else {
        Details::PTuningV2 {
            num_virtual_tokens: p,
        }
    };
    Ok(Parsed {
        details,
        adapter: Adapter::with_prefix(KvPrefix::from_rows(&rows, p, layers, kv_dim)),
        prompt: None,
    })
}

/// Prefix rows `(P, layers * 2 * kv_dim)` with every key's head dimensions permuted between
/// HF's rotate-half order and the model's interleaved one (`to_gguf`) or back; values as
/// they are.
fn permute_keys(rows: &[f32], cfg: &LlamaConfig, to_gguf: bool) -> Vec<f32> {
    let kv_dim = cfg.kv_dim();
    let mut out = Vec::with_capacity(rows.len());
    for lw in rows.chunks_exact(2 * kv_dim) {
        out.extend(permute_rows(
            &lw[..kv_dim],
            cfg.num_kv_heads,
            kv_dim,
            1,
            to_gguf,
        ));
        out.extend_from_slice(&lw[kv_dim..]);
    }
    out
}

/// Writes a prompt-learning adapter as PEFT files, with what PEFT needs to load them back.
pub(super) fn write(
    p: &Parsed,
    cfg: &LlamaConfig,
    base_model: &str,
) -> Result<(Vec<u8>, Vec<u8>), ImportError> {
    let n = p.details.virtual_tokens();
    let mut config = serde_json::json!({
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": n,
        "num_transformer_submodules": 1,
        "num_layers": cfg.num_layers,
        "inference_mode": true,
        "modules_to_save": null,
        "revision": null,
        "auto_mapping": null,
    });
    let extra = match &p.details {
        Details::PromptTuning { .. } => serde_json::json!({
            "peft_type": "PROMPT_TUNING",
            "token_dim": cfg.hidden_size,
            "num_attention_heads": cfg.num_heads,
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": null,
            "tokenizer_name_or_path": null,
            "tokenizer_kwargs": null,
        }),
        Details::PTuning {
            encoder,
            encoder_hidden_size,
            ..
        } => serde_json::json!({
            "peft_type": "P_TUNING",
            "token_dim": cfg.hidden_size,
            "num_attention_heads": cfg.num_heads,
            "encoder_reparameterization_type": encoder.to_ascii_uppercase(),
            "encoder_hidden_size": encoder_hidden_size,
            "encoder_num_layers": 2,
            "encoder_dropout": 0.0,
        }),
        Details::PrefixTuning {
            encoder_hidden_size,
            ..
        } => serde_json::json!({
            "peft_type": "PREFIX_TUNING",
            "token_dim": cfg.kv_dim(),
            "num_attention_heads": cfg.num_kv_heads,
            "prefix_projection": true,
            "encoder_hidden_size": encoder_hidden_size,
        }),
        Details::PTuningV2 { .. } => serde_json::json!({
            "peft_type": "PREFIX_TUNING",
            "token_dim": cfg.kv_dim(),
            "num_attention_heads": cfg.num_kv_heads,
            "prefix_projection": false,
            "encoder_hidden_size": cfg.kv_dim(),
        }),
        Details::Lora { .. }
        | Details::Ia3 { .. }
        | Details::Bottleneck(_)
        | Details::Full { .. } => return Err(err("method", "not a prompt-learning adapter")),
    };
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let (shape, data) = match (&p.prompt, &p.adapter.prefix) {
        (Some(v), _) => (vec![n, cfg.hidden_size], v.clone()),
        (None, Some(prefix)) => (
            vec![n, cfg.num_layers * 2 * cfg.kv_dim()],
            permute_keys(&prefix.to_rows(), cfg, false),
        ),
        (None, None) => return Err(err(WEIGHTS_FILE, "the adapter has no virtual tokens")),
    };
    let st = serialize(&[(TENSOR.to_string(), shape, data)])?;
    let config = serde_json::to_vec_pretty(&config).map_err(|e| err(CONFIG_FILE, e.to_string()))?;
    Ok((config, st))
}
