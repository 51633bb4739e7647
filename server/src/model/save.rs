//! A model written as a Hugging Face `LlamaForCausalLM` directory: `config.json`,
//! `model.safetensors` (f32, HF names and q/k row order), `tokenizer.json` and
//! `tokenizer_config.json` with the chat template. What transformers' `from_pretrained`
//! and `graftd --model DIR` ([`BaseModel::load`]) both read.

use std::{collections::HashMap, path::Path};

use serde_json::json;

use super::{weights::Weights, BaseModel, ModelError};

/// The files [`write_hf_dir`] writes, in the order it writes them.
pub const HF_FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// Writes `weights` (of `model`'s architecture) with `model`'s tokenizer and chat template
/// into `dir` (which must exist). Returns the bytes written.
pub fn write_hf_dir(model: &BaseModel, weights: &Weights, dir: &Path) -> Result<u64, ModelError> {
    write_hf_meta(model, weights.tied(), dir)?;
    let tensors: HashMap<String, candle_core::Tensor> =
        weights.hf_tensors(model.config())?.into_iter().collect();
    let st = dir.join(HF_FILES[1]);
    candle_core::safetensors::save(&tensors, &st)
        .map_err(|e| ModelError::Io(format!("{}: {e}", st.display())))?;
    let mut total = 0;
    for f in HF_FILES {
        let p = dir.join(f);
        total += std::fs::metadata(&p)
            .map_err(|e| ModelError::Io(format!("{}: {e}", p.display())))?
            .len();
    }
    Ok(total)
}

/// The files of an HF model directory besides the weights: `config.json` (of `model`'s
/// architecture, its embeddings `tied` or not), `tokenizer.json` and `tokenizer_config.json`
/// with the chat template. (The GPU check writes random weights beside them.)
pub fn write_hf_meta(model: &BaseModel, tied: bool, dir: &Path) -> Result<(), ModelError> {
    let cfg = model.config();
    let tk = &model.tokenizer;
    let write = |name: &str, bytes: &[u8]| -> Result<(), ModelError> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| ModelError::Io(format!("{}: {e}", p.display())))
    };
    let eos = match tk.eos_ids.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.max_position,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": tied,
        "bos_token_id": tk.bos_id,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    });
    let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("JSON values print");
    write(HF_FILES[0], &pretty(&config))?;
    write(HF_FILES[2], tk.to_json()?.as_bytes())?;
    let tok_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tk.bos_token,
        "eos_token": tk.eos_token,
        "add_bos_token": tk.add_bos,
        "model_max_length": cfg.max_position,
        "clean_up_tokenization_spaces": false,
        "chat_template": model.chat.source(),
    });
    write(HF_FILES[3], &pretty(&tok_config))
}
