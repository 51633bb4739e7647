//! The frozen base weights and their loaders (GGUF and HF safetensors directories).
//! Invariant: weights are loaded once, converted to the layout the forward pass wants
//! (f32, GGUF Q/K row order for interleaved RoPE), and never mutated afterwards.

use std::{collections::HashMap, fs::File, path::Path};

use std::sync::Arc;

use candle_core::{
    quantized::{gguf_file, QTensor},
    DType, Device, Tensor,
};

use super::{
    config::LlamaConfig,
    packed::{DecodeKernel, PackedLinear},
    sites::Module,
    ModelError,
};

/// A linear layer `y = x W^T` over frozen weights `W: (out, in)`: f32 for the plain path
/// and prefill GEMMs, and (from GGUF) the packed blocks the decode path streams.
#[derive(Debug, Clone)]
pub struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) packed: Option<Arc<PackedLinear>>,
}

/// Rows of one serving GEMM call come in whole multiples of this (see
/// [`Linear::forward_tiled`]).
pub const GEMM_TILE_ROWS: usize = 16;

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self {
            weight,
            packed: None,
        }
    }

    /// From a GGUF tensor: dequantised f32 plus the packed blocks.
    pub fn from_qtensor(q: &QTensor, dev: &Device) -> Result<Self, ModelError> {
        Ok(Self {
            weight: q.dequantize(dev)?.to_dtype(DType::F32)?,
            packed: Some(Arc::new(PackedLinear::from_qtensor(q)?)),
        })
    }

    /// `x: (rows, in)` where the first `decode_rows` rows are decode tokens: those go through
    /// the packed kernel `kernel` (row-wise, batch-invariant), the rest through the f32 GEMM.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        decode_rows: usize,
        kernel: DecodeKernel,
    ) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        if self.packed.is_none() || decode_rows == 0 {
            return self.forward_tiled(x);
        }
        let y = self.forward_rows_vec(&x.flatten_all()?.to_vec1()?, rows, decode_rows, kernel)?;
        Tensor::from_vec(y, (rows, self.out_features()), x.device())
    }

    /// [`Linear::forward_rows`] over a plain buffer `x` of `rows` rows, row-major.
    pub fn forward_rows_vec(
        &self,
        x: &[f32],
        rows: usize,
        decode_rows: usize,
        kernel: DecodeKernel,
    ) -> candle_core::Result<Vec<f32>> {
        let k = self.in_features();
        let dev = self.weight.device();
        let gemm = |x: &[f32], rows: usize| -> candle_core::Result<Vec<f32>> {
            let t = Tensor::from_slice(x, (rows, k), dev)?;
            self.forward_tiled(&t)?.flatten_all()?.to_vec1()
        };
        let Some(p) = self.packed.as_ref().filter(|_| decode_rows > 0) else {
            return gemm(x, rows);
        };
        let mut y = p.matmul_with(kernel, &x[..decode_rows * k], decode_rows);
        if decode_rows < rows {
            y.extend(gemm(&x[decode_rows * k..], rows - decode_rows)?);
        }
        Ok(y)
    }

    /// `x W^T` through the f32 GEMM in whole tiles of [`GEMM_TILE_ROWS`] rows, zero rows
    /// padding the last. The GEMM picks its kernels by the row count, and below a tile
    /// (one row above all) they round differently, so a row's bits would otherwise depend
    /// on how many rows shared its step; in whole tiles they do not (tested in
    /// `server/tests/kv_paging.rs`), which is what lets a prefix-cached, preempted or
    /// batched sequence produce the very bits of its solo run.
    pub fn forward_tiled(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        let pad = rows.next_multiple_of(GEMM_TILE_ROWS) - rows;
        if pad == 0 {
            return self.forward(x);
        }
        let z = Tensor::zeros((pad, x.dim(1)?), x.dtype(), x.device())?;
        self.forward(&Tensor::cat(&[x, &z], 0)?)?.narrow(0, 0, rows)
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// `x W^T` for the differentiable forward: a frozen weight's backward yields `x`'s
    /// gradient only ([`super::frozen`]); a trained one (a `Var`, in full fine-tuning)
    /// gets its own gradient too.
    pub fn forward_train(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.weight.is_variable() {
            x.matmul(&self.weight.t()?)
        } else {
            super::frozen::frozen_matmul(x, &self.weight)
        }
    }
    /// `x: (rows, in)` -> `(rows, out)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.t()?)
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
}

/// The weights of one decoder block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ffn_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// All weights of the model. `lm_head` shares storage with `embed` when tied.
#[derive(Debug, Clone)]
pub struct Weights {
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Tensor,
    pub lm_head: Linear,
}

impl Weights {
    /// Whether the LM head is the embedding matrix itself (tied, as SmolLM2's are).
    pub fn tied(&self) -> bool {
        self.lm_head.weight().id() == self.embed.id()
    }

