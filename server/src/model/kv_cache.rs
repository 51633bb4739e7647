//! Per-sequence key/value cache. Owned by the sequence (never by the model), so any number
//! of sequences decode against one frozen model at once.
//! Layout per layer: `[position][kv_head][head_dim]`, f32, keys stored after RoPE.

/// The keys and values one sequence has produced so far, for every layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    pub(crate) len: usize,
    kv_dim: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_dim: usize) -> Self {
        Self {
            k: vec![Vec::new(); num_layers],
            v: vec![Vec::new(); num_layers],
            len: 0,
            kv_dim,
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held, for accounting.
    pub fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(self.v.iter())
            .map(|l| l.capacity() * 4)
            .sum()
    }

    /// Appends `rows` positions of keys and values to layer `layer`.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        debug_assert_eq!(k.len() % self.kv_dim, 0);
        self.k[layer].extend_from_slice(k);
        self.v[layer].extend_from_slice(v);
    }

    /// Marks `n` more positions as cached (after every layer has appended them).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
