//! Qwen2-VL end to end: the vision tower's features scattered into the image-pad positions of
//! the shared decoder's input embeddings, M-RoPE tables passed to the decoder per position, the
//! chat template with pad expansion, and a KV-cache generation loop (greedy) whose decode
//! positions continue at `column + rope_delta`.
use super::config::{qwen25_message, Qwen2VlConfig};
use super::processor::{self, Processed, ProcessorConfig};
use super::rope;
use super::vision::VisionTower;
use crate::models::decoder::{Decoder, Splice, State};
use crate::models::generate::{self, GenerateConfig, Generation};
use crate::models::hooks::{Captures, HookSpec, StepInfo};
use crate::models::load::ModelInfo;
use crate::models::registry::{self, Location};
use crate::models::tokenizer::Tokenizer;
use crate::models::weights::{fingerprint, WeightDType, Weights};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use serde_json::{json, Value};
use std::path::Path;

pub struct Qwen2Vl {
    pub cfg: Qwen2VlConfig,
    /// `None` on a driver over pipeline stages: the tower is on the first stage.
    pub vision: Option<VisionTower>,
    /// The LLM backbone: hooks, steering vectors and `--layer` refer to its layers.
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    pub processor: ProcessorConfig,
    pub info: ModelInfo,
    chat_template: String,
    inv_freq: Vec<f32>,
}

/// One prompt row: token ids (image pads already expanded) and its processed images in order.
#[derive(Debug, Clone, PartialEq)]
pub struct VlmInput {
    pub ids: Vec<u32>,
    pub images: Vec<Processed>,
}

impl VlmInput {
    pub fn grids(&self) -> Vec<[usize; 3]> {
        self.images.iter().map(|p| p.grid_thw).collect()
    }
}

/// Replaces the k-th `pad` in `text` by `counts[k]` copies of it (what transformers' Qwen2-VL
/// processor does before tokenizing; the graft's hybrid does the same).
pub fn expand_image_pads(text: &str, pad: &str, counts: &[usize]) -> Result<String> {
    let parts: Vec<&str> = text.split(pad).collect();
    if parts.len() != counts.len() + 1 {
        bail!("the prompt has {} image placeholders but {} images were given", parts.len() - 1, counts.len());
    }
    let mut s = String::with_capacity(text.len() + counts.iter().sum::<usize>() * pad.len());
    s.push_str(parts[0]);
    for (&n, rest) in counts.iter().zip(&parts[1..]) {
        s.push_str(&pad.repeat(n));
        s.push_str(rest);
    }
    Ok(s)
}

/// What a prefill leaves behind for decoding.
pub struct Prefilled {
    /// `[batch, 1, vocab]`, or `[batch, seq, vocab]` with `all_logits`.
    pub logits: Tensor,
    pub state: State,
    /// Per row: M-RoPE `rope_delta`.
    pub deltas: Vec<i64>,
    /// Per row: prompt length without padding.
    pub lens: Vec<usize>,
}

impl Qwen2Vl {
    /// A registry alias (`qwen-vl-2b`, from the hf-hub cache, offline) or a checkpoint directory.
    pub fn load(spec: &str, device: &Device, dtype: WeightDType) -> Result<Self> {
        if let Some(addrs) = crate::stage::client::addrs_of(spec) {
            return crate::stage::connect_vlm(&addrs);
        }
        let r = registry::resolve(spec)?;
        match &r.location {
            Location::Dir(dir) => Self::load_dir(dir, &r.name, &r.checkpoint, device, dtype),
            Location::Gguf(p) => {
                bail!("{}: Qwen2-VL loads from a safetensors checkpoint directory, not GGUF", p.display())
            }
        }
    }

