//! Text <-> token ids. Built from GGUF metadata (byte-level BPE vocab + merges, the
//! `smollm`/`gpt2` pre-tokenizers) or read from an HF `tokenizer.json`; wraps the
//! `tokenizers` crate rather than re-implementing BPE.
//! Invariant: `encode` never adds special tokens the model was not trained to see
//! (BOS only when the model asks for it); special tokens written in text are parsed.

use std::path::Path;

use tokenizers::{
    decoders::byte_level::ByteLevel as ByteLevelDecoder,
    models::bpe::BPE,
    pre_tokenizers::{
        byte_level::ByteLevel, digits::Digits, sequence::Sequence, PreTokenizerWrapper,
    },
    AddedToken, Tokenizer,
};

use candle_core::quantized::gguf_file::Value as GgufValue;

use super::{weights::GgufFile, ModelError};

/// GGUF `token_type` of ordinary vocabulary entries.
const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF `token_type` of control tokens (`<|im_start|>`, `<|endoftext|>`...).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// GGUF `token_type` of padding entries beyond the tokenizer's own (`[PAD{i}]`).
const TOKEN_TYPE_UNUSED: i32 = 5;

/// A tokenizer plus the special ids generation needs.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub eos_ids: Vec<u32>,
    pub bos_id: Option<u32>,
    pub add_bos: bool,
    pub bos_token: String,
    pub eos_token: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl TextTokenizer {
    /// The tokenizer as an HF `tokenizer.json`.
    pub fn to_json(&self) -> Result<String, ModelError> {
        self.inner.to_string(false).map_err(tok_err)
    }

    /// Builds the tokenizer that `tokenizer.ggml.*` describes.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let model = g.meta_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>, ModelError> {
            let v = g
                .meta(key)
                .ok_or_else(|| ModelError::Tokenizer(format!("GGUF metadata {key} is missing")))?
                .to_vec()
                .map_err(tok_err)?;
            v.iter()
                .map(|x| x.to_string().cloned().map_err(tok_err))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let types: Vec<i32> = match g.meta("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(tok_err)?
                .iter()
                .map(|x| x.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut tk = Tokenizer::new(bpe);
        let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
        let pre_tokenizer = match pre {
            // SmolLM / StarCoder: every digit is its own pre-token, then GPT-2 byte-level.
            "smollm" | "starcoder" | "refact" => Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level,
            ]),
            "gpt2" | "default" => Sequence::new(vec![byte_level]),
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "GGUF pre-tokenizer {other:?} is not supported yet"
                )))
            }
        };
        tk.with_pre_tokenizer(Some(pre_tokenizer));
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == TOKEN_TYPE_CONTROL))
            .collect();
        tk.add_special_tokens(&specials);

        let id = |key: &str| g.meta(key).and_then(|v| v.to_u32().ok());
        let eos = id("tokenizer.ggml.eos_token_id");
        let bos = id("tokenizer.ggml.bos_token_id");
        let add_bos = g
            .meta("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let name = |i: Option<u32>| {
            i.and_then(|i| tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        let mut eos_ids: Vec<u32> = eos.into_iter().collect();
        if let Some(eot) = id("tokenizer.ggml.eot_token_id") {
            if !eos_ids.contains(&eot) {
                eos_ids.push(eot);
            }
        }
        Ok(Self {
            inner: tk,
            bos_token: name(bos),
            eos_token: name(eos),
            eos_ids,
            bos_id: bos,
            add_bos,
        })
    }

    /// The tokenizer as GGUF `tokenizer.ggml.*` metadata (what [`Self::from_gguf`] and
    /// llama.cpp read), its token list padded to `vocab_size` rows with unused `[PAD{i}]`
    /// entries as llama.cpp's converter pads it. Only byte-level BPE with the GPT-2 or
    /// SmolLM pre-tokenizer has a GGUF form here; another is an error naming it.
    pub fn gguf_metadata(
        &self,
        vocab_size: usize,
    ) -> Result<Vec<(&'static str, GgufValue)>, ModelError> {
        let j: serde_json::Value = serde_json::from_str(&self.to_json()?).map_err(tok_err)?;
        let model = &j["model"];
        if model["type"] != "BPE" || j["decoder"]["type"] != "ByteLevel" {
            return Err(ModelError::Tokenizer(format!(
                "a {} tokenizer with a {} decoder has no GGUF form here (byte-level BPE only)",
                model["type"], j["decoder"]["type"]
            )));
        }
        let pre = gguf_pre_tokenizer(&j["pre_tokenizer"])?;
        let n = self.vocab_size().max(vocab_size);
        let mut tokens: Vec<Option<String>> = vec![None; n];
        let mut types = vec![TOKEN_TYPE_NORMAL; n];
        for (t, id) in self.inner.get_vocab(true) {
            if let Some(slot) = tokens.get_mut(id as usize) {
                *slot = Some(t);
            }
        }
        for a in j["added_tokens"].as_array().into_iter().flatten() {
            if let Some(id) = a["id"].as_u64().filter(|&i| (i as usize) < n) {
                types[id as usize] = if a["special"].as_bool().unwrap_or(false) {
                    TOKEN_TYPE_CONTROL
                } else {
                    TOKEN_TYPE_USER_DEFINED
                };
            }
        }
        let tokens: Vec<GgufValue> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                GgufValue::String(t.unwrap_or_else(|| {
                    types[i] = TOKEN_TYPE_UNUSED;
                    format!("[PAD{i}]")
                }))
            })
            .collect();
        // `tokenizers` writes merges as pairs (or, before 0.20, as "a b" strings).
        let merges: Vec<GgufValue> = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| match m {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(p) => {
                    Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
                }
                _ => None,
            })
            .map(GgufValue::String)
            .collect();
        let mut out = vec![
            ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
            ("tokenizer.ggml.pre", GgufValue::String(pre.into())),
            ("tokenizer.ggml.tokens", GgufValue::Array(tokens)),
            (
                "tokenizer.ggml.token_type",
                GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
            ),
            ("tokenizer.ggml.merges", GgufValue::Array(merges)),
            (
                "tokenizer.ggml.add_bos_token",
                GgufValue::Bool(self.add_bos),
            ),
        ];
        if let Some(b) = self.bos_id {
            out.push(("tokenizer.ggml.bos_token_id", GgufValue::U32(b)));
        }
        if let Some(&e) = self.eos_ids.first() {
            out.push(("tokenizer.ggml.eos_token_id", GgufValue::U32(e)));
        }
        if let Some(&t) = self.eos_ids.get(1) {
            out.push(("tokenizer.ggml.eot_token_id", GgufValue::U32(t)));
        }
        Ok(out)
    }

    /// Reads an HF `tokenizer.json`; special ids come from the model's config.
    pub fn from_file(
        path: &Path,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
        add_bos: bool,
    ) -> Result<Self, ModelError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let name = |i: Option<u32>| i.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
        Ok(Self {
            bos_token: name(bos_id),
            eos_token: name(eos_ids.first().copied()),
            inner,
            eos_ids,
            bos_id,
            add_bos,
        })
    }

    /// Writes the tokenizer as an HF `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        self.inner.save(path, false).map_err(tok_err)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` (special tokens in the text are recognised; BOS when the model
    /// wants it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Token ids of `text` alone: no BOS, special tokens in the text parsed.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}

