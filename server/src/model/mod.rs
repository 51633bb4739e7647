//! The frozen base model: weights, tokenizer and chat template, loaded once and shared by
//! every request behind an `Arc`.
//! Boundary: `model` knows nothing of gRPC, tenants, adapters' storage or the engine's queue.
//! Invariant: nothing here is mutated after `BaseModel::load`; per-sequence state
//! (a [`KvCache`] block table into the engine's [`KvPool`]) lives outside it.

pub mod adapter;
pub mod attention;
pub mod bottleneck;
pub mod chat;
pub mod config;
pub mod device;
pub mod f32s;
pub mod frozen;
pub mod fused;
pub mod head;
pub mod kv_cache;
pub mod llama;
pub mod lora;
pub mod lora_int8;
pub mod lora_values;
pub mod packed;
pub mod rows;
pub mod save;
pub mod sites;
#[cfg(any(test, feature = "testing"))]
pub mod tiny;
pub mod tokenizer;
pub mod weights;

use std::{io::Read, path::Path};

use candle_core::Device;
use sha2::{Digest, Sha256};

pub use adapter::{Adapter, ClassHead, KvPrefix};
pub use chat::{ChatMessage, ChatTemplate};
pub use config::LlamaConfig;
pub use device::DeviceSpec;
pub use kv_cache::{KvCache, KvDtype, KvExhausted, KvPool, KvShape};
pub use llama::{Llama, SeqChunk};
pub use sites::{Module, Sublayer};
pub use tokenizer::{StreamDecoder, TextTokenizer};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    Io(String),
    #[error("model format: {0}")]
    Format(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("sequence needs {needed} positions but the context window is {max}")]
    ContextOverflow { needed: usize, max: usize },
    #[error(transparent)]
    KvExhausted(#[from] KvExhausted),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Everything the server needs from a model.
#[derive(Debug)]
pub struct BaseModel {
    pub llama: Llama,
    pub tokenizer: TextTokenizer,
    pub chat: ChatTemplate,
    /// SHA-256 of the model's weight files: adapters record the base they were made for.
    pub fingerprint: String,
    /// A display name (`general.name` or the directory name).
    pub name: String,
    /// Other names the model goes by (e.g. `smollm2-135m` from GGUF basename + size), for
    /// matching adapters' `base_model_name_or_path`.
    pub aliases: Vec<String>,
}

impl BaseModel {
    /// Loads a `.gguf` file or an HF-style directory (`config.json`, `*.safetensors`,
    /// `tokenizer.json`, optionally `tokenizer_config.json` with a chat template), its
    /// weights placed on `device` ([`weights::Weights::placed`]).
    pub fn load(path: &Path, device: &Device) -> Result<Self, ModelError> {
        if path.is_dir() {
            Self::load_hf_dir(path, device)
        } else {
            Self::load_gguf(path, device)
        }
    }

    fn load_gguf(path: &Path, device: &Device) -> Result<Self, ModelError> {
        let mut g = weights::GgufFile::open(path)?;
        let cfg = g.config()?;
        let tokenizer = TextTokenizer::from_gguf(&g)?;
        if tokenizer.vocab_size() < cfg.vocab_size {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer has {} tokens but the model {}",
                tokenizer.vocab_size(),
                cfg.vocab_size
            )));
        }
        let template = g.meta_str("tokenizer.chat_template").map(str::to_string);
        let chat = chat_template(template, &tokenizer)?;
        let name = g
            .meta_str("general.name")
            .map(str::to_string)
            .unwrap_or_else(|| file_stem(path));
        let aliases = match (
            g.meta_str("general.basename"),
            g.meta_str("general.size_label"),
        ) {
            (Some(b), Some(s)) => vec![format!("{b}-{s}")],
            _ => vec![],
        };
        // Read on the CPU (GGUF blocks are unpacked there), then placed on `device`.
        let w = g
            .weights(&cfg, &Device::Cpu)?
            .placed(device, device::weight_dtype(device))?;
        Ok(Self {
            llama: Llama::new(cfg, w, device.clone())?,
            tokenizer,
            chat,
            fingerprint: sha256_files(&[path.to_path_buf()])?,
            name,
            aliases,
        })
    }

    fn load_hf_dir(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| ModelError::Io(format!("{}: {e}", dir.join(name).display())))
        };
        let hf: config::HfLlamaConfig = serde_json::from_str(&read("config.json")?)
            .map_err(|e| ModelError::Format(format!("config.json: {e}")))?;
        let cfg = LlamaConfig::from(&hf);
        cfg.validate().map_err(ModelError::Format)?;
        let eos_ids: Vec<u32> = match &hf.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|x| x as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            _ => vec![],
        };
        let tok_cfg: serde_json::Value = read("tokenizer_config.json")
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let add_bos = tok_cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let tokenizer = TextTokenizer::from_file(
            &dir.join("tokenizer.json"),
            hf.bos_token_id,
            eos_ids,
            add_bos,
        )?;
        let template = tok_cfg
            .get("chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let chat = chat_template(template, &tokenizer)?;
        let w = weights::load_hf_weights(dir, &cfg, hf.tie_word_embeddings, &Device::Cpu)?
            .placed(device, device::weight_dtype(device))?;
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::Io(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        Ok(Self {
            llama: Llama::new(cfg, w, device.clone())?,
            tokenizer,
            chat,
            fingerprint: sha256_files(&files)?,
            name: file_stem(dir),
            aliases: vec![],
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.llama.cfg
    }
}

fn chat_template(src: Option<String>, tk: &TextTokenizer) -> Result<ChatTemplate, ModelError> {
    let src = match src {
        Some(s) => s,
        None => {
            tracing::warn!("the model ships no chat template; using plain ChatML");
            chat::CHATML_TEMPLATE.to_string()
        }
    };
    ChatTemplate::new(&src, &tk.bos_token, &tk.eos_token)
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// SHA-256 over the files' bytes, in order.
pub fn sha256_files(files: &[std::path::PathBuf]) -> Result<String, ModelError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut r =
            std::fs::File::open(f).map_err(|e| ModelError::Io(format!("{}: {e}", f.display())))?;
        loop {
            let n = r
                .read(&mut buf)
                .map_err(|e| ModelError::Io(format!("{}: {e}", f.display())))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}
