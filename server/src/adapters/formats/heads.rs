//! Output layers saved through PEFT's `modules_to_save`, beside any PEFT method: a
//! classification head (`score`, as `LlamaForSequenceClassification` names it; PEFT's
//! `SEQ_CLS` task also lists `classifier`), stored whole as `base_model.model.score.weight`
//! `(num_labels, hidden)`, or a replaced LM head (`lm_head`, stored whole as
//! `base_model.model.lm_head.weight` `(vocab, hidden)`).
//! Reading splits the head off the files so the method's own reader sees only its parts;
//! writing puts it back. Labels are not part of PEFT's files (transformers keeps `id2label`
//! in the model's config): they default to `LABEL_i` and are given at import.

use safetensors::SafeTensors;
use serde_json::Value;

use super::{err, to_f32, ImportError, CONFIG_FILE, WEIGHTS_FILE};
use crate::model::{head::LmHead, ClassHead, LlamaConfig};

/// The module names a classification head is saved under.
pub const HEAD_MODULES: [&str; 2] = ["score", "classifier"];
/// The name graft writes a head under.
pub const HEAD_TENSOR: &str = "base_model.model.score.weight";
/// Most outputs a classification head may have.
pub const MAX_LABELS: usize = 1024;
/// The module name and tensor of a replaced LM head.
pub const LM_HEAD_MODULE: &str = "lm_head";
pub const LM_HEAD_TENSOR: &str = "base_model.model.lm_head.weight";

/// The method's files without the head, and the head.
pub(super) struct Split {
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
    pub head: Option<ClassHead>,
    pub lm_head: Option<LmHead>,
}

/// Splits a PEFT adapter's head (its `modules_to_save`) off its files; None when it has none.
pub(super) fn split(
    config: &Value,
    weights: &[u8],
    cfg: &LlamaConfig,
) -> Result<Option<Split>, ImportError> {
    let field = format!("{CONFIG_FILE}.modules_to_save");
    let names: Vec<&str> = match config.get("modules_to_save") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| err(&field, "expected a list of module names"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(err(&field, "expected a list of module names")),
    };
    if names.is_empty() {
        return Ok(None);
    }
    if let Some(n) = names
        .iter()
        .find(|n| !HEAD_MODULES.contains(n) && **n != LM_HEAD_MODULE)
    {
        return Err(err(&field, format!("module {n:?} is not supported; graft takes a classification head (score or classifier) or a replaced LM head (lm_head) through modules_to_save")));
    }
    let wants_lm = names.contains(&LM_HEAD_MODULE);
    if wants_lm && names.iter().any(|n| HEAD_MODULES.contains(n)) {
        return Err(err(
            &field,
            "both a classification head and a replaced LM head; an adapter has one output layer",
        ));
    }
    let st = SafeTensors::deserialize(weights)
        .map_err(|e| err(WEIGHTS_FILE, format!("not a valid safetensors file: {e}")))?;
    let is_head = |name: &str| {
        HEAD_MODULES.iter().any(|m| {
            name.strip_prefix("base_model.model.")
                .and_then(|r| r.strip_prefix(m))
                .is_some_and(|r| r.starts_with('.'))
        })
    };
    let mut head = None;
    let mut lm_head = None;
    let mut rest = Vec::new();
    for (name, view) in st.tensors() {
        if wants_lm && name.starts_with("base_model.model.lm_head.") {
            lm_head = Some(read_lm_head(&name, &view, cfg)?);
            continue;
        }
        if !is_head(&name) {
            rest.push((name, view));
            continue;
        }
        if !name.ends_with(".weight") {
            return Err(err(
                WEIGHTS_FILE,
                format!("tensor {name:?}: a head bias is not supported (Llama's score has none)"),
            ));
        }
        if head.is_some() {
            return Err(err(
                WEIGHTS_FILE,
                format!("tensor {name:?} is a second head; an adapter has at most one"),
            ));
        }
        let hidden = cfg.hidden_size;
        match view.shape() {
            &[n, h] if h == hidden && (1..=MAX_LABELS).contains(&n) => {}
            other => {
                return Err(err(
                    WEIGHTS_FILE,
                    format!("tensor {name:?} is {other:?}; a head is [num_labels (1..={MAX_LABELS}), {hidden}]"),
                ))
            }
        }
        let w = to_f32(&name, &view)?;
        if w.iter().any(|x| !x.is_finite()) {
            return Err(err(WEIGHTS_FILE, format!("tensor {name:?} is not finite")));
        }
        head = Some(ClassHead::new(w, hidden));
    }
    if head.is_none() && lm_head.is_none() {
        let want = if wants_lm {
            LM_HEAD_TENSOR
        } else {
            HEAD_TENSOR
        };
        return Err(err(
            WEIGHTS_FILE,
            format!("modules_to_save names {names:?} but the file holds no {want}"),
        ));
    }
    let weights =
        safetensors::serialize(rest, None).map_err(|e| err(WEIGHTS_FILE, e.to_string()))?;
    let mut config = config.clone();
    if let Some(o) = config.as_object_mut() {
        o.remove("modules_to_save");
    }
    Ok(Some(Split {
        config: serde_json::to_vec(&config).map_err(|e| err(CONFIG_FILE, e.to_string()))?,
        weights,
        head,
        lm_head,
    }))
}

