//! The frozen base weights and their loaders (GGUF and HF safetensors directories).
//! Invariant: weights are loaded once, in the layout the forward pass wants (GGUF's packed
//! blocks, or f32 from HF files; GGUF Q/K row order for interleaved RoPE), and never
//! mutated afterwards; f32 weights made from blocks on demand are the blocks' exact values,
//! made again the same whenever they were dropped.

use std::{collections::HashMap, fs::File, path::Path};

use std::sync::{Arc, Mutex};

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

/// A linear layer `y = x W^T` over frozen weights `W: (out, in)`. From GGUF it holds the
/// packed blocks every served row streams, and makes the f32 weights from them only when an
/// f32 path asks ([`Linear::weight`]); from HF files (or trained, or merged) it holds f32.
#[derive(Debug, Clone)]
pub struct Linear {
    form: Form,
}

#[derive(Debug, Clone)]
enum Form {
    /// f32 weights held for the layer's life.
    Dense(Tensor),
    /// GGUF blocks; their f32 weights made on demand and `kept` once a differentiable
    /// forward has used them (training), until [`Weights::release_dense`]. Shared by the
    /// layer's clones.
    Packed {
        blocks: Arc<PackedLinear>,
        kept: Arc<Mutex<Option<Tensor>>>,
    },
}

