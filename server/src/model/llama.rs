//! The Llama-family decoder: one set of frozen weights, two forward paths.
//! - [`Llama::forward_batch`]: the serving path. Rows of many sequences in one step; the
//!   linear layers run as one batched matmul, attention per sequence over its own
//!   [`KvCache`].
//! - [`Llama::forward_reference`]: the plain path. One whole sequence, no cache, built only
//!   from differentiable candle ops; tests hold the serving path to it.
//!
//! Invariant: the model never owns per-sequence state and never mutates its weights.

use std::borrow::Cow;

use candle_core::{DType, Device, Tensor};

use super::{
    adapter::{
        after_sublayer_rows, low_rank_rows, post_linear_rows, pre_linear_rows, Adapter, KvPrefix,
        TensorAdapter,
    },
    attention::{attend, AttnShape, RopeTable, RowPlace},
    config::LlamaConfig,
    fused,
    kv_cache::{KvCache, KvDtype, KvPool, KvShape},
    packed::DecodeKernel,
    rows as ops,
    sites::{Module, Sublayer},
    weights::{Linear, Weights},
    ModelError,
};

/// One sequence's share of a step: new tokens to run and the block table they extend.
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    /// Grown from the pool as needed (the engine grows it before the step, so there it
    /// never fails).
    pub cache: &'a mut KvCache,
    /// Whether the logits of this chunk's last token are wanted.
    pub want_logits: bool,
    /// Rows through the packed (decode) kernel rather than the f32 GEMM: generated tokens,
    /// and the engine's short prompts. The choice depends only on the sequence itself, never
    /// on the batch, so results stay batch-invariant.
    pub decode: bool,
    /// The sequence's adapter, applied to its rows only. Its KV prefix, if any, is already
    /// in `cache` ([`KvPool::seed_prefix`]); the hooks applied here are its linear parts.
    pub adapter: Option<&'a Adapter>,
}

/// The `N` outputs of a projection of `N` modules (one each, in order).
fn outputs<const N: usize>(ys: Vec<Vec<f32>>) -> [Vec<f32>; N] {
    let mut ys = ys.into_iter();
    std::array::from_fn(|_| ys.next().unwrap_or_default())
}

/// Runs a serving step on a worker of rayon's pool (inline when already on one): the step's
/// parallel matmuls then fork from that worker instead of each being injected into the pool
/// from outside, with the caller parked on a lock and every worker woken again, dozens of
/// times a token. Measured with `decode_profile` (int16, one stream): 56 -> 72 tokens/s.
fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// One step's wanted rows: final-norm states `(k, hidden)` in processing order (decode
/// chunks' rows first), the chunk each row is the last token of, and how many are decode rows.
struct LastStates {
    states: Tensor,
    chunks: Vec<usize>,
    decode: usize,
}

impl LastStates {
    /// The permutation from processing order back to chunk order.
    fn back(&self, dev: &Device) -> candle_core::Result<Tensor> {
        let mut back: Vec<(usize, u32)> = self
            .chunks
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, i as u32))
            .collect();
        back.sort_unstable();
        let back: Vec<u32> = back.into_iter().map(|(_, i)| i).collect();
        Tensor::from_vec(back, self.chunks.len(), dev)
    }
}

/// The frozen decoder.
#[derive(Debug)]
pub struct Llama {
    pub cfg: LlamaConfig,
    pub weights: Weights,
    rope: RopeTable,
    device: Device,
    /// Per layer, the attention and FFN RMSNorm weights as plain values for the serving
    /// step; and the final norm's.
    norms: Vec<(Vec<f32>, Vec<f32>)>,
    final_norm: Vec<f32>,
    decode_kernel: DecodeKernel,
}

impl Llama {
    pub fn new(cfg: LlamaConfig, weights: Weights, device: Device) -> Result<Self, ModelError> {
        let rope = RopeTable::new(cfg.head_dim(), cfg.max_position, cfg.rope_theta);
        let plain = |t: &Tensor| -> Result<Vec<f32>, ModelError> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let norms = weights
            .layers
            .iter()
            .map(|l| Ok((plain(&l.attn_norm)?, plain(&l.ffn_norm)?)))
            .collect::<Result<_, ModelError>>()?;
        let final_norm = plain(&weights.final_norm)?;
        Ok(Self {
            cfg,
            weights,
            rope,
            device,
            norms,
            final_norm,
            decode_kernel: DecodeKernel::default(),
        })
    }