/// A replaced LM head's one tensor: `weight`, exactly `(vocab, hidden)`, finite.
fn read_lm_head(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    cfg: &LlamaConfig,
) -> Result<LmHead, ImportError> {
    if name != LM_HEAD_TENSOR {
        return Err(err(
            WEIGHTS_FILE,
            format!(
                "tensor {name:?}: a replaced LM head is one {LM_HEAD_TENSOR} (Llama's has no bias)"
            ),
        ));
    }
    let want = [cfg.vocab_size, cfg.hidden_size];
    if view.shape() != want {
        return Err(err(
            WEIGHTS_FILE,
            format!(
                "tensor {name:?} is {:?}; this model's LM head is {want:?}",
                view.shape()
            ),
        ));
    }
    // to_f32 refuses NaN and Inf.
    Ok(LmHead {
        weight: to_f32(name, view)?,
        hidden: cfg.hidden_size,
    })
}

/// The output layer a PEFT method's files carry in `modules_to_save`.
pub(super) enum Output<'a> {
    Class(&'a ClassHead),
    Lm(&'a LmHead),
}

/// Puts an output layer into a PEFT method's files as PEFT saves it: a classification
/// head as a `SEQ_CLS` adapter, a replaced LM head under `modules_to_save: ["lm_head"]`.
pub(super) fn attach(
    config_json: Vec<u8>,
    weights: Vec<u8>,
    out: Output<'_>,
) -> Result<(Vec<u8>, Vec<u8>), ImportError> {
    let mut config: Value =
        serde_json::from_slice(&config_json).map_err(|e| err(CONFIG_FILE, e.to_string()))?;
    let (modules, tensor, weight, shape) = match out {
        Output::Class(h) => (
            vec!["classifier", "score"],
            HEAD_TENSOR,
            &h.weight,
            vec![h.num_labels(), h.hidden],
        ),
        Output::Lm(h) => (
            vec![LM_HEAD_MODULE],
            LM_HEAD_TENSOR,
            &h.weight,
            vec![h.vocab(), h.hidden],
        ),
    };
    if let Some(o) = config.as_object_mut() {
        o.insert("modules_to_save".into(), Value::from(modules));
        if matches!(out, Output::Class(_)) {
            o.insert("task_type".into(), Value::from("SEQ_CLS"));
        }
    }
    let st = SafeTensors::deserialize(&weights).map_err(|e| err(WEIGHTS_FILE, e.to_string()))?;
    let data: Vec<u8> = weight.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &data)
        .map_err(|e| err(WEIGHTS_FILE, e.to_string()))?;
    let mut all: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    all.push((tensor.to_string(), view));
    let weights =
        safetensors::serialize(all, None).map_err(|e| err(WEIGHTS_FILE, e.to_string()))?;
    Ok((
        serde_json::to_vec_pretty(&config).map_err(|e| err(CONFIG_FILE, e.to_string()))?,
        weights,
    ))
}