/// The GGUF `tokenizer.ggml.pre` name of a `tokenizer.json` pre-tokenizer: the ones
/// [`TextTokenizer::from_gguf`] builds.
fn gguf_pre_tokenizer(p: &serde_json::Value) -> Result<&'static str, ModelError> {
    let parts: Vec<&serde_json::Value> = match p["type"].as_str() {
        Some("Sequence") => p["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect(),
        _ => vec![p],
    };
    let kind = |v: &serde_json::Value| v["type"].as_str().unwrap_or("").to_string();
    match parts.as_slice() {
        [b] if kind(b) == "ByteLevel" => Ok("gpt2"),
        [d, b]
            if kind(d) == "Digits"
                && d["individual_digits"].as_bool() == Some(true)
                && kind(b) == "ByteLevel" =>
        {
            Ok("smollm")
        }
        _ => Err(ModelError::Tokenizer(format!(
            "the pre-tokenizer {p} has no GGUF name here (GPT-2's byte-level, or SmolLM's digits then byte-level)"
        ))),
    }
}

/// Turns a growing list of generated ids into text pieces that are always valid UTF-8:
/// bytes of a character split across tokens are held back until it is complete.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    /// `ids` is every generated id so far; returns the new text, if any is complete.
    pub fn next_piece(
        &mut self,
        tk: &TextTokenizer,
        ids: &[u32],
    ) -> Result<Option<String>, ModelError> {
        let prefix = tk.decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = tk.decode(&ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let piece = full
                .get(prefix.len()..)
                .map(str::to_string)
                .unwrap_or_default();
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }
}