    /// Every distinct tensor, named as an HF `LlamaForCausalLM` names it, in the HF layout
    /// (q/k rows back in the halves order); a tied LM head is not repeated.
    pub fn hf_tensors(&self, cfg: &LlamaConfig) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            for (norm, t) in [
                ("input_layernorm", &l.attn_norm),
                ("post_attention_layernorm", &l.ffn_norm),
            ] {
                out.push((format!("model.layers.{i}.{norm}.weight"), t.clone()));
            }
            for m in Module::ALL {
                let w = m.of(l).weight();
                let w = match m {
                    Module::Q => permute_gguf_to_hf(w, cfg.num_heads)?,
                    Module::K => permute_gguf_to_hf(w, cfg.num_kv_heads)?,
                    _ => w.clone(),
                };
                out.push((format!("{}.weight", m.hf_key(i)), w));
            }
        }
        out.push(("model.norm.weight".into(), self.final_norm.clone()));
        if !self.tied() {
            out.push(("lm_head.weight".into(), self.lm_head.weight().clone()));
        }
        Ok(out)
    }

    /// Bytes of the f32 weights (each distinct tensor once), plus the packed decode blocks.
    pub fn resident_bytes(&self) -> usize {
        let f32s = |t: &Tensor| t.elem_count() * 4;
        let lin = |l: &Linear| f32s(l.weight()) + l.packed.as_ref().map_or(0, |p| p.bytes());
        let mut n = f32s(&self.embed) + f32s(&self.final_norm);
        for l in &self.layers {
            n += f32s(&l.attn_norm) + f32s(&l.ffn_norm);
            n += Module::ALL.iter().map(|m| lin(m.of(l))).sum::<usize>();
        }
        n + if self.tied() {
            self.lm_head.packed.as_ref().map_or(0, |p| p.bytes())
        } else {
            lin(&self.lm_head)
        }
    }
}

