//! A KV cache of token prefixes shared across generation calls: every exp12 episode prompt starts
//! with the same chat header and instruction block, and CAA's training prompts share theirs.
//!
//! Blocks of [`BLOCK`] tokens are keyed by a hash chained over every token up to the block's end
//! (as vLLM's automatic prefix caching does), so a block is reused only after the very same
//! prefix; each block keeps its own tokens and its parent's key, checked on lookup, so a hash
//! collision cannot serve another prefix. Least recently used blocks are evicted past a byte
//! bound. Only unhooked prefixes are cached: the callers use it with the `last` selector, where
//! every position but the last is the same with and without steering.
//!
//! A cached prefix gives bit-identical results to prefilling it: keys and values of a position
//! depend only on the tokens up to it, and the CPU kernels are batch invariant
//! (docs/determinism.md), so a block prefilled in one call is the block another call would
//! compute. Tensors are reference counted, so evicting a block a state still uses is harmless.
use super::decoder::{Decoder, State};
use super::hooks::StepInfo;
use anyhow::Result;
use candle_core::Tensor;
use std::collections::HashMap;

/// Tokens per block.
pub const BLOCK: usize = 16;

/// The default bound (`--prefix-cache-mb`): 256 MiB holds about 10,000 tokens of
/// qwen-coder-0.5b's keys and values (24 KiB a token in f32), dozens of distinct episode prefixes.
pub const DEFAULT_MB: usize = 256;

struct Block {
    parent: u64,
    /// The adapter the prefix was computed under (`--adapter`'s id), checked on the first block
    /// of a lookup: the blocks after it are reached through its key, so they inherit the check.
    origin: Option<String>,
    /// Index of the block in its prefix (0 = the first `BLOCK` tokens).
    depth: usize,
    tokens: [u32; BLOCK],
    /// Per layer `(k, v)`, each `[1, kv_heads, BLOCK, head_dim]`.
    kv: Vec<(Tensor, Tensor)>,
    bytes: usize,
    last_used: u64,
}

/// Counters for the benchmarks and the end-of-run log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Prompt-prefix tokens served from the cache.
    pub hit_tokens: u64,
    /// Prompt-prefix tokens that had to be computed.
    pub computed_tokens: u64,
    pub evicted_blocks: u64,
    pub blocks: usize,
    pub bytes: usize,
}

pub struct PrefixCache {
    limit_bytes: usize,
    bytes: usize,
    blocks: HashMap<u64, Block>,
    tick: u64,
    stats: CacheStats,
}

const ROOT: u64 = 0xcbf29ce484222325;

fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = parent;
    for &t in tokens {
        h = (h ^ t as u64).wrapping_mul(0x100000001b3);
    }
    // A final mix, so that keys of neighbouring prefixes spread over the table.
    h ^ (h >> 29)
}

impl PrefixCache {
    /// A cache holding at most `limit_mb` MiB of keys and values (0 disables it).
    pub fn new(limit_mb: usize) -> Self {
        Self { limit_bytes: limit_mb << 20, bytes: 0, blocks: HashMap::new(), tick: 0, stats: CacheStats::default() }
    }

    pub fn enabled(&self) -> bool {
        self.limit_bytes > 0
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats { blocks: self.blocks.len(), bytes: self.bytes, ..self.stats }
    }

    /// The blocks of the longest cached prefix of `tokens` under `root` (computed under
    /// `origin`), marked as used.
    fn longest(&mut self, root: u64, origin: Option<&str>, tokens: &[u32]) -> Vec<u64> {
        self.tick += 1;
        let mut keys = Vec::new();
        let mut parent = root;
        for chunk in tokens.chunks_exact(BLOCK) {
            let key = chain(parent, chunk);
            match self.blocks.get_mut(&key) {
                Some(b)
                    if b.parent == parent && b.tokens == chunk && (b.depth > 0 || b.origin.as_deref() == origin) =>
                {
                    b.last_used = self.tick;
                    keys.push(key);
                    parent = key;
                }
                _ => break,
            }
        }
        keys
    }

