//! RoPE and causal attention over paged per-sequence KV caches, on plain f32 slices.
//! This is the serving kernel: rows of many sequences (a decode token each, or a prefill
//! chunk) arrive together; each row attends only to its own sequence's cache.
//! Invariant: one row's result depends only on that row and its own cache, never on what
//! else is in the batch (batch-invariant by construction).

use half::{f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use super::kv_cache::{KvLayer, BLOCK_TOKENS};

/// Precomputed RoPE angles (interleaved-pair convention, as GGUF Llama uses).
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeTable {
    pub fn new(head_dim: usize, max_pos: usize, theta: f32) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self { cos, sin, half }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// `(cos, sin)` rows for positions `0..n`, shaped `(n, head_dim/2)`, for tensor code.
    pub fn tables(&self, n: usize) -> (&[f32], &[f32]) {
        (&self.cos[..n * self.half], &self.sin[..n * self.half])
    }

    /// Rotates every head of one row in place.
    pub fn apply(&self, row: &mut [f32], pos: usize) {
        let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
        let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
        for head in row.chunks_exact_mut(2 * self.half) {
            for i in 0..self.half {
                let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = x0 * cos[i] - x1 * sin[i];
                head[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// Shape of the attention problem.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Where one row of the batch belongs: its cache (by index) and its absolute position.
#[derive(Debug, Clone, Copy)]
pub struct RowPlace {
    pub seq: usize,
    pub pos: usize,
}

/// Causal attention for every row. `tables[s]` is sequence `s`'s block table into the
/// layer's key and value slabs (`[block][slot][kv_dim]`), already holding the rows of this
/// step. Returns `(rows, num_heads*head_dim)`.
pub(crate) fn attend(
    q: &[f32],
    rows: &[RowPlace],
    tables: &[&[u32]],
    kv: KvLayer<'_>,
    shape: AttnShape,
) -> Vec<f32> {
    match kv {
        KvLayer::F32(keys, values) => attend_in(q, rows, tables, keys, values, shape),
        KvLayer::F16(keys, values) => attend_in(q, rows, tables, keys, values, shape),
    }
}

/// A cached element type: each cached head is widened to f32 before it is used, so an f16
/// cache computes exactly what an f32 cache holding the same (rounded) values would.
trait Cached: Copy + Send + Sync {
    /// `xs` as f32: borrowed where it already is, else converted into `buf`.
    fn widen<'a>(xs: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl Cached for f32 {
    fn widen<'a>(xs: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        xs
    }
}

impl Cached for f16 {
    fn widen<'a>(xs: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        // F16C's vcvtph2ps where the build targets it (x86-64-v3 does), 8 lanes at a time.
        xs.convert_to_f32_slice(buf);
        buf
    }
}

fn attend_in<T: Cached>(
    q: &[f32],
    rows: &[RowPlace],
    tables: &[&[u32]],
    keys: &[T],
    values: &[T],
    shape: AttnShape,
) -> Vec<f32> {
    let AttnShape {
        num_heads,
        num_kv_heads,
        head_dim,
    } = shape;
    let hidden = num_heads * head_dim;
    let kv_dim = num_kv_heads * head_dim;
    let group = num_heads / num_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let at = |table: &[u32], p: usize, kvh: usize| {
        let b = table[p / BLOCK_TOKENS] as usize;
        (b * BLOCK_TOKENS + p % BLOCK_TOKENS) * kv_dim + kvh * head_dim
    };
    let mut out = vec![0f32; rows.len() * hidden];
    // One unit of work per (row, head), or with a few rows or more per (row, KV head): the
    // heads sharing a cached head then widen and read each of its keys and values once
    // instead of once each. A single decode row still spreads its heads over the pool.
    // Every head's arithmetic is the same, in the same order, either way, and every unit
    // reads only its own row's query and cache.
    let unit = heads_per_unit(rows.len(), group);
    let units_per_row = num_heads / unit;
    out.par_chunks_mut(unit * head_dim)
        .zip(q.par_chunks(unit * head_dim))
        .enumerate()
        .for_each_init(
            || (Vec::new(), vec![0f32; head_dim], Vec::new()),
            |(scores, buf, max), (u, (oh, qh))| {
                let place = &rows[u / units_per_row];
                let kvh = (u % units_per_row) * unit / group;
                let table = tables[place.seq];
                let n = place.pos + 1;
                scores.clear();
                scores.resize(unit * n, 0f32);
                max.clear();
                max.resize(unit, f32::NEG_INFINITY);
                for p in 0..n {
                    let o = at(table, p, kvh);
                    let k = T::widen(&keys[o..o + head_dim], buf);
                    for (i, qi) in qh.chunks_exact(head_dim).enumerate() {
                        let s = dot(qi, k) * scale;
                        max[i] = max[i].max(s);
                        scores[i * n + p] = s;
                    }
                }
                for (head, &m) in scores.chunks_exact_mut(n).zip(max.iter()) {
                    let mut sum = 0f32;
                    for s in head.iter_mut() {
                        *s = (*s - m).exp();
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    head.iter_mut().for_each(|s| *s *= inv);
                }
                for p in 0..n {
                    let o = at(table, p, kvh);
                    let v = T::widen(&values[o..o + head_dim], buf);
                    for (i, oi) in oh.chunks_exact_mut(head_dim).enumerate() {
                        let w = scores[i * n + p];
                        for (o, x) in oi.iter_mut().zip(v) {
                            *o += w * x;
                        }
                    }
                }
            },
        );
    out
}

/// How many query heads one unit of attention work takes: a KV head's whole group from 4
/// rows up, else one (so a single decode row still spreads over the pool).
fn heads_per_unit(rows: usize, group: usize) -> usize {
    if rows >= 4 {
        group
    } else {
        1
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators, one per lane: the compiler vectorises this without
    // reassociating (exact chunks, so no bounds checks in the loop).
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv_cache::{KvCache, KvDtype, KvPool, KvShape};

    /// Two sequences (one prefilling 5 rows, one decoding after 20 cached positions) over
    /// a pool of `dtype`, keys and values from `kv(position, index)`.
    fn run(dtype: KvDtype, kv: impl Fn(usize, usize) -> f32) -> Vec<f32> {
        run_rows(dtype, kv, None)
    }

    /// [`run`]'s rows, or only row `pick` of them (the others' caches still there).
    fn run_rows(dtype: KvDtype, kv: impl Fn(usize, usize) -> f32, pick: Option<usize>) -> Vec<f32> {
        let shape = AttnShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
        };
        let kv_dim = 16;
        let mut pool = KvPool::new(
            KvShape {
                num_layers: 1,
                kv_dim,
                dtype,
            },
            8,
        )
        .expect("pool");
        let lens = [5usize, 21];
        let mut caches = [KvCache::new(), KvCache::new()];
        for (c, &n) in caches.iter_mut().zip(&lens) {
            pool.grow(c, n).expect("room");
            let k: Vec<f32> = (0..n * kv_dim).map(|i| kv(i / kv_dim, i)).collect();
            let v: Vec<f32> = (0..n * kv_dim).map(|i| -kv(i / kv_dim, i + 7)).collect();
            pool.write(0, c, 0, &k, &v);
        }
        let rows: Vec<RowPlace> = (0..5)
            .map(|pos| RowPlace { seq: 0, pos })
            .chain([RowPlace { seq: 1, pos: 20 }])
            .collect();
        let q: Vec<f32> = (0..rows.len() * 32)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let tables: Vec<&[u32]> = caches.iter().map(|c| c.blocks()).collect();
        match pick {
            None => attend(&q, &rows, &tables, pool.layer(0), shape),
            Some(i) => attend(
                &q[i * 32..][..32],
                &rows[i..=i],
                &tables,
                pool.layer(0),
                shape,
            ),
        }
    }

    /// Six rows share each cached head among its query heads' work; one row alone splits
    /// the work per query head. Each row's output is the same, bit for bit.
    #[test]
    fn a_row_alone_and_among_others_attends_the_same() {
        // The two ways of splitting the work are the ones compared (`run_rows`' 4 query
        // heads share 2 KV heads).
        assert_eq!((heads_per_unit(6, 2), heads_per_unit(1, 2)), (2, 1));
        let x = |p: usize, i: usize| ((p * 131 + i * 17) % 97) as f32 / 48.5 - 1.0;
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let all = run_rows(dtype, x, None);
            for i in 0..6 {
                let alone = run_rows(dtype, x, Some(i));
                let bits = |v: &[f32]| v.iter().map(|y| y.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&alone),
                    bits(&all[i * 32..][..32]),
                    "{dtype:?} row {i}"
                );
            }
        }
    }

    #[test]
    fn an_f16_cache_computes_exactly_what_an_f32_cache_of_the_rounded_values_does() {
        let x = |p: usize, i: usize| ((p * 131 + i * 17) % 97) as f32 / 48.5 - 1.0 + 1e-4;
        let rounded = |p: usize, i: usize| f16::from_f32(x(p, i)).to_f32();
        let half = run(KvDtype::F16, x);
        let bits = |v: &[f32]| v.iter().map(|y| y.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&half), bits(&run(KvDtype::F32, rounded)));
        // And the rounding did change something.
        assert_ne!(bits(&half), bits(&run(KvDtype::F32, x)));
    }
}