/// Rows of one serving GEMM call come in whole multiples of this (see
/// [`Linear::forward_tiled`]).
pub const GEMM_TILE_ROWS: usize = 16;

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self {
            form: Form::Dense(weight),
        }
    }

    /// From a GGUF tensor: the packed blocks, f32 on demand.
    pub fn from_qtensor(q: &QTensor) -> Result<Self, ModelError> {
        Ok(Self {
            form: Form::Packed {
                blocks: Arc::new(PackedLinear::from_qtensor(q)?),
                kept: Arc::default(),
            },
        })
    }

    /// The packed blocks, for a layer loaded from GGUF.
    fn packed(&self) -> Option<&PackedLinear> {
        match &self.form {
            Form::Dense(_) => None,
            Form::Packed { blocks, .. } => Some(blocks),
        }
    }

    /// The f32 weights `(out, in)`: held or kept ones, else made from the packed blocks for
    /// this caller alone (not kept).
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        match &self.form {
            Form::Dense(t) => Ok(t.clone()),
            Form::Packed { blocks, kept } => {
                // Bound first: the guard must be gone before the weights are made (below).
                let held = lock(kept).clone();
                match held {
                    Some(t) => Ok(t),
                    None => dequantized(blocks),
                }
            }
        }
    }

    /// [`Linear::weight`], kept for the next caller: the differentiable forward's, which
    /// runs once a training step, and the trainer's other per-job uses of the base weights.
    ///
    /// The lock is never held while the weights are made (here or in [`Linear::weight`]):
    /// that runs on the rayon pool, whose workers, waiting for it, may take up other work
    /// that needs the lock. Two callers at once may both make them; the first kept stays.
    pub fn weight_kept(&self) -> candle_core::Result<Tensor> {
        let Form::Packed { blocks, kept } = &self.form else {
            return self.weight();
        };
        let held = lock(kept).clone();
        if let Some(t) = held {
            return Ok(t);
        }
        let t = dequantized(blocks)?;
        Ok(lock(kept).get_or_insert(t).clone())
    }

    /// Drops kept f32 weights made from the blocks.
    fn release(&self) {
        if let Form::Packed { kept, .. } = &self.form {
            *lock(kept) = None;
        }
    }

    /// Bytes held now: the f32 weights (those made from blocks while kept) and the blocks.
    fn bytes(&self) -> usize {
        let f32s = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match &self.form {
            Form::Dense(t) => f32s(t),
            Form::Packed { blocks, kept } => blocks.bytes() + lock(kept).as_ref().map_or(0, f32s),
        }
    }

    /// Whether `other` is this very layer (a clone of it), not merely equal weights.
    pub fn same_as(&self, other: &Linear) -> bool {
        match (&self.form, &other.form) {
            (Form::Dense(a), Form::Dense(b)) => a.id() == b.id(),
            (Form::Packed { blocks: a, .. }, Form::Packed { blocks: b, .. }) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// This layer with its f32 weights held and no packed form: for the f32 paths only.
    pub fn unpacked(&self) -> candle_core::Result<Self> {
        Ok(Self::new(self.weight()?))
    }

    /// Rows `ids` of the weight, one after another (the embedding lookup): from the blocks
    /// when there are blocks (the f32 weights' values, bit for bit).
    pub fn rows(&self, ids: &[u32]) -> candle_core::Result<Vec<f32>> {
        match &self.form {
            Form::Dense(w) => {
                let idx = Tensor::from_slice(ids, ids.len(), w.device())?;
                w.index_select(&idx, 0)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()
            }
            Form::Packed { blocks, .. } => blocks
                .dense_rows(ids)
                .ok_or_else(|| candle_core::Error::Msg("a row id past the weight's rows".into())),
        }
    }

    /// `x: (rows, in)` where the first `decode_rows` rows are decode tokens: those go through
    /// the packed kernel `kernel` (row-wise, batch-invariant), the rest through the exact
    /// packed kernel, or, without blocks, everything through the f32 GEMM.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        decode_rows: usize,
        kernel: DecodeKernel,
    ) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        if self.packed().is_none() {
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
        let Some(p) = self.packed() else {
            // The weight's device: on a GPU the rows go there and the outputs come back.
            let t = Tensor::from_slice(x, (rows, k), self.device())?;
            return self.forward_tiled(&t)?.flatten_all()?.to_vec1();
        };
        if kernel == DecodeKernel::Exact || decode_rows == 0 {
            return Ok(p.matmul(x, rows));
        }
        let mut y = p.matmul_with(kernel, &x[..decode_rows * k], decode_rows);
        if decode_rows < rows {
            y.extend(p.matmul(&x[decode_rows * k..], rows - decode_rows));
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
    /// `x W^T` for the differentiable forward: a frozen weight's backward yields `x`'s
    /// gradient only ([`super::frozen`]); a trained one (a `Var`, in full fine-tuning)
    /// gets its own gradient too.
    ///
    /// Weights held in another dtype than `x`'s (bf16 on a GPU) take `x` cast to theirs and
    /// give `x`'s dtype back. There (and on any device but the CPU, which the custom op's
    /// kernel is written for) candle's own matmul runs, whose backward also makes the frozen
    /// weight's gradient, thrown away.
    pub fn forward_train(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight_kept()?;
        if w.is_variable() {
            x.matmul(&w.t()?)
        } else if w.device().is_cpu() && w.dtype() == x.dtype() {
            super::frozen::frozen_matmul(x, &w)
        } else {
            matmul_as(x, &w)
        }
    }
    /// `x W^T + t B^T` for the differentiable forward: this layer plus a low-rank update
    /// `t: (rows, r)`, `b: (out, r)` beside it. Over a frozen f32 weight on the CPU one op
    /// ([`super::frozen::FrozenPlusLowRank`]) that keeps a single `(rows, out)` tensor for
    /// the backward; else [`Linear::forward_train`] plus the update.
    pub fn forward_train_plus(
        &self,
        x: &Tensor,
        t: &Tensor,
        b: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let w = self.weight_kept()?;
        let all_f32 = [x, t, b, &w].iter().all(|v| v.dtype() == DType::F32);
        if !w.is_variable() && w.device().is_cpu() && all_f32 {
            return super::frozen::frozen_plus_low_rank(x, &w, t, b);
        }
        self.forward_train(x)? + t.matmul(&b.t()?)?
    }
    /// `x: (rows, in)` -> `(rows, out)`, in `x`'s dtype (see [`Linear::forward_train`]).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        matmul_as(x, &self.weight_kept()?)
    }

    /// Where the layer's weights are: the CPU for GGUF blocks.
    pub fn device(&self) -> &Device {
        match &self.form {
            Form::Dense(t) => t.device(),
            Form::Packed { .. } => &Device::Cpu,
        }
    }

    /// This layer's weights held on `dev` as `dtype`, dense (for [`Weights::placed`]).
    fn placed(&self, dev: &Device, dtype: DType) -> candle_core::Result<Self> {
        Ok(Self::new(self.weight()?.to_device(dev)?.to_dtype(dtype)?))
    }
    pub fn out_features(&self) -> usize {
        match &self.form {
            Form::Dense(t) => t.dims()[0],
            Form::Packed { blocks, .. } => blocks.out_features(),
        }
    }
    pub fn in_features(&self) -> usize {
        match &self.form {
            Form::Dense(t) => t.dims()[1],
            Form::Packed { blocks, .. } => blocks.in_features(),
        }
    }
}

/// `x W^T` in `x`'s dtype, `x` cast to `w`'s when they differ.
fn matmul_as(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() == w.dtype() {
        return x.matmul(&w.t()?);
    }
    x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(x.dtype())
}

/// The f32 weights of `blocks`.
fn dequantized(blocks: &PackedLinear) -> candle_core::Result<Tensor> {
    Tensor::from_vec(
        blocks.to_dense(),
        (blocks.out_features(), blocks.in_features()),
        &Device::Cpu,
    )
}

/// Every lock here guards a value set in one store (a kept tensor, a holder count), so a
/// poisoned one still holds a whole value.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// All weights of the model. `lm_head` is `embed` itself when tied.
#[derive(Debug, Clone)]
pub struct Weights {
    pub embed: Linear,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Tensor,
    pub lm_head: Linear,
    /// Holders of [`DenseInUse`]: f32 weights made from blocks are kept while any is held.
    in_use: Arc<Mutex<usize>>,
}

impl Weights {
    pub fn new(
        embed: Linear,
        layers: Vec<LayerWeights>,
        final_norm: Tensor,
        lm_head: Linear,
    ) -> Self {
        Self {
            embed,
            layers,
            final_norm,
            lm_head,
            in_use: Arc::default(),
        }
    }

    /// Whether the LM head is the embedding matrix itself (tied, as SmolLM2's are).
    pub fn tied(&self) -> bool {
        self.lm_head.same_as(&self.embed)
    }

    /// Every linear layer, the embedding and a tied LM head once.
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        let head = (!self.tied()).then_some(&self.lm_head);
        std::iter::once(&self.embed)
            .chain(
                self.layers
                    .iter()
                    .flat_map(|l| Module::ALL.map(|m| m.of(l))),
            )
            .chain(head)
    }

    /// Every distinct tensor, named as an HF `LlamaForCausalLM` names it, in the HF layout
    /// (q/k rows back in the halves order); a tied LM head is not repeated.
    pub fn hf_tensors(&self, cfg: &LlamaConfig) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed.weight()?,
        )];
        for (i, l) in self.layers.iter().enumerate() {
            for (norm, t) in [
                ("input_layernorm", &l.attn_norm),
                ("post_attention_layernorm", &l.ffn_norm),
            ] {
                out.push((format!("model.layers.{i}.{norm}.weight"), t.clone()));
            }
            for m in Module::ALL {
                let w = m.of(l).weight()?;
                let w = match m {
                    Module::Q => permute_gguf_to_hf(&w, cfg.num_heads)?,
                    Module::K => permute_gguf_to_hf(&w, cfg.num_kv_heads)?,
                    _ => w,
                };
                out.push((format!("{}.weight", m.hf_key(i)), w));
            }
        }
        out.push(("model.norm.weight".into(), self.final_norm.clone()));
        if !self.tied() {
            out.push(("lm_head.weight".into(), self.lm_head.weight()?));
        }
        Ok(out)
    }

    /// Bytes held now: f32 weights (each distinct tensor once, those made from blocks while
    /// they are kept) and the packed blocks.
    pub fn resident_bytes(&self) -> usize {
        let f32s = |t: &Tensor| t.elem_count() * 4;
        let norms: usize = self
            .layers
            .iter()
            .map(|l| f32s(&l.attn_norm) + f32s(&l.ffn_norm))
            .sum();
        let linears: usize = self.linears().map(Linear::bytes).sum();
        norms + f32s(&self.final_norm) + linears
    }

    /// Marks the f32 weights made from blocks as in use (by a training job) until the
    /// answer is dropped: the differentiable forward keeps them from its first step on, and
    /// when the last holder lets go they are dropped, so serving alone holds the blocks only.
    pub fn dense_in_use(&self) -> DenseInUse {
        *lock(&self.in_use) += 1;
        DenseInUse {
            weights: self.clone(),
        }
    }

    /// These weights on `dev`: every linear layer dense in `dtype` (bf16 on a GPU:
    /// [`super::device::weight_dtype`]; a tied LM head stays the embedding itself), the
    /// norms as f32 there. On the CPU as f32, themselves (GGUF blocks stay blocks).
    pub fn placed(&self, dev: &Device, dtype: DType) -> candle_core::Result<Self> {
        if dev.is_cpu() && dtype == DType::F32 {
            return Ok(self.clone());
        }
        let norm = |t: &Tensor| t.to_device(dev)?.to_dtype(DType::F32);
        let embed = self.embed.placed(dev, dtype)?;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    attn_norm: norm(&l.attn_norm)?,
                    q: l.q.placed(dev, dtype)?,
                    k: l.k.placed(dev, dtype)?,
                    v: l.v.placed(dev, dtype)?,
                    o: l.o.placed(dev, dtype)?,
                    ffn_norm: norm(&l.ffn_norm)?,
                    gate: l.gate.placed(dev, dtype)?,
                    up: l.up.placed(dev, dtype)?,
                    down: l.down.placed(dev, dtype)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lm_head = if self.tied() {
            embed.clone()
        } else {
            self.lm_head.placed(dev, dtype)?
        };
        Ok(Self::new(embed, layers, norm(&self.final_norm)?, lm_head))
    }

    /// Drops every kept f32 weight made from blocks (made again when next asked for).
    pub fn release_dense(&self) {
        self.linears().for_each(Linear::release);
    }
}

