//! Paged key/value memory: one pool of fixed-size blocks for every sequence, and each
//! sequence's block table ([`KvCache`]).
//!
//! - Storage per layer is one slab `[block][slot][kv_head][head_dim]` (keys after RoPE), in
//!   f32 or f16 ([`KvDtype`]), sized once from a byte budget; pages are touched only as
//!   blocks are used.
//! - A [`KvCache`] is a block table plus a length: position `p` lives in block
//!   `blocks[p / block_tokens]`, slot `p % block_tokens`.
//! - Blocks are reference-counted. A *full* block of prompt tokens can be published under a
//!   [`BlockHash`] that chains a salt (the caller's isolation key: tenant and adapter version
//!   content hash) with the token ids of the block and of every block before it; a later
//!   sequence whose prompt starts the same way, under the same salt, takes those blocks
//!   instead of recomputing them (prefix sharing).
//! - Unreferenced published blocks stay cached and are evicted least-recently-used first
//!   when a block is needed; unreferenced unpublished blocks are simply free.
//!
//! Invariants: a block is written only by the one sequence that holds it unpublished (a
//! published block is full and never written again); `available()` blocks can always be
//! handed out (free ones plus cached ones nobody references); memory never grows past the
//! pool's size.

use std::collections::{BTreeMap, HashMap};

use half::{
    f16,
    slice::{HalfBitsSliceExt, HalfFloatSliceExt},
};
use sha2::{Digest, Sha256};

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

/// Identity of a full block's contents: see the module comment.
pub type BlockHash = [u8; 32];

/// The pool could not hand out the blocks asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KV cache exhausted: {needed} more blocks needed, {available} available of {total}")]
pub struct KvExhausted {
    pub needed: usize,
    pub available: usize,
    pub total: usize,
}

/// One sequence's block table.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    blocks: Vec<u32>,
    len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held (shared or not).
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Marks `n` more positions as cached (after every layer has written them).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.blocks.len() * BLOCK_TOKENS);
    }
}

/// How cached keys and values are stored. f32 keeps exactly what the layer computed (the
/// reference: a served row's logits equal the plain forward's); f16 halves the bytes every
/// decode step reads and the memory a token holds, as llama.cpp's default cache does, at
/// the cost of rounding each cached value to f16 (11 significant bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => Err(format!(
                "unknown KV cache dtype {other:?} (expected f32 or f16)"
            )),
        }
    }
}

/// The shape of the per-token KV state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub num_layers: usize,
    /// `num_kv_heads * head_dim`.
    pub kv_dim: usize,
    pub dtype: KvDtype,
}

impl KvShape {
    /// The same shape stored as `dtype`.
    pub fn with_dtype(self, dtype: KvDtype) -> Self {
        Self { dtype, ..self }
    }

    /// Bytes of keys and values one token holds in every layer.
    pub fn bytes_per_token(&self) -> usize {
        self.num_layers * 2 * self.kv_dim * self.dtype.bytes()
    }

    pub fn bytes_per_block(&self) -> usize {
        self.bytes_per_token() * BLOCK_TOKENS
    }
}

/// Blocks needed to hold `tokens` positions.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

/// The chained hashes of every full block of `tokens` under `salt`.
pub fn block_hashes(salt: &[u8], tokens: &[u32]) -> Vec<BlockHash> {
    let mut prev: BlockHash = Sha256::digest(salt).into();
    tokens
        .chunks_exact(BLOCK_TOKENS)
        .map(|block| {
            let mut h = Sha256::new();
            h.update(prev);
            for t in block {
                h.update(t.to_le_bytes());
            }
            prev = h.finalize().into();
            prev
        })
        .collect()
}

/// `len` zeroed elements in an anonymous mapping of their own: the system maps a page when
/// it is first written, whatever the allocator has done before. (`vec![0; n]` is lazy only
/// while glibc serves it by a fresh `mmap`; after large frees it hands out heap memory and
/// zeroes every page up front.)
struct Slab<T> {
    map: memmap2::MmapMut,
    _t: std::marker::PhantomData<T>,
}

impl<T: bytemuck::Pod> Slab<T> {
    fn zeroed(len: usize) -> std::io::Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .filter(|&b| b > 0)
            .ok_or_else(|| std::io::Error::other(format!("no KV slab of {len} elements")))?;
        Ok(Self {
            map: memmap2::MmapMut::map_anon(bytes)?,
            _t: std::marker::PhantomData,
        })
    }

    fn get(&self) -> &[T] {
        bytemuck::cast_slice(&self.map)
    }

    fn get_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.map)
    }
}

impl<T> std::fmt::Debug for Slab<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slab({} bytes)", self.map.len())
    }
}

