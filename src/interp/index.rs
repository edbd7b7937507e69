//! The contextual lens of LatentLens (arXiv 2602.00462): per-token hidden states of a text corpus
//! at several layers, at most `per_token` per token string (reservoir sampling), positions ≥
//! `min_position` only (the first positions are attention sinks), L2-normalised, f16 on disk, and
//! memory-mapped for queries: a token is scored by cosine against every stored layer and the top-k
//! are merged across layers.
//!
//! Directory layout: `index.json` (model, hook points, hidden size, slot count, the reservoir's
//! parameters, corpus), `layer-{k}.f16` (raw little-endian f16 `[slots, hidden]` for the k-th hook
//! point), `slots.bin` (per slot four little-endian u32: key, token id, sentence, position),
//! `keys.json` (the token strings) and `sentences.txt` (the corpus lines, in order).
//!
//! The reservoir rule (also in scripts/goldens/lens_goldens.py): sentences in order, positions in
//! order; the key is the token's decoded string; its first `per_token` occurrences take new slots
//! (numbered in order of allocation); occurrence n ≥ `per_token` draws j = splitmix64() % (n + 1)
//! from one generator seeded once for the whole corpus and replaces the key's j-th slot when j <
//! `per_token`. Every occurrence stored keeps the vectors of all index layers of that occurrence.
use super::lens::Source;
use crate::models::hooks::HookPoint;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::f16;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// splitmix64 (Steele, Lea, Flood 2014): tiny, seedable, and easy to reproduce in numpy.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IndexMeta {
    pub model: String,
    pub weights_hash: String,
    /// `--adapter`: the LoRA adapter (`name@hash`) the index was built with; absent for a plain model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    pub hook_points: Vec<String>,
    pub hidden: usize,
    pub slots: usize,
    pub per_token: usize,
    pub min_position: usize,
    pub seed: u64,
    pub corpus: String,
    pub sentences: usize,
    /// Token occurrences seen (positions ≥ min_position).
    pub occurrences: u64,
    pub dtype: String,
}

/// Per slot: key (index into keys), token id, sentence, position.
pub type SlotRecord = [u32; 4];

/// Builds an index on disk; vectors go straight to the layer files (memory holds the slot table only).
pub struct IndexWriter {
    dir: PathBuf,
    meta: IndexMeta,
    files: Vec<std::fs::File>,
    rng: SplitMix64,
    /// Per key: occurrences so far and its slots.
    seen: HashMap<u32, (u64, Vec<u32>)>,
    key_ids: HashMap<String, u32>,
    keys: Vec<String>,
    slots: Vec<SlotRecord>,
    sentences: std::io::BufWriter<std::fs::File>,
    row: Vec<u8>,
}

