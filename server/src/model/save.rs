//! A model written as a Hugging Face `LlamaForCausalLM` directory: `config.json`,
//! `model.safetensors` (f32, HF names and q/k row order), `tokenizer.json` and
//! `tokenizer_config.json` with the chat template. What transformers' `from_pretrained`
//! and `graftd --model DIR` ([`BaseModel::load`]) both read. Also a model as one GGUF file
//! ([`gguf_bytes`]), as llama.cpp reads it.

use std::{collections::HashMap, path::Path};

use candle_core::{
    quantized::{gguf_file, GgmlDType, QTensor},
    Tensor,
};
use serde_json::json;

use super::{weights::Weights, BaseModel, ModelError, Module};

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

/// The tensor types a model's matrices can be written in as GGUF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl GgufType {
    pub const ALL: [GgufType; 5] = [
        GgufType::F32,
        GgufType::F16,
        GgufType::Q8_0,
        GgufType::Q4_0,
        GgufType::Q4_1,
    ];

    /// llama.cpp's name (`--outtype`, `llama-quantize`), lower case.
    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4_0 => "q4_0",
            GgufType::Q4_1 => "q4_1",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    fn ggml(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q4_0 => GgmlDType::Q4_0,
            GgufType::Q4_1 => GgmlDType::Q4_1,
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0...).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q4_0 => 2,
            GgufType::Q4_1 => 3,
            GgufType::Q8_0 => 7,
        }
    }
}

/// `model` (its weights, tokenizer and chat template) as one llama.cpp-style GGUF file
/// named `name`: every matrix in `ty` (one whose rows do not split into `ty`'s blocks stays
/// f32), norms in f32, q/k rows in the interleaved order GGUF keeps them in (the model's
/// own). What `graftd --model`, llama.cpp and transformers' GGUF loader read.
pub fn gguf_bytes(model: &BaseModel, name: &str, ty: GgufType) -> Result<Vec<u8>, ModelError> {
    use gguf_file::Value as V;
    let cfg = model.config();
    let w = &model.llama.weights;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut matrix = |n: String, t: Tensor| -> Result<(), ModelError> {
        let q = ty.ggml();
        let fits = t.dims().last().is_some_and(|&c| c % q.block_size() == 0);
        let q = if fits { q } else { GgmlDType::F32 };
        tensors.push((n, QTensor::quantize(&t, q)?));
        Ok(())
    };
    matrix("token_embd.weight".into(), w.embed.weight()?)?;
    for (i, l) in w.layers.iter().enumerate() {
        for m in Module::ALL {
            matrix(
                format!("blk.{i}.{}.weight", m.gguf_name()),
                m.of(l).weight()?,
            )?;
        }
    }
    if !w.tied() {
        matrix("output.weight".into(), w.lm_head.weight()?)?;
    }
    let mut norm = |n: String, t: &Tensor| -> Result<(), ModelError> {
        tensors.push((n, QTensor::quantize(t, GgmlDType::F32)?));
        Ok(())
    };
    for (i, l) in w.layers.iter().enumerate() {
        norm(format!("blk.{i}.attn_norm.weight"), &l.attn_norm)?;
        norm(format!("blk.{i}.ffn_norm.weight"), &l.ffn_norm)?;
    }
    norm("output_norm.weight".into(), &w.final_norm)?;

    let u = |x: usize| V::U32(x as u32);
    let mut meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("general.name", V::String(name.into())),
        ("general.file_type", V::U32(ty.file_type())),
        ("general.quantization_version", V::U32(2)),
        ("llama.vocab_size", u(cfg.vocab_size)),
        ("llama.context_length", u(cfg.max_position)),
        ("llama.embedding_length", u(cfg.hidden_size)),
        ("llama.block_count", u(cfg.num_layers)),
        ("llama.feed_forward_length", u(cfg.intermediate_size)),
        ("llama.rope.dimension_count", u(cfg.head_dim())),
        ("llama.attention.head_count", u(cfg.num_heads)),
        ("llama.attention.head_count_kv", u(cfg.num_kv_heads)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            V::F32(cfg.rms_eps as f32),
        ),
        ("llama.rope.freq_base", V::F32(cfg.rope_theta)),
    ];
    meta.extend(model.tokenizer.gguf_metadata(cfg.vocab_size)?);
    meta.push((
        "tokenizer.chat_template",
        V::String(model.chat.source().into()),
    ));
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &tensor_refs)?;
    Ok(out.into_inner())
}