/// One layer's keys and values for every block, in the pool's dtype (f16 as its bits).
#[derive(Debug)]
enum Slabs {
    F32 { k: Slab<f32>, v: Slab<f32> },
    F16 { k: Slab<u16>, v: Slab<u16> },
}

impl Slabs {
    fn zeroed(dtype: KvDtype, len: usize) -> std::io::Result<Self> {
        Ok(match dtype {
            KvDtype::F32 => Self::F32 {
                k: Slab::zeroed(len)?,
                v: Slab::zeroed(len)?,
            },
            KvDtype::F16 => Self::F16 {
                k: Slab::zeroed(len)?,
                v: Slab::zeroed(len)?,
            },
        })
    }

    /// Stores one position's key and value at `at`, rounded to the dtype.
    fn store(&mut self, at: usize, key: &[f32], value: &[f32]) {
        let n = key.len();
        match self {
            Self::F32 { k, v } => {
                k.get_mut()[at..at + n].copy_from_slice(key);
                v.get_mut()[at..at + n].copy_from_slice(value);
            }
            Self::F16 { k, v } => {
                k.get_mut()[at..at + n]
                    .reinterpret_cast_mut::<f16>()
                    .convert_from_f32_slice(key);
                v.get_mut()[at..at + n]
                    .reinterpret_cast_mut::<f16>()
                    .convert_from_f32_slice(value);
            }
        }
    }
}

/// One layer's keys and values (`[block][slot][kv_dim]` each), as attention reads them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KvLayer<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [f16], &'a [f16]),
}

/// The block pool: storage, reference counts, the published-block index and its LRU.
#[derive(Debug)]
pub struct KvPool {
    shape: KvShape,
    num_blocks: usize,
    layers: Vec<Slabs>,
    refs: Vec<u32>,
    hash_of: Vec<Option<BlockHash>>,
    published: HashMap<BlockHash, u32>,
    /// Unreferenced, unpublished.
    free: Vec<u32>,
    /// Unreferenced, published: by last use (oldest first).
    lru: BTreeMap<u64, u32>,
    last_use: Vec<u64>,
    tick: u64,
}

impl KvPool {
    /// A pool of `num_blocks` blocks (at least one). Fails where the system cannot map
    /// that much memory.
    pub fn new(shape: KvShape, num_blocks: usize) -> std::io::Result<Self> {
        let num_blocks = num_blocks.max(1);
        let slab = num_blocks.saturating_mul(BLOCK_TOKENS * shape.kv_dim);
        Ok(Self {
            shape,
            num_blocks,
            layers: (0..shape.num_layers)
                .map(|_| Slabs::zeroed(shape.dtype, slab))
                .collect::<std::io::Result<_>>()?,
            refs: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            published: HashMap::new(),
            free: (0..num_blocks as u32).rev().collect(),
            lru: BTreeMap::new(),
            last_use: vec![0; num_blocks],
            tick: 0,
        })
    }

    /// As many blocks as fit in `bytes`.
    pub fn with_budget(shape: KvShape, bytes: usize) -> std::io::Result<Self> {
        Self::new(shape, bytes / shape.bytes_per_block().max(1))
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Positions the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * BLOCK_TOKENS
    }