/// See [`Weights::dense_in_use`].
pub struct DenseInUse {
    weights: Weights,
}

impl Drop for DenseInUse {
    fn drop(&mut self) {
        let mut n = lock(&self.weights.in_use);
        *n -= 1;
        if *n == 0 {
            self.weights.release_dense();
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
        Linear::from_qtensor(&q)
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Loads the linear layers as packed blocks (f32 on demand) and the norms as f32. GGUF
    /// already stores Q/K in the interleaved-RoPE order.
    pub fn weights(&mut self, cfg: &LlamaConfig, dev: &Device) -> Result<Weights, ModelError> {
        let embed = self.linear("token_embd.weight", dev)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let n = |m: Module| p(m.gguf_name());
            layers.push(LayerWeights {
                attn_norm: self.tensor(&p("attn_norm"), dev)?,
                q: self.linear(&n(Module::Q), dev)?,
                k: self.linear(&n(Module::K), dev)?,
                v: self.linear(&n(Module::V), dev)?,
                o: self.linear(&n(Module::O), dev)?,
                ffn_norm: self.tensor(&p("ffn_norm"), dev)?,
                gate: self.linear(&n(Module::Gate), dev)?,
                up: self.linear(&n(Module::Up), dev)?,
                down: self.linear(&n(Module::Down), dev)?,
            });
        }
        let final_norm = self.tensor("output_norm.weight", dev)?;
        let lm_head = if self.has_tensor("output.weight") {
            self.linear("output.weight", dev)?
        } else {
            embed.clone()
        };
        let w = Weights::new(embed, layers, final_norm, lm_head);
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
    let embed = Linear::new(take("model.embed_tokens.weight")?);
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
        Err(_) if tied => embed.clone(),
        Err(e) => return Err(e),
    };
    let w = Weights::new(embed, layers, final_norm, lm_head);
    check_shapes(&w, cfg)?;
    Ok(w)
}

fn check_shapes(w: &Weights, cfg: &LlamaConfig) -> Result<(), ModelError> {
    let want_dims = |name: &str, got: &[usize], dims: &[usize]| -> Result<(), ModelError> {
        if got != dims {
            return Err(ModelError::Format(format!(
                "tensor {name} has shape {got:?}, expected {dims:?}"
            )));
        }
        Ok(())
    };
    let want = |name: &str, t: &Tensor, dims: &[usize]| want_dims(name, t.dims(), dims);
    let lin = |name: &str, l: &Linear, dims: &[usize]| {
        want_dims(name, &[l.out_features(), l.in_features()], dims)
    };
    let (h, f, kv) = (cfg.hidden_size, cfg.intermediate_size, cfg.kv_dim());
    lin("embed", &w.embed, &[cfg.vocab_size, h])?;
    lin("lm_head", &w.lm_head, &[cfg.vocab_size, h])?;
    want("final_norm", &w.final_norm, &[h])?;
    for (i, l) in w.layers.iter().enumerate() {
        lin(&format!("layer {i} q"), &l.q, &[h, h])?;
        lin(&format!("layer {i} k"), &l.k, &[kv, h])?;
        lin(&format!("layer {i} v"), &l.v, &[kv, h])?;
        lin(&format!("layer {i} o"), &l.o, &[h, h])?;
        lin(&format!("layer {i} gate"), &l.gate, &[f, h])?;
        lin(&format!("layer {i} up"), &l.up, &[f, h])?;
        lin(&format!("layer {i} down"), &l.down, &[h, f])?;
        want(&format!("layer {i} attn_norm"), &l.attn_norm, &[h])?;
        want(&format!("layer {i} ffn_norm"), &l.ffn_norm, &[h])?;
    }
    Ok(())
}