    /// Stores the full blocks of `tokens` that `state` (batch 1, no padding, holding exactly
    /// `tokens`) has and the cache lacks, then evicts down to the bound.
    fn insert(&mut self, root: u64, origin: Option<&str>, tokens: &[u32], state: &State) -> Result<()> {
        let mut parent = root;
        for (j, chunk) in tokens.chunks_exact(BLOCK).enumerate() {
            let key = chain(parent, chunk);
            if !self.blocks.contains_key(&key) {
                let mut kv = Vec::with_capacity(state.kv.len());
                let mut bytes = 0;
                for e in &state.kv {
                    let (k, v) = e.as_ref().expect("a prefilled state has every layer's cache");
                    let (k, v) =
                        (k.narrow(2, j * BLOCK, BLOCK)?.contiguous()?, v.narrow(2, j * BLOCK, BLOCK)?.contiguous()?);
                    bytes += (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes();
                    kv.push((k, v));
                }
                let tokens: [u32; BLOCK] = chunk.try_into().expect("chunks_exact");
                self.bytes += bytes;
                let origin = origin.map(String::from);
                self.blocks.insert(key, Block { parent, origin, depth: j, tokens, kv, bytes, last_used: self.tick });
            }
            parent = key;
        }
        while self.bytes > self.limit_bytes {
            // Least recently used first and, among blocks used together, the deepest: a block is
            // only reachable through its parents, so they go last. A linear scan: the cache
            // holds a few thousand blocks at most and eviction is rare.
            let Some((&old, _)) = self.blocks.iter().min_by_key(|(_, b)| (b.last_used, std::cmp::Reverse(b.depth)))
            else {
                break;
            };
            let b = self.blocks.remove(&old).expect("just found");
            self.bytes -= b.bytes;
            self.stats.evicted_blocks += 1;
        }
        Ok(())
    }
}

/// A batch-1, unpadded, unhooked state holding the keys and values of all of `tokens`: the
/// longest cached prefix (whole blocks) is copied from `cache`, the rest is prefilled, and the
/// new full blocks are stored.
pub fn prefill_prefix(model: &Decoder, tokens: &[u32], cache: Option<&mut PrefixCache>) -> Result<State> {
    let mut state = model.new_state(vec![0]);
    // Over pipeline stages the keys and values live on the stages: nothing to keep here.
    let mut cache = cache.filter(|c| c.enabled() && model.pipeline().is_none());
    // The state's adapter (`--adapter`) changes every key and value: its own chains.
    // (A separator no tokenizer produces, then the adapter's id.)
    let origin = model.prefix_root();
    let root = match origin {
        Some(adapter) => {
            chain(ROOT, &std::iter::once(u32::MAX).chain(adapter.bytes().map(u32::from)).collect::<Vec<_>>())
        }
        None => ROOT,
    };
    let keys = cache.as_deref_mut().map(|c| c.longest(root, origin, tokens)).unwrap_or_default();
    let hit = keys.len() * BLOCK;
    if let (Some(c), false) = (cache.as_deref(), keys.is_empty()) {
        for (layer, e) in state.kv.iter_mut().enumerate() {
            let ks: Vec<&Tensor> = keys.iter().map(|k| &c.blocks[k].kv[layer].0).collect();
            let vs: Vec<&Tensor> = keys.iter().map(|k| &c.blocks[k].kv[layer].1).collect();
            *e = Some((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?));
        }
        state.cols = hit;
    }
    if hit < tokens.len() {
        let ids = Tensor::from_vec(tokens[hit..].to_vec(), (1, tokens.len() - hit), model.device())?;
        model.extend_cache(&ids, &mut state, &StepInfo::prefill(vec![0]))?;
    }
    if let Some(c) = cache {
        c.stats.hit_tokens += hit as u64;
        c.stats.computed_tokens += (tokens.len() - hit) as u64;
        c.insert(root, origin, tokens, &state)?;
    }
    Ok(state)
}