    /// Blocks that can be handed out now (free plus evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn in_use(&self) -> usize {
        self.num_blocks - self.available()
    }

    /// Published blocks (referenced or not).
    pub fn published(&self) -> usize {
        self.published.len()
    }

    fn touch(&mut self, b: u32) {
        self.tick += 1;
        self.last_use[b as usize] = self.tick;
    }

    fn take(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.lru.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.published.remove(&h);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        self.touch(b);
        Some(b)
    }

    fn unref(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0);
        *r -= 1;
        if *r == 0 {
            if self.hash_of[b as usize].is_some() {
                self.lru.insert(self.last_use[b as usize], b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Makes `cache` hold enough blocks for `tokens` positions: all or nothing.
    pub fn grow(&mut self, cache: &mut KvCache, tokens: usize) -> Result<(), KvExhausted> {
        let needed = blocks_for(tokens).saturating_sub(cache.blocks.len());
        if needed > self.available() {
            return Err(KvExhausted {
                needed,
                available: self.available(),
                total: self.num_blocks,
            });
        }
        for _ in 0..needed {
            let b = self.take().expect("counted as available");
            cache.blocks.push(b);
        }
        Ok(())
    }

    /// Gives every block of `cache` back and empties it.
    pub fn release(&mut self, cache: &mut KvCache) {
        for b in std::mem::take(&mut cache.blocks) {
            self.unref(b);
        }
        cache.len = 0;
    }

    /// A new cache holding the longest run of published blocks that `hashes` (a prompt's
    /// [`block_hashes`], in order) names, at most `max_blocks` of them.
    pub fn lookup(&mut self, hashes: &[BlockHash], max_blocks: usize) -> KvCache {
        let mut cache = KvCache::new();
        for h in hashes.iter().take(max_blocks) {
            let Some(&b) = self.published.get(h) else {
                break;
            };
            if self.refs[b as usize] == 0 {
                self.lru.remove(&self.last_use[b as usize]);
            }
            self.refs[b as usize] += 1;
            self.touch(b);
            cache.blocks.push(b);
        }
        cache.len = cache.blocks.len() * BLOCK_TOKENS;
        cache
    }

    /// Publishes block `index` of `cache` (which must be full) under `hash`, unless a block
    /// with that hash is published already.
    pub fn publish(&mut self, cache: &KvCache, index: usize, hash: BlockHash) {
        debug_assert!((index + 1) * BLOCK_TOKENS <= cache.len);
        let b = cache.blocks[index];
        if self.hash_of[b as usize].is_some() || self.published.contains_key(&hash) {
            return;
        }
        self.hash_of[b as usize] = Some(hash);
        self.published.insert(hash, b);
    }

    fn offset(&self, cache: &KvCache, pos: usize) -> usize {
        let b = cache.blocks[pos / BLOCK_TOKENS] as usize;
        (b * BLOCK_TOKENS + pos % BLOCK_TOKENS) * self.shape.kv_dim
    }

    /// Writes `rows` consecutive positions of layer `layer` starting at `start`.
    pub(crate) fn write(
        &mut self,
        layer: usize,
        cache: &KvCache,
        start: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let d = self.shape.kv_dim;
        for (i, (kr, vr)) in k.chunks_exact(d).zip(v.chunks_exact(d)).enumerate() {
            let pos = start + i;
            debug_assert!(self.refs[cache.blocks[pos / BLOCK_TOKENS] as usize] > 0);
            let o = self.offset(cache, pos);
            self.layers[layer].store(o, kr, vr);
        }
    }

    /// Fills positions `cache.len()..prefix.len` of `cache` (whose blocks must cover them,
    /// [`Self::grow`]) with an adapter's KV prefix, so the sequence's real tokens start at
    /// position `prefix.len`. Positions already there (blocks shared from the prefix cache)
    /// are left as they are.
    pub fn seed_prefix(&mut self, cache: &mut KvCache, prefix: &super::KvPrefix) {
        let (from, d) = (cache.len, self.shape.kv_dim);
        if from >= prefix.len {
            return;
        }
        debug_assert_eq!(prefix.kv_dim, d);
        for (layer, (k, v)) in prefix.keys.iter().zip(&prefix.values).enumerate() {
            self.write(
                layer,
                cache,
                from,
                &k[from * d..prefix.len * d],
                &v[from * d..prefix.len * d],
            );
        }
        cache.len = prefix.len;
    }

    /// Layer `layer`'s key and value slabs, for attention through block tables.
    pub(crate) fn layer(&self, layer: usize) -> KvLayer<'_> {
        match &self.layers[layer] {
            Slabs::F32 { k, v } => KvLayer::F32(k.get(), v.get()),
            Slabs::F16 { k, v } => {
                KvLayer::F16(k.get().reinterpret_cast(), v.get().reinterpret_cast())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape {
        num_layers: 2,
        kv_dim: 4,
        dtype: KvDtype::F32,
    };

    #[test]
    fn grow_is_all_or_nothing_and_release_frees() {
        let mut pool = KvPool::new(SHAPE, 4).expect("pool");
        let mut a = KvCache::new();
        pool.grow(&mut a, 40).expect("ok"); // 3 blocks
        assert_eq!(pool.available(), 1);
        let mut b = KvCache::new();
        let err = pool.grow(&mut b, 33).expect_err("fails");
        assert_eq!((err.needed, err.available, err.total), (3, 1, 4));
        assert!(b.blocks().is_empty());
        pool.release(&mut a);
        assert_eq!(pool.available(), 4);
        pool.grow(&mut b, 64).expect("ok");
        assert_eq!(pool.available(), 0);
    }

    #[test]
    fn hashes_chain_over_the_salt_and_every_earlier_block() {
        let t: Vec<u32> = (0..40).collect();
        let h = block_hashes(b"tenant-a/base", &t);
        assert_eq!(h.len(), 2, "only full blocks");
        assert_ne!(h, block_hashes(b"tenant-b/base", &t), "salt matters");
        let mut t2 = t.clone();
        t2[0] = 99;
        let h2 = block_hashes(b"tenant-a/base", &t2);
        assert_ne!(
            h[1], h2[1],
            "a later block's hash depends on the earlier ones"
        );
        assert_eq!(h, block_hashes(b"tenant-a/base", &t[..32]));
    }

    #[test]
    fn published_blocks_are_shared_then_cached_then_evicted_lru() {
        let mut pool = KvPool::new(SHAPE, 3).expect("pool");
        let t: Vec<u32> = (0..32).collect();
        let hs = block_hashes(b"s", &t);
        let mut a = KvCache::new();
        pool.grow(&mut a, 32).expect("ok");
        a.advance(32);
        pool.publish(&a, 0, hs[0]);
        pool.publish(&a, 1, hs[1]);
        let mut b = pool.lookup(&hs, 1);
        assert_eq!(b.len(), 16);
        assert_eq!(b.blocks()[0], a.blocks()[0], "the same block, not a copy");
        assert_eq!(pool.available(), 1);
        pool.release(&mut a);
        // Block 0 is still held by `b`; block 1 is cached but evictable.
        assert_eq!(pool.available(), 2);
        assert_eq!(pool.published(), 2);
        let mut c = KvCache::new();
        pool.grow(&mut c, 32).expect("ok"); // takes the free block, then evicts block 1
        assert_eq!(pool.published(), 1);
        assert_eq!(pool.lookup(&hs, 2).len(), 16, "block 0 still published");
        pool.release(&mut b);
        pool.release(&mut c);
    }

    #[test]
    fn writes_land_in_the_tables_blocks() {
        let mut pool = KvPool::new(SHAPE, 4).expect("pool");
        let mut a = KvCache::new();
        let mut b = KvCache::new();
        pool.grow(&mut b, 1).expect("ok");
        pool.grow(&mut a, 20).expect("ok");
        let k: Vec<f32> = (0..20 * 4).map(|x| x as f32).collect();
        pool.write(1, &a, 0, &k, &k);
        let KvLayer::F32(ks, _) = pool.layer(1) else {
            panic!("an f32 pool")
        };
        let o = pool.offset(&a, 17);
        assert_eq!(&ks[o..o + 4], &k[17 * 4..18 * 4]);
        let KvLayer::F32(other, _) = pool.layer(0) else {
            panic!("an f32 pool")
        };
        assert_eq!(other[o], 0.0, "other layers untouched");
    }

    /// This process's resident memory (`/proc/self/statm`, pages of 4 KiB).
    fn rss_bytes() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
        let pages: usize = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("resident pages");
        pages * 4096
    }

    #[test]
    fn a_pool_costs_memory_only_as_its_blocks_are_written() {
        let shape = KvShape {
            num_layers: 30,
            kv_dim: 192,
            dtype: KvDtype::F32,
        };
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let before = rss_bytes();
            let mut pool = KvPool::with_budget(shape.with_dtype(dtype), 1 << 30).expect("pool");
            let mut a = KvCache::new();
            pool.grow(&mut a, 16).expect("ok");
            let row = vec![1f32; 16 * 192];
            for layer in 0..30 {
                pool.write(layer, &a, 0, &row, &row);
            }
            let grown = rss_bytes().saturating_sub(before);
            // One block written (~1.4 MiB as f32) of a 1 GiB pool; other tests of this
            // binary run beside it, hence the margin.
            assert!(
                grown < 128 << 20,
                "{dtype:?}: a 1 GiB pool made {} MiB resident",
                grown >> 20
            );
        }
    }

    #[test]
    fn an_f16_pool_stores_each_value_rounded_and_holds_twice_the_tokens() {
        let half = SHAPE.with_dtype(KvDtype::F16);
        assert_eq!(half.bytes_per_token() * 2, SHAPE.bytes_per_token());
        let budget = SHAPE.bytes_per_block() * 4;
        let full = KvPool::with_budget(SHAPE, budget).expect("pool");
        assert_eq!(full.num_blocks(), 4);
        let mut pool = KvPool::with_budget(half, budget).expect("pool");
        assert_eq!(pool.num_blocks(), 8);
        let mut a = KvCache::new();
        pool.grow(&mut a, 3).expect("ok");
        let k: Vec<f32> = (0..12).map(|x| 1.0 / (x as f32 + 3.0)).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        pool.write(0, &a, 0, &k, &v);
        let KvLayer::F16(ks, vs) = pool.layer(0) else {
            panic!("an f16 pool")
        };
        let o = pool.offset(&a, 2);
        for i in 0..4 {
            let want = f16::from_f32(k[8 + i]);
            assert_eq!(ks[o + i], want);
            assert_eq!(vs[o + i], -want);
            assert_ne!(want.to_f32(), k[8 + i], "1/11..1/14 are not exact in f16");
        }
    }
}