    pub fn load_dir(dir: &Path, name: &str, checkpoint: &str, device: &Device, dtype: WeightDType) -> Result<Self> {
        let t0 = std::time::Instant::now();
        let cfg_path = dir.join("config.json");
        let cfg = Qwen2VlConfig::from_file(&cfg_path)?;
        let mut w = Weights::from_safetensors_dir(dir, device, dtype)?;
        w.hint = format!(
            " ({}: Qwen2-VL text, {} layers, hidden {}, {} heads / {} kv heads)",
            cfg_path.display(),
            cfg.text.num_layers,
            cfg.text.hidden_size,
            cfg.text.num_heads,
            cfg.text.num_kv_heads
        );
        let vision = VisionTower::load(&cfg.vision, &w)?;
        let weights_hash = fingerprint(&w.files())?;
        let decoder = Decoder::load(cfg.text.clone(), &w).map_err(|e| {
            // A Qwen2.5-VL text tower has the same names; only shapes can tell.
            let msg = format!("{e:#}");
            if msg.contains("expected shape") {
                anyhow::anyhow!("{msg}\n{}", qwen25_message(&cfg_path.display().to_string(), "shape mismatch"))
            } else {
                e
            }
        })?;
        let info = ModelInfo {
            adapter: None,
            name: name.to_string(),
            checkpoint: checkpoint.to_string(),
            dir: Some(dir.to_path_buf()),
            weights_hash,
            dtype: dtype.name().to_string(),
            family: "qwen2-vl".to_string(),
            num_layers: cfg.text.num_layers,
            hidden_size: cfg.text.hidden_size,
            batch_invariant: decoder.batch_invariant(),
        };
        let m = Self::assemble(dir, cfg, Some(vision), decoder, info)?;
        tracing::info!(
            model = %m.info.name, dtype = %m.info.dtype, layers = m.info.num_layers, vision_depth = m.cfg.vision.depth,
            "loaded Qwen2-VL in {:.2}s", t0.elapsed().as_secs_f64()
        );
        Ok(m)
    }