/// Metadata read from a GGUF file besides the tensors.
pub struct GgufFile {
    pub content: gguf_file::Content,
    file: File,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let mut file = File::open(path)
            .map_err(|e| ModelError::Io(format!("cannot open {}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| ModelError::Format(format!("{}: not a GGUF file: {e}", path.display())))?;
        Ok(Self { content, file })
    }

    pub fn meta(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_u32(&self, key: &str) -> Result<u32, ModelError> {
        self.meta(key)
            .ok_or_else(|| ModelError::Format(format!("GGUF metadata {key} is missing")))?
            .to_u32()
            .map_err(|e| ModelError::Format(format!("GGUF metadata {key}: {e}")))
    }

    pub fn meta_f32(&self, key: &str) -> Option<f32> {
        self.meta(key).and_then(|v| v.to_f32().ok())
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }

    pub fn config(&self) -> Result<LlamaConfig, ModelError> {
        let arch = self.meta_str("general.architecture").unwrap_or("");
        if arch != "llama" {
            return Err(ModelError::Format(format!(
                "unsupported GGUF architecture {arch:?}; graft serves Llama-family models"
            )));
        }
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| ModelError::Format("GGUF has no token_embd.weight".into()))?;
        let vocab_size = embd.shape.dims()[0];
        let cfg = LlamaConfig {
            vocab_size,
            hidden_size: self.meta_u32("llama.embedding_length")? as usize,
            intermediate_size: self.meta_u32("llama.feed_forward_length")? as usize,
            num_layers: self.meta_u32("llama.block_count")? as usize,
            num_heads: self.meta_u32("llama.attention.head_count")? as usize,
            num_kv_heads: self.meta_u32("llama.attention.head_count_kv")? as usize,
            max_position: self.meta_u32("llama.context_length")? as usize,
            rms_eps: self
                .meta_f32("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5) as f64,
            rope_theta: self.meta_f32("llama.rope.freq_base").unwrap_or(10_000.0),
        };
        cfg.validate().map_err(ModelError::Format)?;
        Ok(cfg)
    }

    fn qtensor(&mut self, name: &str, dev: &Device) -> Result<QTensor, ModelError> {
        self.content
            .tensor(&mut self.file, name, dev)
            .map_err(|e| ModelError::Format(format!("GGUF tensor {name}: {e}")))
    }

    fn tensor(&mut self, name: &str, dev: &Device) -> Result<Tensor, ModelError> {
        Ok(self
            .qtensor(name, dev)?
            .dequantize(dev)?
            .to_dtype(DType::F32)?)
    }

    fn linear(&mut self, name: &str, dev: &Device) -> Result<Linear, ModelError> {
        let q = self.qtensor(name, dev)?;
        Linear::from_qtensor(&q, dev)
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Loads every tensor as f32. GGUF already stores Q/K in the interleaved-RoPE order.
    pub fn weights(&mut self, cfg: &LlamaConfig, dev: &Device) -> Result<Weights, ModelError> {
        let embed_q = self.qtensor("token_embd.weight", dev)?;
        let embed_linear = Linear::from_qtensor(&embed_q, dev)?;
        let embed = embed_linear.weight.clone();
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(LayerWeights {
                attn_norm: self.tensor(&p("attn_norm"), dev)?,
                q: self.linear(&p("attn_q"), dev)?,
                k: self.linear(&p("attn_k"), dev)?,
                v: self.linear(&p("attn_v"), dev)?,
                o: self.linear(&p("attn_output"), dev)?,
                ffn_norm: self.tensor(&p("ffn_norm"), dev)?,
                gate: self.linear(&p("ffn_gate"), dev)?,
                up: self.linear(&p("ffn_up"), dev)?,
                down: self.linear(&p("ffn_down"), dev)?,
            });
        }
        let final_norm = self.tensor("output_norm.weight", dev)?;
        let lm_head = if self.has_tensor("output.weight") {
            self.linear("output.weight", dev)?
        } else {
            embed_linear
        };
        let w = Weights {
            embed,
            layers,
            final_norm,
            lm_head,
        };
        check_shapes(&w, cfg)?;
        Ok(w)
    }
}

/// Permutes the rows of an HF-layout q/k projection (`(n_head*head_dim, in)`, RoPE on the
/// two halves of each head) into the GGUF layout (RoPE on interleaved pairs), exactly as
/// llama.cpp's converter does. Works on any tensor whose first dim is `n_head*head_dim`.
pub fn permute_hf_to_gguf(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_head;
    w.reshape((n_head, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// The inverse of [`permute_hf_to_gguf`].
pub fn permute_gguf_to_hf(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_head;
    w.reshape((n_head, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Loads an HF-style directory: `config.json` + one or more `*.safetensors`.
pub fn load_hf_weights(
    dir: &Path,
    cfg: &LlamaConfig,
    tied: bool,
    dev: &Device,
) -> Result<Weights, ModelError> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::Io(format!("cannot read {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Format(format!(
            "{} holds no *.safetensors file",
            dir.display()
        )));
    }
    for f in files {
        let t = candle_core::safetensors::load(&f, dev)
            .map_err(|e| ModelError::Format(format!("{}: {e}", f.display())))?;
        tensors.extend(t);
    }
    let mut take = |name: &str| -> Result<Tensor, ModelError> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| ModelError::Format(format!("tensor {name} is missing")))?;
        Ok(t.to_dtype(DType::F32)?)
    };
    let embed = take("model.embed_tokens.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}.weight");
        let q = permute_hf_to_gguf(&take(&p("self_attn.q_proj"))?, cfg.num_heads)?;
        let k = permute_hf_to_gguf(&take(&p("self_attn.k_proj"))?, cfg.num_kv_heads)?;
        layers.push(LayerWeights {
            attn_norm: take(&p("input_layernorm"))?,
            q: Linear::new(q),
            k: Linear::new(k),
            v: Linear::new(take(&p("self_attn.v_proj"))?),
            o: Linear::new(take(&p("self_attn.o_proj"))?),
            ffn_norm: take(&p("post_attention_layernorm"))?,
            gate: Linear::new(take(&p("mlp.gate_proj"))?),
            up: Linear::new(take(&p("mlp.up_proj"))?),
            down: Linear::new(take(&p("mlp.down_proj"))?),
        });
    }
    let final_norm = take("model.norm.weight")?;
    let lm_head = match take("lm_head.weight") {
        Ok(t) => Linear::new(t),
        Err(_) if tied => Linear::new(embed.clone()),
        Err(e) => return Err(e),
    };
    let w = Weights {
        embed,
        layers,
        final_norm,
        lm_head,
    };
    check_shapes(&w, cfg)?;
    Ok(w)
}

fn check_shapes(w: &Weights, cfg: &LlamaConfig) -> Result<(), ModelError> {
    let want = |name: &str, t: &Tensor, dims: &[usize]| -> Result<(), ModelError> {
        if t.dims() != dims {
            return Err(ModelError::Format(format!(
                "tensor {name} has shape {:?}, expected {dims:?}",
                t.dims()
            )));
        }
        Ok(())
    };
    let (h, f, kv) = (cfg.hidden_size, cfg.intermediate_size, cfg.kv_dim());
    want("embed", &w.embed, &[cfg.vocab_size, h])?;
    want("lm_head", w.lm_head.weight(), &[cfg.vocab_size, h])?;
    want("final_norm", &w.final_norm, &[h])?;
    for (i, l) in w.layers.iter().enumerate() {
        want(&format!("layer {i} q"), l.q.weight(), &[h, h])?;
        want(&format!("layer {i} k"), l.k.weight(), &[kv, h])?;
        want(&format!("layer {i} v"), l.v.weight(), &[kv, h])?;
        want(&format!("layer {i} o"), l.o.weight(), &[h, h])?;
        want(&format!("layer {i} gate"), l.gate.weight(), &[f, h])?;
        want(&format!("layer {i} up"), l.up.weight(), &[f, h])?;
        want(&format!("layer {i} down"), l.down.weight(), &[h, f])?;
        want(&format!("layer {i} attn_norm"), &l.attn_norm, &[h])?;
        want(&format!("layer {i} ffn_norm"), &l.ffn_norm, &[h])?;
    }
    Ok(())
}