impl IndexWriter {
    pub fn create(dir: &Path, mut meta: IndexMeta) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = (0..meta.hook_points.len())
            .map(|k| {
                let p = dir.join(format!("layer-{k}.f16"));
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .read(true)
                    .write(true)
                    .open(&p)
                    .with_context(|| format!("creating {}", p.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let sp = dir.join("sentences.txt");
        let sentences =
            std::io::BufWriter::new(std::fs::File::create(&sp).with_context(|| format!("creating {}", sp.display()))?);
        meta.slots = 0;
        meta.occurrences = 0;
        meta.sentences = 0;
        meta.dtype = "f16".into();
        let rng = SplitMix64(meta.seed);
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            files,
            rng,
            seen: HashMap::new(),
            key_ids: HashMap::new(),
            keys: Vec::new(),
            slots: Vec::new(),
            sentences,
            row: Vec::new(),
        })
    }

    fn key_id(&mut self, key: &str) -> u32 {
        if let Some(&k) = self.key_ids.get(key) {
            return k;
        }
        let k = self.keys.len() as u32;
        self.keys.push(key.to_string());
        self.key_ids.insert(key.to_string(), k);
        k
    }

    /// Records the next corpus sentence (stored for the lens's `source`); returns its index.
    pub fn add_sentence(&mut self, text: &str) -> Result<u32> {
        writeln!(self.sentences, "{}", text.replace('\n', " "))?;
        self.meta.sentences += 1;
        Ok(self.meta.sentences as u32 - 1)
    }

    /// The reservoir decision for one occurrence of `key`: the slot to (over)write, or None.
    pub fn reserve(&mut self, key: &str, token_id: u32, sentence: u32, position: u32) -> Option<u32> {
        let k = self.key_id(key);
        self.meta.occurrences += 1;
        let per = self.meta.per_token as u64;
        let (n, _) = self.seen.get(&k).map(|(n, s)| (*n, s.len())).unwrap_or((0, 0));
        let slot = if n < per {
            let s = self.slots.len() as u32;
            self.slots.push([k, token_id, sentence, position]);
            self.seen.entry(k).or_default().1.push(s);
            Some(s)
        } else {
            let j = self.rng.next_u64() % (n + 1);
            if j < per {
                let s = self.seen[&k].1[j as usize];
                self.slots[s as usize] = [k, token_id, sentence, position];
                Some(s)
            } else {
                None
            }
        };
        self.seen.entry(k).or_default().0 = n + 1;
        slot
    }

    /// Writes the vectors of one slot (one `[hidden]` slice per hook point), L2-normalised here
    /// unless `normalized`.
    pub fn write_slot(&mut self, slot: u32, rows: &[&[f32]], normalized: bool) -> Result<()> {
        if rows.len() != self.files.len() {
            bail!("{} vectors for {} index layers", rows.len(), self.files.len());
        }
        let h = self.meta.hidden;
        for (f, r) in self.files.iter().zip(rows) {
            if r.len() != h {
                bail!("index vector of {} values, expected hidden size {h}", r.len());
            }
            let n = if normalized { 1.0 } else { r.iter().map(|&v| v * v).sum::<f32>().sqrt().max(1e-30) };
            self.row.clear();
            for &v in r.iter() {
                self.row.extend_from_slice(&f16::from_f32(v / n).to_le_bytes());
            }
            f.write_all_at(&self.row, slot as u64 * (2 * h) as u64)?;
        }
        Ok(())
    }

    /// Appends a slot without the reservoir (vectors already selected and normalised elsewhere).
    pub fn push_slot(
        &mut self,
        key: &str,
        token_id: u32,
        sentence: u32,
        position: u32,
        rows: &[&[f32]],
    ) -> Result<u32> {
        let k = self.key_id(key);
        let s = self.slots.len() as u32;
        self.slots.push([k, token_id, sentence, position]);
        self.seen.entry(k).or_default().1.push(s);
        self.write_slot(s, rows, true)?;
        Ok(s)
    }

    pub fn slots(&self) -> &[SlotRecord] {
        &self.slots
    }

    pub fn finish(mut self) -> Result<IndexMeta> {
        self.sentences.flush()?;
        self.meta.slots = self.slots.len();
        for f in &self.files {
            f.sync_all()?;
        }
        let mut b = Vec::with_capacity(self.slots.len() * 16);
        for s in &self.slots {
            for v in s {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        std::fs::write(self.dir.join("slots.bin"), b)?;
        std::fs::write(self.dir.join("keys.json"), serde_json::to_string(&self.keys)?)?;
        std::fs::write(self.dir.join("index.json"), serde_json::to_string_pretty(&self.meta)? + "\n")?;
        Ok(self.meta)
    }
}

/// A read-out: tokens under the box, and `(token string, cosine, hook point)` best first.
pub type Readout = (usize, Vec<(String, f32, String)>);

/// One hit of a contextual query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Index into the index's hook points.
    pub layer: usize,
    pub slot: u32,
    pub score: f32,
}

/// A memory-mapped index.
pub struct Index {
    pub meta: IndexMeta,
    pub dir: PathBuf,
    layers: Vec<memmap2::Mmap>,
    pub slots: Vec<SlotRecord>,
    pub keys: Vec<String>,
    sentences: Option<Vec<String>>,
    /// Rows per chunk of a query (bounded memory whatever the index size).
    pub chunk_rows: usize,
}

impl Index {
    pub fn open(dir: &Path) -> Result<Self> {
        let mp = dir.join("index.json");
        let meta: IndexMeta = serde_json::from_str(
            &std::fs::read_to_string(&mp)
                .with_context(|| format!("reading {} (not a `lens index` directory?)", mp.display()))?,
        )
        .with_context(|| format!("{}: not a valid index manifest", mp.display()))?;
        let mut layers = Vec::new();
        for k in 0..meta.hook_points.len() {
            let p = dir.join(format!("layer-{k}.f16"));
            let f = std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
            // SAFETY: the file is only read; an index is written once and not modified while mapped.
            let m = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("mapping {}", p.display()))?;
            let want = meta.slots * meta.hidden * 2;
            if m.len() != want {
                bail!(
                    "{}: {} bytes, expected {want} ({} slots × {} hidden × 2 bytes of f16)",
                    p.display(),
                    m.len(),
                    meta.slots,
                    meta.hidden
                );
            }
            layers.push(m);
        }
        let sp = dir.join("slots.bin");
        let b = std::fs::read(&sp).with_context(|| format!("reading {}", sp.display()))?;
        if b.len() != meta.slots * 16 {
            bail!("{}: {} bytes, expected {} (16 per slot)", sp.display(), b.len(), meta.slots * 16);
        }
        let slots = b
            .chunks_exact(16)
            .map(|c| {
                let u = |i: usize| u32::from_le_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
                [u(0), u(4), u(8), u(12)]
            })
            .collect();
        let kp = dir.join("keys.json");
        let keys: Vec<String> =
            serde_json::from_str(&std::fs::read_to_string(&kp).with_context(|| format!("reading {}", kp.display()))?)
                .with_context(|| format!("{}: expected a JSON list of strings", kp.display()))?;
        Ok(Self { meta, dir: dir.to_path_buf(), layers, slots, keys, sentences: None, chunk_rows: 16384 })
    }

    pub fn hook_points(&self) -> Result<Vec<HookPoint>> {
        self.meta.hook_points.iter().map(|h| h.parse()).collect()
    }

    /// Rows `[start, start + n)` of layer `k` as an f32 tensor.
    pub fn rows(&self, k: usize, start: usize, n: usize, dev: &Device) -> Result<Tensor> {
        let h = self.meta.hidden;
        let b = &self.layers[k][start * h * 2..(start + n) * h * 2];
        Ok(Tensor::from_raw_buffer(b, DType::F16, &[n, h], dev)?.to_dtype(DType::F32)?)
    }

    /// Per layer of the index, the top-k slots of each query row by cosine.
    pub fn query_layer(&self, k_layer: usize, q: &Tensor, k: usize) -> Result<Vec<Vec<Hit>>> {
        let (nq, h) = q.dims2()?;
        if h != self.meta.hidden {
            bail!(
                "contextual lens: queries have {h} features, the index {} ({})",
                self.meta.hidden,
                self.dir.display()
            );
        }
        let dev = q.device().clone();
        let qn = super::lens::l2_normalize(&q.to_dtype(DType::F32)?)?;
        let mut best: Vec<Vec<Hit>> = vec![Vec::new(); nq];
        let mut start = 0;
        while start < self.meta.slots {
            let n = self.chunk_rows.min(self.meta.slots - start);
            let scores = qn.matmul(&self.rows(k_layer, start, n, &dev)?.t()?)?;
            for (b, row) in best.iter_mut().zip(super::lens::topk_rows(&scores, k)?) {
                b.extend(row.into_iter().map(|(i, s)| Hit { layer: k_layer, slot: start as u32 + i, score: s }));
                merge(b, k);
            }
            start += n;
        }
        Ok(best)
    }

    /// Scores against every stored layer and merges the top-k across layers.
    pub fn query(&self, q: &Tensor, k: usize) -> Result<Vec<Vec<Hit>>> {
        let mut all: Vec<Vec<Hit>> = vec![Vec::new(); q.dim(0)?];
        for l in 0..self.layers.len() {
            for (a, hits) in all.iter_mut().zip(self.query_layer(l, q, k)?) {
                a.extend(hits);
                merge(a, k);
            }
        }
        Ok(all)
    }

    fn sentence(&mut self, i: u32) -> Result<String> {
        if self.sentences.is_none() {
            let p = self.dir.join("sentences.txt");
            let t = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            self.sentences = Some(t.lines().map(|s| s.to_string()).collect());
        }
        Ok(self.sentences.as_ref().and_then(|s| s.get(i as usize)).cloned().unwrap_or_default())
    }

    /// A hit as a lens neighbour (token string, id, cosine, source sentence, layer and position).
    pub fn neighbour(&mut self, h: &Hit) -> Result<super::lens::Neighbour> {
        let [key, id, sent, pos] = self.slots[h.slot as usize];
        Ok(super::lens::Neighbour {
            token: self.keys.get(key as usize).cloned().unwrap_or_default(),
            id,
            score: h.score,
            source: Some(Source {
                sentence: self.sentence(sent)?,
                sentence_index: sent,
                hook_point: self.meta.hook_points[h.layer].clone(),
                position: pos,
                slot: h.slot,
            }),
        })
    }
}

/// The in-loop read-out: the vision tokens (`states` `[n, hidden]`, pixel `boxes`) overlapping
/// `target` (a pixel box) are each queried; their hits are pooled, one per token string (its best
/// cosine), best first. Returns the number of tokens under the box and `[[token, cosine, hook
/// point], …]` (k at most).
pub fn readout(ix: &mut Index, states: &Tensor, boxes: &[[f32; 4]], target: [f32; 4], k: usize) -> Result<Readout> {
    let under: Vec<u32> = boxes
        .iter()
        .enumerate()
        .filter(|(_, b)| b[0].max(target[0]) < b[2].min(target[2]) && b[1].max(target[1]) < b[3].min(target[3]))
        .map(|(i, _)| i as u32)
        .collect();
    if under.is_empty() || states.dim(0)? != boxes.len() {
        return Ok((under.len(), Vec::new()));
    }
    let idx = Tensor::from_vec(under.clone(), under.len(), states.device())?;
    let hits = ix.query(&states.index_select(&idx, 0)?, k)?;
    let mut pooled: Vec<Hit> = hits.into_iter().flatten().collect();
    merge(&mut pooled, usize::MAX);
    let mut out: Vec<(String, f32, String)> = Vec::new();
    for h in pooled {
        let key = ix.keys[ix.slots[h.slot as usize][0] as usize].clone();
        if !out.iter().any(|o| o.0 == key) {
            out.push((key, h.score, ix.meta.hook_points[h.layer].clone()));
        }
        if out.len() == k {
            break;
        }
    }
    Ok((under.len(), out))
}

/// Keeps the k best hits: highest score, then lower layer, then lower slot (the order of a
/// brute-force top-k over the layer-major concatenation of all layers).
fn merge(v: &mut Vec<Hit>, k: usize) {
    v.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.layer.cmp(&b.layer)).then(a.slot.cmp(&b.slot)));
    v.truncate(k);
}