    /// A Qwen2-VL from its parts: the tokenizer, chat template and processor come from `dir`
    /// (a checkpoint or a stage directory's side files); `vision` is `None` on a driver over
    /// pipeline stages.
    pub fn assemble(
        dir: &Path,
        cfg: Qwen2VlConfig,
        vision: Option<VisionTower>,
        decoder: Decoder,
        info: ModelInfo,
    ) -> Result<Self> {
        let tokenizer =
            Tokenizer::from_dir(dir).with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
        let ct = dir.join("chat_template.json");
        let chat_template = if ct.exists() {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&ct)?)
                .with_context(|| format!("{}: not valid JSON", ct.display()))?;
            v.get("chat_template")
                .and_then(|t| t.as_str())
                .with_context(|| format!("{}: missing string `chat_template`", ct.display()))?
                .to_string()
        } else {
            tokenizer.chat_template().to_string()
        };
        for (what, id) in [
            ("<|image_pad|>", cfg.image_token_id),
            ("<|vision_start|>", cfg.vision_start_token_id),
            ("<|vision_end|>", cfg.vision_end_token_id),
        ] {
            if tokenizer.token_to_id(what) != Some(id) {
                bail!(
                    "{}: the tokenizer maps {what} to {:?} but config.json says {id}",
                    dir.display(),
                    tokenizer.token_to_id(what)
                );
            }
        }
        let processor = ProcessorConfig::from_dir(dir)?;
        if processor.merge_size != cfg.vision.spatial_merge_size || processor.patch_size != cfg.vision.patch_size {
            bail!(
                "{}: preprocessor patch_size {} / merge_size {} disagree with vision_config {} / {}",
                dir.display(),
                processor.patch_size,
                processor.merge_size,
                cfg.vision.patch_size,
                cfg.vision.spatial_merge_size
            );
        }
        info.warn_if_not_invariant(decoder.device());
        let inv_freq = rope::inv_freq(cfg.text.head_dim, cfg.text.rope_theta);
        Ok(Self { cfg, vision, decoder, tokenizer, processor, info, chat_template, inv_freq })
    }

    pub fn device(&self) -> &Device {
        self.decoder.device()
    }

    /// Renders chat messages whose `content` is a string or a list of `{type: image}` /
    /// `{type: text, text}` parts (transformers' multimodal message format).
    pub fn render(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let messages = minijinja::Value::from_serialize(messages);
        let extra = [("add_vision_id", minijinja::Value::from(false))];
        self.tokenizer
            .render_template(&self.chat_template, messages, add_generation_prompt, &extra)
            .context("the Qwen2-VL chat template")
    }

    /// Replaces the k-th `<|image_pad|>` by as many pads as image k has LLM tokens, then
    /// tokenizes (what transformers' Qwen2VLProcessor does).
    pub fn encode_expanded(&self, text: &str, images: Vec<Processed>) -> Result<VlmInput> {
        let m = self.cfg.vision.spatial_merge_size;
        let counts: Vec<usize> = images.iter().map(|i| i.llm_tokens(m)).collect();
        let s = expand_image_pads(text, "<|image_pad|>", &counts)?;
        let ids = self.tokenizer.encode(&s, false)?;
        let got = ids.iter().filter(|&&t| t == self.cfg.image_token_id).count();
        let want: usize = images.iter().map(|i| i.llm_tokens(m)).sum();
        if got != want {
            bail!("tokenized prompt has {got} image tokens, expected {want} (a pad token was merged or split)");
        }
        Ok(VlmInput { ids, images })
    }

    /// One user turn: the images first, then the text (the VLM agent's prompt shape).
    pub fn user_prompt(&self, images: &[RgbImage], text: &str) -> Result<VlmInput> {
        self.user_prompt_with(images, text, None)
    }

    /// [`user_prompt`](Self::user_prompt) after a system turn when `system` is given.
    pub fn user_prompt_with(&self, images: &[RgbImage], text: &str, system: Option<&str>) -> Result<VlmInput> {
        let mut content: Vec<Value> = images.iter().map(|_| json!({"type": "image"})).collect();
        content.push(json!({"type": "text", "text": text}));
        let mut messages = Vec::with_capacity(2);
        if let Some(sys) = system {
            messages.push(json!({"role": "system", "content": sys}));
        }
        messages.push(json!({"role": "user", "content": content}));
        let rendered = self.render(&Value::Array(messages), true)?;
        let processed = images.iter().map(|i| processor::process(i, &self.processor)).collect::<Result<Vec<_>>>()?;
        self.encode_expanded(&rendered, processed)
    }

    /// Vision features of every image of every row, in order: `[Σ tokens, hidden]`. An image
    /// that appears in several rows (the baseline and steered rows of one episode) goes through
    /// the vision tower once.
    pub fn image_features(&self, rows: &[VlmInput]) -> Result<Option<Tensor>> {
        let imgs: Vec<&Processed> = rows.iter().flat_map(|r| r.images.iter()).collect();
        if imgs.is_empty() {
            return Ok(None);
        }
        let pd = self.cfg.vision.patch_dim();
        let mut unique: Vec<&Processed> = Vec::new();
        let mut which = Vec::with_capacity(imgs.len());
        for i in &imgs {
            if i.patch_dim != pd {
                bail!("processed image has {} values per patch, the vision tower expects {pd}", i.patch_dim);
            }
            match unique.iter().position(|u| u.grid_thw == i.grid_thw && u.pixel_values == i.pixel_values) {
                Some(k) => which.push(k),
                None => {
                    which.push(unique.len());
                    unique.push(i);
                }
            }
        }
        let mut px = Vec::with_capacity(unique.iter().map(|i| i.pixel_values.len()).sum());
        for i in &unique {
            px.extend_from_slice(&i.pixel_values);
        }
        let n = px.len() / pd;
        let px = Tensor::from_vec(px, (n, pd), self.device())?;
        let grids: Vec<[usize; 3]> = unique.iter().map(|i| i.grid_thw).collect();
        let feats = match (&self.vision, self.decoder.pipeline()) {
            (Some(v), _) => v.forward(&px, &grids)?,
            (None, Some(p)) => p.vision(&px, &grids)?,
            (None, None) => bail!("{}: no vision tower", self.info.name),
        };
        if unique.len() == imgs.len() {
            return Ok(Some(feats));
        }
        let m = self.cfg.vision.spatial_merge_size;
        let mut starts = Vec::with_capacity(unique.len());
        let mut at = 0;
        for u in &unique {
            starts.push(at);
            at += u.llm_tokens(m);
        }
        let parts = which
            .iter()
            .map(|&k| feats.narrow(0, starts[k], unique[k].llm_tokens(m)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&parts, 0)?))
    }

    /// Left-padded prefill of a batch of rows with their images; `spec` hooks the LLM layers
    /// (`image`/`text` selectors see which columns are image tokens).
    pub fn prefill(
        &self,
        rows: &[VlmInput],
        spec: &HookSpec,
        caps: &mut Captures,
        all_logits: bool,
    ) -> Result<Prefilled> {
        let feats = self.image_features(rows)?;
        self.prefill_with_features(rows, feats, spec, caps, all_logits)
    }

    /// [`prefill`](Self::prefill) with image features computed elsewhere (`[Σ tokens, hidden]`).
    pub fn prefill_with_features(
        &self,
        rows: &[VlmInput],
        feats: Option<Tensor>,
        spec: &HookSpec,
        caps: &mut Captures,
        all_logits: bool,
    ) -> Result<Prefilled> {
        if rows.is_empty() || rows.iter().any(|r| r.ids.is_empty()) {
            bail!("every prompt needs at least one token");
        }
        let dev = self.device().clone();
        let b = rows.len();
        let seq = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let pad_id = self.tokenizer.pad_token_id().unwrap_or(0);
        let m = self.cfg.vision.spatial_merge_size;
        let mut ids = Vec::with_capacity(b * seq);
        let mut pads = Vec::with_capacity(b);
        let mut pos_rows = Vec::with_capacity(b);
        let mut image_rows = Vec::with_capacity(b);
        let mut deltas = Vec::with_capacity(b);
        let mut gather = Vec::with_capacity(b * seq);
        let mut k = 0u32;
        for r in rows {
            self.decoder.check_ids(&r.ids)?;
            let pad = seq - r.ids.len();
            let p = rope::mrope_positions(&r.ids, &r.grids(), self.cfg.image_token_id, m)?;
            pads.push(pad);
            ids.extend(std::iter::repeat_n(pad_id, pad));
            ids.extend_from_slice(&r.ids);
            let mut pr = vec![[0i64; 3]; pad];
            pr.extend((0..r.ids.len()).map(|i| [p.ids[0][i], p.ids[1][i], p.ids[2][i]]));
            pos_rows.push(pr);
            let mut im = vec![false; pad];
            im.extend_from_slice(&p.image);
            for &is_img in &im {
                let here = gather.len() as u32;
                gather.push(if is_img {
                    k += 1;
                    (b * seq) as u32 + k - 1
                } else {
                    here
                });
            }
            image_rows.push(im);
            deltas.push(p.delta);
        }
        let ids_t = Tensor::from_vec(ids, (b, seq), &dev)?;
        let splice = if k > 0 {
            let feats = feats.context("the prompt has image tokens but no image features were given")?;
            let h = self.cfg.text.hidden_size;
            if feats.dims() != [k as usize, h] {
                bail!("image features have shape {:?}, expected [{k}, {h}] (one row per image token)", feats.dims());
            }
            Some(Splice { feats, gather })
        } else {
            None
        };
        let (cos, sin) =
            rope::mrope_tables(&pos_rows, &self.inv_freq, &self.cfg.mrope_section, &dev, self.decoder.dtype())?;
        let mut state = self.decoder.new_state(pads.clone());
        let step = StepInfo::prefill(pads).with_modality(image_rows);
        let logits = self.decoder.forward_ids(
            &ids_t,
            splice.as_ref(),
            &mut state,
            &step,
            spec,
            caps,
            all_logits,
            Some((cos, sin)),
        )?;
        Ok(Prefilled { logits, state, deltas, lens: rows.iter().map(|r| r.ids.len()).collect() })
    }

    /// One decode step: `next` (one id per row) at column `state.cols`, position `column + delta`.
    pub fn decode_step(
        &self,
        next: &[u32],
        state: &mut State,
        deltas: &[i64],
        spec: &HookSpec,
        caps: &mut Captures,
    ) -> Result<Tensor> {
        let b = next.len();
        let rows: Vec<Vec<[i64; 3]>> = (0..b)
            .map(|r| {
                let p = (state.cols - state.left_pad[r]) as i64 + deltas[r];
                vec![[p; 3]]
            })
            .collect();
        let (cos, sin) =
            rope::mrope_tables(&rows, &self.inv_freq, &self.cfg.mrope_section, self.device(), self.decoder.dtype())?;
        let ids = Tensor::from_vec(next.to_vec(), (b, 1), self.device())?;
        self.decoder.forward_ids(&ids, None, state, &StepInfo::decode(b), spec, caps, false, Some((cos, sin)))
    }

    /// Greedy generation for a batch (the rows of one episode share the batch: baseline and
    /// steered coefficients are per row in `spec`).
    pub fn generate(&self, rows: &[VlmInput], cfg: &GenerateConfig, spec: &HookSpec) -> Result<Vec<Generation>> {
        let mut caps = Captures::default();
        let Prefilled { logits, mut state, deltas, .. } = self.prefill(rows, spec, &mut caps, false)?;
        let ids: Vec<&[u32]> = rows.iter().map(|r| r.ids.as_slice()).collect();
        self.decode_loop(logits, &mut state, &deltas, &ids, cfg, spec, &mut caps)
    }

    /// Greedy generation for rows that may come from different episodes: each distinct input
    /// (the baseline and steered rows of one episode share one) is prefilled once without its
    /// last token and without hooks, in one left-padded batch (identical images go through the
    /// vision tower once), its KV cache forked into its rows, and the last prompt token of every
    /// row runs with the per-row hooks of `spec` (which must act at `last` positions). Same bits
    /// as [`generate`](Self::generate) on the rows (docs/determinism.md). With `capture`, each
    /// row also gets its input's states at that point at the image positions, `[image tokens,
    /// hidden]` in f32 (the lens read-out of `run --vlm --lens`, from the prefill done anyway).
    pub fn generate_rows(
        &self,
        rows: &[&VlmInput],
        cfg: &GenerateConfig,
        spec: &HookSpec,
        capture: Option<crate::models::hooks::HookPoint>,
    ) -> Result<(Vec<Generation>, Vec<Option<Tensor>>)> {
        if rows.is_empty() {
            return Ok((vec![], vec![]));
        }
        let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
        crate::models::memory::guard(&self.decoder, &ids, cfg.max_new_tokens, spec)?;
        let mut unique: Vec<&VlmInput> = Vec::new();
        let mut row_of = Vec::with_capacity(rows.len());
        for r in rows {
            match unique.iter().position(|u| *u == *r) {
                Some(i) => row_of.push(i),
                None => {
                    row_of.push(unique.len());
                    unique.push(r);
                }
            }
        }
        let image = self.cfg.image_token_id;
        let forkable = unique.iter().all(|u| u.ids.len() >= 2 && u.ids.last() != Some(&image))
            && spec.interventions.iter().all(|iv| iv.positions == crate::models::hooks::Positions::Last);
        // Batch row `b`'s states at the capture point at the image positions of `input`, whose
        // columns start after `pad` columns of padding: `[image tokens, hidden]`, f32 on the CPU.
        let grab = |caps: &Captures, b: usize, pad: usize, input: &VlmInput| -> Result<Option<Tensor>> {
            let Some(p) = capture else { return Ok(None) };
            let cols: Vec<u32> =
                (0..input.ids.len() - 1).filter(|&c| input.ids[c] == image).map(|c| (pad + c) as u32).collect();
            let idx = Tensor::from_vec(cols.clone(), cols.len(), self.device())?;
            let t = caps.get(p)?.narrow(0, b, 1)?.squeeze(0)?.index_select(&idx, 0)?;
            Ok(Some(t.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?))
        };
        if !forkable {
            // Every row prefilled as it is, hooks included (decode-step captures follow it).
            let mut full = spec.clone();
            full.captures.extend(capture);
            let mut caps = Captures::default();
            let batch: Vec<VlmInput> = rows.iter().map(|r| (*r).clone()).collect();
            let Prefilled { logits, mut state, deltas, .. } = self.prefill(&batch, &full, &mut caps, false)?;
            let states =
                (0..rows.len()).map(|r| grab(&caps, r, state.left_pad[r], rows[r])).collect::<Result<Vec<_>>>()?;
            let ids: Vec<&[u32]> = rows.iter().map(|r| r.ids.as_slice()).collect();
            let gens = self.decode_loop(logits, &mut state, &deltas, &ids, cfg, spec, &mut Captures::default())?;
            return Ok((gens, states));
        }
        let prefixes: Vec<VlmInput> = unique
            .iter()
            .map(|u| VlmInput { ids: u.ids[..u.ids.len() - 1].to_vec(), images: u.images.clone() })
            .collect();
        let prefix_spec = capture.iter().fold(HookSpec::none(), |s, &p| s.capture(p));
        let mut prefix_caps = Captures::default();
        let pre = self.prefill(&prefixes, &prefix_spec, &mut prefix_caps, false)?;
        let unique_states = (0..unique.len())
            .map(|u| grab(&prefix_caps, u, pre.state.left_pad[u], unique[u]))
            .collect::<Result<Vec<_>>>()?;
        let mut state = pre.state.select_rows(&row_of)?;
        // The last prompt token is text: its position is column + the full prompt's delta,
        // what decode_step computes.
        let mut deltas_u = Vec::with_capacity(unique.len());
        for u in &unique {
            let full = rope::mrope_positions(&u.ids, &u.grids(), image, self.cfg.vision.spatial_merge_size)?;
            deltas_u.push(full.delta);
        }
        let deltas: Vec<i64> = row_of.iter().map(|&u| deltas_u[u]).collect();
        let last: Vec<u32> = row_of.iter().map(|&u| *unique[u].ids.last().expect("checked above")).collect();
        let mut caps = Captures::default();
        let logits = self.decode_step(&last, &mut state, &deltas, spec, &mut caps)?;
        let ids: Vec<&[u32]> = row_of.iter().map(|&u| unique[u].ids.as_slice()).collect();
        let gens = self.decode_loop(logits, &mut state, &deltas, &ids, cfg, spec, &mut caps)?;
        Ok((gens, row_of.iter().map(|&u| unique_states[u].clone()).collect()))
    }

    /// `rows` copies of one prompt whose hooks act only from its last token on (the `last`
    /// selector: baseline and steered rows of one episode), through [`generate_rows`]
    /// (Self::generate_rows): one prefill of the prompt but its last token, forked. Same result
    /// as [`generate`](Self::generate) on `rows` copies, at about 1/rows of the prefill cost.
    pub fn generate_forked(
        &self,
        input: &VlmInput,
        rows: usize,
        cfg: &GenerateConfig,
        spec: &HookSpec,
    ) -> Result<Vec<Generation>> {
        Ok(self.generate_rows(&vec![input; rows], cfg, spec, None)?.0)
    }

    #[allow(clippy::too_many_arguments)] // the decode state of one generation, in pieces
    fn decode_loop(
        &self,
        logits: Tensor,
        state: &mut State,
        deltas: &[i64],
        prompts: &[&[u32]],
        cfg: &GenerateConfig,
        spec: &HookSpec,
        caps: &mut Captures,
    ) -> Result<Vec<Generation>> {
        generate::decode_loop(logits, prompts, cfg, |next| self.decode_step(&next, state, deltas, spec, caps))
    }
}