    /// Chooses the decode rows' kernel (the exact f32 one by default).
    pub fn set_decode_kernel(&mut self, kernel: DecodeKernel) {
        self.decode_kernel = kernel;
    }

    pub fn decode_kernel(&self) -> DecodeKernel {
        self.decode_kernel
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The shape of one token's KV state.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            num_layers: self.cfg.num_layers,
            kv_dim: self.cfg.kv_dim(),
            dtype: KvDtype::F32,
        }
    }

    /// An f32 KV pool holding `tokens` positions (rounded up to whole blocks).
    pub fn kv_pool(&self, tokens: usize) -> std::io::Result<KvPool> {
        KvPool::new(self.kv_shape(), super::kv_cache::blocks_for(tokens))
    }

    fn attn_shape(&self) -> AttnShape {
        AttnShape {
            num_heads: self.cfg.num_heads,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim(),
        }
    }

    /// Runs one step over `chunks`, their keys and values in `pool`, and returns the logits
    /// `(n, vocab)` of the last token of every chunk with `want_logits`, in order, all
    /// through the LM head (an adapter's output hook is [`Llama::forward_step`]'s).
    pub fn forward_batch(
        &self,
        pool: &mut KvPool,
        chunks: &mut [SeqChunk<'_>],
    ) -> Result<Tensor, ModelError> {
        on_worker(|| self.forward_batch_here(pool, chunks))
    }

    fn forward_batch_here(
        &self,
        pool: &mut KvPool,
        chunks: &mut [SeqChunk<'_>],
    ) -> Result<Tensor, ModelError> {
        let Some(last) = self.run_batch(pool, chunks)? else {
            return Ok(Tensor::zeros(
                (0, self.cfg.vocab_size),
                DType::F32,
                &self.device,
            )?);
        };
        let logits =
            self.weights
                .lm_head
                .forward_rows(&last.states, last.decode, self.decode_kernel)?;
        Ok(logits.index_select(&last.back(&self.device)?, 0)?)
    }

    /// [`Llama::forward_batch`] with the output hook: per chunk with `want_logits`, in
    /// order, the LM head's logits, or the class logits of its adapter's head.
    pub fn forward_step(
        &self,
        pool: &mut KvPool,
        chunks: &mut [SeqChunk<'_>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        on_worker(|| self.forward_step_here(pool, chunks))
    }

    fn forward_step_here(
        &self,
        pool: &mut KvPool,
        chunks: &mut [SeqChunk<'_>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let Some(last) = self.run_batch(pool, chunks)? else {
            return Ok(Vec::new());
        };
        let head_of = |s: usize| chunks[s].adapter.and_then(|a| a.head.as_deref());
        let lm_head_of = |s: usize| chunks[s].adapter.and_then(|a| a.lm_head.as_deref());
        let own = |s: usize| head_of(s).is_some() || lm_head_of(s).is_some();
        // Rows through the shared LM head, in processing order (decode rows still first).
        let lm: Vec<u32> = (0..last.chunks.len())
            .filter(|&i| !own(last.chunks[i]))
            .map(|i| i as u32)
            .collect();
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); last.chunks.len()];
        if !lm.is_empty() {
            let decode = lm.iter().filter(|&&i| (i as usize) < last.decode).count();
            let rows = if lm.len() == last.chunks.len() {
                last.states.clone()
            } else {
                let idx = Tensor::from_slice(&lm, lm.len(), &self.device)?;
                last.states.index_select(&idx, 0)?
            };
            let logits = self
                .weights
                .lm_head
                .forward_rows(&rows, decode, self.decode_kernel)?
                .to_vec2()?;
            for (&i, l) in lm.iter().zip(logits) {
                out[i as usize] = l;
            }
        }
        if lm.len() < last.chunks.len() {
            let states = last.states.to_vec2::<f32>()?;
            for (i, h) in states.iter().enumerate() {
                if let Some(head) = head_of(last.chunks[i]) {
                    out[i] = head.apply_row(h);
                } else if let Some(head) = lm_head_of(last.chunks[i]) {
                    out[i] = head.apply_row(h);
                }
            }
        }
        // Back to the callers' chunk order.
        let mut order: Vec<(usize, Vec<f32>)> = last.chunks.iter().copied().zip(out).collect();
        order.sort_by_key(|(s, _)| *s);
        Ok(order.into_iter().map(|(_, l)| l).collect())
    }

    /// The decoder over one step's rows: the final-norm states of the last token of every
    /// chunk with `want_logits` (none when no chunk has tokens).
    fn run_batch(
        &self,
        pool: &mut KvPool,
        chunks: &mut [SeqChunk<'_>],
    ) -> Result<Option<LastStates>, ModelError> {
        let cfg = &self.cfg;
        // Decode chunks first so their rows form one block for the packed kernel.
        let mut order: Vec<usize> = (0..chunks.len()).collect();
        order.sort_by_key(|&i| !chunks[i].decode);
        let decode_rows: usize = chunks
            .iter()
            .filter(|c| c.decode)
            .map(|c| c.tokens.len())
            .sum();
        let mut ids = Vec::new();
        let mut rows = Vec::new();
        // (chunk index, row) of every wanted logit, in processing order.
        let mut logit_rows = Vec::new();
        let mut row_of = vec![0usize; chunks.len()];
        for &s in &order {
            let c = &chunks[s];
            row_of[s] = ids.len();
            let start = c.cache.len();
            if start + c.tokens.len() > cfg.max_position {
                return Err(ModelError::ContextOverflow {
                    needed: start + c.tokens.len(),
                    max: cfg.max_position,
                });
            }
            for (i, &t) in c.tokens.iter().enumerate() {
                if t as usize >= cfg.vocab_size {
                    return Err(ModelError::Format(format!(
                        "token id {t} is out of the vocabulary"
                    )));
                }
                ids.push(t);
                rows.push(RowPlace {
                    seq: s,
                    pos: start + i,
                });
            }
            if c.want_logits && !c.tokens.is_empty() {
                logit_rows.push(s);
            }
        }
        for c in chunks.iter_mut() {
            let end = c.cache.len() + c.tokens.len();
            pool.grow(c.cache, end)?;
        }
        let row_adapter: Vec<Option<&Adapter>> = rows
            .iter()
            .map(|r| chunks[r.seq].adapter.filter(|a| a.has_row_hooks()))
            .collect();
        let any_hooks = row_adapter.iter().any(Option::is_some);
        let n = ids.len();
        if n == 0 {
            return Ok(None);
        }
        let kernel = self.decode_kernel;
        // Projections of one input: each row's own `pre_linear` hook, the shared weights
        // for every row, then each row's own `post_linear` hook. The rows' low-rank
        // updates, memory-bound (each row reads its own pairs), run beside the shared
        // weights' compute-bound products, all of the input's modules at once.
        let project = |mods: &[(&Linear, Module)],
                       li: usize,
                       x: &[f32]|
         -> Result<Vec<Vec<f32>>, ModelError> {
            if !any_hooks {
                return mods
                    .iter()
                    .map(|(lin, _)| Ok(lin.forward_rows_vec(x, n, decode_rows, kernel)?))
                    .collect();
            }
            // A module's input is copied only where some row's own hook changes it.
            let xs: Vec<Cow<'_, [f32]>> = mods
                .iter()
                .map(|&(_, m)| pre_linear_rows(&row_adapter, li, m, x))
                .collect();
            let group: Vec<(Module, &[f32], usize)> = mods
                .iter()
                .zip(&xs)
                .map(|(&(lin, m), xv)| (m, &xv[..], lin.out_features()))
                .collect();
            let (ys, low_rank) = rayon::join(
                || {
                    mods.iter()
                        .zip(&xs)
                        .map(|((lin, _), xv)| lin.forward_rows_vec(xv, n, decode_rows, kernel))
                        .collect::<candle_core::Result<Vec<_>>>()
                },
                || low_rank_rows(&row_adapter, li, &group),
            );
            let mut ys = ys?;
            for (((y, &(_, m)), xv), low) in ys.iter_mut().zip(mods).zip(&xs).zip(&low_rank) {
                post_linear_rows(&row_adapter, li, m, xv, y, low.as_deref());
            }
            Ok(ys)
        };
        // The block's state after a sublayer with output `h`: `x + h`, or a row's own
        // `after_sublayer` hook.
        let residual = |site: Sublayer, li: usize, x: &mut Vec<f32>, mut h: Vec<f32>| {
            if row_adapter
                .iter()
                .any(|a| a.is_some_and(|a| a.bottleneck(li, site).is_some()))
            {
                after_sublayer_rows(&row_adapter, li, site, &mut h, x);
                *x = h;
            } else {
                ops::add(x, &h);
            }
        };
        let (hidden, kv_dim) = (cfg.hidden_size, cfg.kv_dim());
        let eps = cfg.rms_eps as f32;
        let mut x: Vec<f32> = self.weights.embed.rows(&ids)?;
        for (li, layer) in self.weights.layers.iter().enumerate() {
            let (attn_norm, ffn_norm) = &self.norms[li];
            let h = ops::rms_norm(&x, attn_norm, eps);
            let qkv = [
                (&layer.q, Module::Q),
                (&layer.k, Module::K),
                (&layer.v, Module::V),
            ];
            let [mut q, mut k, v] = outputs(project(&qkv, li, &h)?);
            for (r, place) in rows.iter().enumerate() {
                self.rope
                    .apply(&mut q[r * hidden..(r + 1) * hidden], place.pos);
                self.rope
                    .apply(&mut k[r * kv_dim..(r + 1) * kv_dim], place.pos);
            }
            for (s, c) in chunks.iter().enumerate() {
                let (off, m) = (row_of[s], c.tokens.len());
                pool.write(
                    li,
                    c.cache,
                    c.cache.len(),
                    &k[off * kv_dim..(off + m) * kv_dim],
                    &v[off * kv_dim..(off + m) * kv_dim],
                );
            }
            let tables: Vec<&[u32]> = chunks.iter().map(|c| c.cache.blocks()).collect();
            let a = attend(&q, &rows, &tables, pool.layer(li), self.attn_shape());
            let [o] = outputs(project(&[(&layer.o, Module::O)], li, &a)?);
            residual(Sublayer::Attention, li, &mut x, o);
            let h = ops::rms_norm(&x, ffn_norm, eps);
            let gate_up = [(&layer.gate, Module::Gate), (&layer.up, Module::Up)];
            let [mut g, u] = outputs(project(&gate_up, li, &h)?);
            ops::silu_mul(&mut g, &u);
            let [f] = outputs(project(&[(&layer.down, Module::Down)], li, &g)?);
            residual(Sublayer::Ffn, li, &mut x, f);
        }
        for c in chunks.iter_mut() {
            c.cache.advance(c.tokens.len());
        }
        // Logit rows in chunk order; decode chunks' rows come first among them as well.
        logit_rows.sort_by_key(|&s| (!chunks[s].decode, s));
        let logit_decode = logit_rows.iter().filter(|&&s| chunks[s].decode).count();
        let idx: Vec<u32> = logit_rows
            .iter()
            .map(|&s| (row_of[s] + chunks[s].tokens.len() - 1) as u32)
            .collect();
        let last: Vec<f32> = idx
            .iter()
            .flat_map(|&r| &x[r as usize * hidden..(r as usize + 1) * hidden])
            .copied()
            .collect();
        let states = Tensor::from_vec(
            ops::rms_norm(&last, &self.final_norm, eps),
            (idx.len(), hidden),
            &self.device,
        )?;
        Ok(Some(LastStates {
            states,
            chunks: logit_rows,
            decode: logit_decode,
        }))
    }

    /// Logits `(T, vocab)` for every position of `tokens`, from differentiable ops only.
    pub fn forward_reference(&self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        let t = tokens.len();
        let ids = Tensor::from_slice(tokens, (1, t), &self.device)?;
        let h = self.forward_hidden(&ids, None)?;
        Ok(self
            .weights
            .lm_head
            .forward(&h.reshape((t, self.cfg.hidden_size))?)?)
    }

    /// The plain path's output of one whole sequence with `adapter`: the class logits of its
    /// head on the last position, or the LM head's logits there.
    pub fn output_reference(
        &self,
        tokens: &[u32],
        adapter: &dyn TensorAdapter,
    ) -> Result<Vec<f32>, ModelError> {
        let t = tokens.len();
        let ids = Tensor::from_slice(tokens, (1, t), &self.device)?;
        let h = self.forward_hidden(&ids, Some(adapter))?;
        let last = h.narrow(1, t - 1, 1)?.reshape((1, self.cfg.hidden_size))?;
        let out = match (adapter.head()?, adapter.lm_head()?) {
            (Some(w), _) | (None, Some(w)) => last.matmul(&w.t()?)?,
            (None, None) => self.weights.lm_head.forward(&last)?,
        };
        Ok(out.squeeze(0)?.to_vec1()?)
    }

    /// Final-norm hidden states `(B, T, hidden)` of `ids: (B, T)`, from differentiable ops
    /// only (the plain path and the training forward). Rows attend causally; padding placed
    /// after a row's real tokens therefore never reaches them. `adapter`'s hooks apply as
    /// tensors: `post_linear` beside the frozen weights, virtual input embeddings in front
    /// of the real ones (their states are not returned), a KV prefix in front of every
    /// layer's keys and values (real tokens then start at position P).
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        adapter: Option<&dyn TensorAdapter>,
    ) -> Result<Tensor, ModelError> {
        let (b, t) = ids.dims2()?;
        let hidden = self.cfg.hidden_size;
        let x = self
            .weights
            .embed
            .weight_kept()?
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(DType::F32)?
            .reshape((b, t, hidden))?;
        let prompt = match adapter {
            Some(a) => a.prompt()?,
            None => None,
        };
        let Some(prompt) = prompt else {
            return self.run_layers(x, adapter, None);
        };
        let p = prompt.dim(0)?;
        if prompt.dims() != [p, hidden] {
            return Err(ModelError::Format(format!(
                "virtual embeddings are {:?}; the model needs [P, {hidden}]",
                prompt.dims()
            )));
        }
        let prompt = prompt.unsqueeze(0)?.broadcast_as((b, p, hidden))?;
        let x = Tensor::cat(&[&prompt, &x], 1)?;
        Ok(self.run_layers(x, adapter, None)?.narrow(1, p, t)?)
    }

    /// The keys and values virtual input embeddings `(P, hidden)` leave in every layer at
    /// positions `0..P`: what a prompt-tuned sequence's cache starts with.
    pub fn prefix_from_embeddings(&self, embeddings: &Tensor) -> Result<KvPrefix, ModelError> {
        let (p, hidden) = embeddings.dims2()?;
        if hidden != self.cfg.hidden_size || p == 0 {
            return Err(ModelError::Format(format!(
                "virtual embeddings are [{p}, {hidden}]; the model needs [P >= 1, {}]",
                self.cfg.hidden_size
            )));
        }
        let mut kv = Vec::with_capacity(self.cfg.num_layers);
        let embeddings = embeddings.to_device(&self.device)?;
        self.run_layers(embeddings.unsqueeze(0)?, None, Some(&mut kv))?;
        let kv_dim = self.cfg.kv_dim();
        let flat = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            // (1, kv_heads, P, head_dim) -> (P, kv_dim)
            t.squeeze(0)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((p, kv_dim))?
                .flatten_all()?
                .to_vec1()
        };
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (k, v) in &kv {
            keys.push(flat(k)?);
            values.push(flat(v)?);
        }
        Ok(KvPrefix {
            len: p,
            kv_dim,
            keys,
            values,
        })
    }

    /// The decoder layers and the final norm over input states `x: (B, T, hidden)`.
    /// `capture` receives every layer's rotated keys and values `(B, kv_heads, T, hd)`.
    fn run_layers(
        &self,
        x: Tensor,
        adapter: Option<&dyn TensorAdapter>,
        mut capture: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd, hidden) = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim(),
            cfg.hidden_size,
        );
        let prefix = match adapter {
            Some(a) => a.kv_prefix()?,
            None => None,
        };
        let prefix_len = prefix.as_ref().map_or(Ok(0), |p| p.dim(0))?;
        let kv_dim = cfg.kv_dim();
        if let Some(p) = &prefix {
            if p.dims() != [prefix_len, cfg.num_layers * 2 * kv_dim] {
                return Err(ModelError::Format(format!(
                    "a KV prefix is {:?}; the model needs [P, {}]",
                    p.dims(),
                    cfg.num_layers * 2 * kv_dim
                )));
            }
        }
        let positions = prefix_len + t;
        if t == 0 || positions > cfg.max_position {
            return Err(ModelError::ContextOverflow {
                needed: positions,
                max: cfg.max_position,
            });
        }
        let eps = cfg.rms_eps as f32;
        let dev = &self.device;
        let (cos, sin) = self.rope.tables(positions);
        let cos = Tensor::from_slice(cos, (positions, hd / 2), dev)?.narrow(0, prefix_len, t)?;
        let sin = Tensor::from_slice(sin, (positions, hd / 2), dev)?.narrow(0, prefix_len, t)?;
        let mut x = x.reshape((b * t, hidden))?;
        let proj =
            |lin: &Linear, m: Module, li: usize, x: &Tensor| -> candle_core::Result<Tensor> {
                match adapter.and_then(|a| a.linear(li, m)) {
                    Some(hook) => hook.project(lin, x),
                    None => lin.forward_train(x),
                }
            };
        let residual =
            |site: Sublayer, li: usize, x: Tensor, h: Tensor| -> candle_core::Result<Tensor> {
                match adapter.and_then(|a| a.sublayer(li, site)) {
                    Some(hook) => hook.after_sublayer(&h, &x),
                    None => x + h,
                }
            };
        for (li, layer) in self.weights.layers.iter().enumerate() {
            let h = fused::rms_norm(&x, &layer.attn_norm, eps)?;
            let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
                y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = heads(proj(&layer.q, Module::Q, li, &h)?, nh)?;
            let k = heads(proj(&layer.k, Module::K, li, &h)?, nkv)?;
            let v = heads(proj(&layer.v, Module::V, li, &h)?, nkv)?;
            let q = fused::rope_i(&q, &cos, &sin)?;
            let k = fused::rope_i(&k, &cos, &sin)?;
            if let Some(c) = capture.as_deref_mut() {
                c.push((k.clone(), v.clone()));
            }
            let (k, v) = match &prefix {
                Some(p) => {
                    let pk = p.narrow(1, li * 2 * kv_dim, kv_dim)?;
                    let pv = p.narrow(1, (li * 2 + 1) * kv_dim, kv_dim)?;
                    // (P, kv_dim) -> (B, kv_heads, P, hd), in front of the real tokens'.
                    let lay = |p: Tensor| -> candle_core::Result<Tensor> {
                        p.contiguous()?
                            .reshape((prefix_len, nkv, hd))?
                            .transpose(0, 1)?
                            .unsqueeze(0)?
                            .broadcast_as((b, nkv, prefix_len, hd))?
                            .contiguous()
                    };
                    (
                        Tensor::cat(&[&lay(pk)?, &k], 2)?,
                        Tensor::cat(&[&lay(pv)?, &v], 2)?,
                    )
                }
                None => (k, v),
            };
            let rep = nh / nkv;
            let repeat = |y: Tensor| -> candle_core::Result<Tensor> {
                if rep == 1 {
                    return Ok(y);
                }
                y.unsqueeze(2)?
                    .expand((b, nkv, rep, positions, hd))?
                    .reshape((b, nh, positions, hd))
            };
            let (k, v) = (repeat(k)?, repeat(v)?);
            // Query i (at position prefix_len + i) sees keys 0..=prefix_len + i.
            let att =
                fused::causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (hd as f64).sqrt(), prefix_len)?;
            let y = att
                .matmul(&v.contiguous()?)?
                .transpose(1, 2)?
                .reshape((b * t, nh * hd))?;
            x = residual(
                Sublayer::Attention,
                li,
                x,
                proj(&layer.o, Module::O, li, &y)?,
            )?;
            let h = fused::rms_norm(&x, &layer.ffn_norm, eps)?;
            let g = proj(&layer.gate, Module::Gate, li, &h)?;
            let u = proj(&layer.up, Module::Up, li, &h)?;
            let f = proj(&layer.down, Module::Down, li, &fused::swiglu(&g, &u)?)?;
            x = residual(Sublayer::Ffn, li, x, f)?;
        }
        let x = fused::rms_norm(&x, &self.weights.final_norm, eps)?;
        Ok(x.reshape((b, t, hidden))?)
    }
}