/// Builds an index by running `decoder` over `sentences` (batched, left-padded; positions count
/// from the first real token) and writing the `points` states through the reservoir.
pub fn build(
    decoder: &crate::models::decoder::Decoder,
    tok: &crate::models::tokenizer::Tokenizer,
    sentences: &[String],
    points: &[HookPoint],
    meta: IndexMeta,
    dir: &Path,
    batch: usize,
) -> Result<IndexMeta> {
    let mut w = IndexWriter::create(dir, meta)?;
    let pad_id = tok.pad_token_id().unwrap_or(0);
    let spec = points.iter().fold(crate::models::hooks::HookSpec::none(), |s, &p| s.capture(p));
    let min_pos = w.meta.min_position;
    let mut key_cache: HashMap<u32, String> = HashMap::new();
    let pb = super::progress(sentences.len() as u64, "lens index");
    for chunk in sentences.chunks(batch.max(1)) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|s| tok.encode(s, true)).collect::<Result<_>>()?;
        let idx: Vec<u32> = chunk.iter().map(|s| w.add_sentence(s)).collect::<Result<_>>()?;
        let todo: Vec<usize> = (0..ids.len()).filter(|&r| ids[r].len() > min_pos).collect();
        if todo.is_empty() {
            pb.inc(chunk.len() as u64);
            continue;
        }
        let rows: Vec<Vec<u32>> = todo.iter().map(|&r| ids[r].clone()).collect();
        let (_l, caps, pads) = crate::models::generate::prefill(decoder, &rows, pad_id, &spec)?;
        let states: Vec<Vec<Vec<Vec<f32>>>> = points
            .iter()
            .map(|&p| Ok(caps.get(p)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec3::<f32>()?))
            .collect::<Result<_>>()?;
        for (b, &r) in todo.iter().enumerate() {
            for (p, &id) in ids[r].iter().enumerate().skip(min_pos) {
                let key = key_cache.entry(id).or_insert_with(|| super::lens::token_string(tok, id)).clone();
                if let Some(slot) = w.reserve(&key, id, idx[r], p as u32) {
                    let col = pads[b] + p;
                    let v: Vec<&[f32]> = states.iter().map(|s| s[b][col].as_slice()).collect();
                    w.write_slot(slot, &v, false)?;
                }
            }
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs for seed 0 (the published splitmix64 test vector).
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn reservoir_keeps_at_most_per_token() {
        let dir = tempfile::tempdir().unwrap();
        let meta = IndexMeta {
            model: "t".into(),
            adapter: None,
            weights_hash: String::new(),
            hook_points: vec!["blocks.0.hook_resid_post".into()],
            hidden: 2,
            slots: 0,
            per_token: 3,
            min_position: 2,
            seed: 1,
            corpus: String::new(),
            sentences: 0,
            occurrences: 0,
            dtype: String::new(),
        };
        let mut w = IndexWriter::create(dir.path(), meta).unwrap();
        let mut replaced = 0;
        for i in 0..100u32 {
            let key = if i % 2 == 0 { "a" } else { "b" };
            let s = w.reserve(key, i % 2, i, 2);
            if let Some(s) = s {
                assert!(s < 6, "slot {s}");
                if i >= 6 {
                    replaced += 1;
                }
                w.write_slot(s, &[&[3.0, 4.0]], false).unwrap();
            }
        }
        // 47 draws per key of which ≈ 3·Σ 1/(n+1) succeed: some, not all.
        assert!((5..60).contains(&replaced), "{replaced}");
        let m = w.finish().unwrap();
        assert_eq!((m.slots, m.occurrences), (6, 100));
        let idx = Index::open(dir.path()).unwrap();
        let r = idx.rows(0, 5, 1, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(r, vec![[0.6f32, 0.8].iter().map(|&x| f16::from_f32(x).to_f32()).collect::<Vec<_>>()]);
    }
}
