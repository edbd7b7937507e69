//! `split`: stage directories hold exactly their tensors (original names and bytes), the side
//! files, and a manifest whose hashes and source fingerprint are right; bad split points and
//! existing outputs are refused with clear messages.
mod common;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use miniwob_steer::models::weights::{fingerprint, WeightDType, Weights};
use miniwob_steer::stage::manifest::{StageManifest, MANIFEST};
use miniwob_steer::stage::split::{split, split_points, SplitOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A tensor of a safetensors file: dtype, shape, bytes.
type Raw = (String, Vec<usize>, Vec<u8>);

fn st_tensors(path: &Path) -> BTreeMap<String, Raw> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn st_metadata(path: &Path) -> Option<std::collections::HashMap<String, String>> {
    let bytes = std::fs::read(path).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    m.metadata().clone()
}

fn opts(model: &Path, stages: Option<usize>, at: &[usize], out: &Path) -> SplitOptions {
    SplitOptions { model: model.display().to_string(), stages, at: at.to_vec(), out: out.to_path_buf() }
}

fn files_of(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

/// The layer a safetensors / GGUF tensor name belongs to, if any.
fn layer_of(name: &str) -> Option<usize> {
    let rest = name.split_once("layers.").map(|x| x.1).or_else(|| name.strip_prefix("blk."))?;
    rest.split_once('.')?.0.parse().ok()
}

/// Checks what every split shares: directory names, manifests that tile the layers, file
/// hashes, flags, and no partial directories left behind.
fn check_manifests(out: &Path, stages: &[(PathBuf, StageManifest)], n: usize, num_layers: usize, weights: &str) {
    assert_eq!(stages.len(), n);
    let mut next = 0;
    for (k, (dir, m)) in stages.iter().enumerate() {
        assert_eq!(dir, &out.join(format!("stage-{k}")));
        assert_eq!(&StageManifest::read(dir).unwrap(), m, "stage.json as returned");
        m.verify(dir).unwrap();
        assert_eq!((m.stage, m.stages, m.num_layers), (k, n, num_layers));
        assert_eq!(m.layers[0], next, "stage {k} starts where stage {} ended", k.saturating_sub(1));
        assert!(m.layers[1] > m.layers[0], "stage {k} holds a layer");
        next = m.layers[1];
        assert_eq!(m.weights, weights);
        assert_eq!(m.head, k == n - 1);
        // Every file but stage.json is listed, with its sha256.
        let mut listed: BTreeSet<String> = m.files.keys().cloned().collect();
        listed.insert(MANIFEST.to_string());
        assert_eq!(listed, files_of(dir), "{}: manifest lists every file", dir.display());
        for (f, h) in &m.files {
            assert_eq!(h, &miniwob_steer::util::sha256_file(&dir.join(f)).unwrap());
            assert_eq!(h.len(), 64);
        }
        assert!(m.files.contains_key(weights));
    }
    assert_eq!(next, num_layers, "the stages tile 0..{num_layers}");
    let names = files_of(out);
    assert!(names.iter().all(|f| !f.contains("partial")), "left behind: {names:?}");
}

/// Checks a safetensors split against its source: the union of the stages' tensors is the
/// source's, bytes unchanged, each tensor on exactly the stages its name says.
fn check_safetensors_split(src: &Path, stages: &[(PathBuf, StageManifest)], tied: bool) {
    let source = st_tensors(&src.join("model.safetensors"));
    let n = stages.len();
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (k, (dir, m)) in stages.iter().enumerate() {
        let path = dir.join("model.safetensors");
        assert_eq!(st_metadata(&path), st_metadata(&src.join("model.safetensors")), "metadata kept");
        for (name, t) in st_tensors(&path) {
            assert_eq!(source.get(&name), Some(&t), "stage {k}: `{name}` has the source's dtype, shape and bytes");
            if let Some(i) = layer_of(&name) {
                assert!(m.layers[0] <= i && i < m.layers[1], "stage {k} {:?} holds `{name}`", m.layers);
            }
            seen.entry(name).or_default().push(k);
        }
    }
    assert_eq!(seen.keys().collect::<BTreeSet<_>>(), source.keys().collect::<BTreeSet<_>>(), "union = source");
    for (name, ks) in &seen {
        let want: Vec<usize> = if name.starts_with("visual.") {
            vec![0]
        } else if layer_of(name).is_some() {
            vec![stages
                .iter()
                .position(|(_, m)| m.layers[0] <= layer_of(name).unwrap() && layer_of(name).unwrap() < m.layers[1])
                .unwrap()]
        } else if name.ends_with("embed_tokens.weight") {
            if tied && n > 1 {
                vec![0, n - 1]
            } else {
                vec![0]
            }
        } else {
            assert!(name.ends_with("norm.weight") || name == "lm_head.weight", "unexpected `{name}`");
            vec![n - 1]
        };
        assert_eq!(ks, &want, "`{name}` is on stages {want:?}");
    }
    for (k, (_, m)) in stages.iter().enumerate() {
        assert_eq!(m.embed, k == 0 || (tied && k == n - 1), "stage {k} embed flag");
    }
}

/// The weights hash a single process reports for this checkpoint directory.
fn loader_hash(dir: &Path) -> String {
    fingerprint(&Weights::from_safetensors_dir(dir, &Device::Cpu, WeightDType::F32).unwrap().files()).unwrap()
}

#[test]
fn safetensors_two_and_three_stages() {
    let src = common::fixture("tiny-qwen2");
    for (n, points) in [(2, vec![2]), (3, vec![1, 2])] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("split");
        let stages = split(&opts(&src, Some(n), &[], &out)).unwrap();
        check_manifests(&out, &stages, n, 3, "model.safetensors");
        let starts: Vec<usize> = stages.iter().skip(1).map(|(_, m)| m.layers[0]).collect();
        assert_eq!(starts, points, "even split of 3 layers into {n}");
        check_safetensors_split(&src, &stages, true);
        for (dir, m) in &stages {
            // Side files: config.json only (reference.safetensors is not the model's).
            assert_eq!(files_of(dir), ["config.json", "model.safetensors", "stage.json"].map(String::from).into());
            assert_eq!(
                std::fs::read(dir.join("config.json")).unwrap(),
                std::fs::read(src.join("config.json")).unwrap()
            );
            assert!(!m.vision);
            assert_eq!(m.source.weights_hash, loader_hash(&src), "the single process's weights hash");
            assert_eq!(m.source.family, "qwen2");
            assert_eq!(m.source.format, "safetensors");
            assert_eq!(m.source.name, src.display().to_string());
        }
    }
    // Explicit points give the same layout as the even split they name.
    let tmp = tempfile::tempdir().unwrap();
    let stages = split(&opts(&src, None, &[1], tmp.path())).unwrap();
    assert_eq!(stages.iter().map(|(_, m)| m.layers).collect::<Vec<_>>(), vec![[0, 1], [1, 3]]);
}

/// A copy of tiny-qwen2 whose model.safetensors gets `extra` tensors and whose config sets
/// `tie_word_embeddings`.
fn variant(dir: &Path, extra: &[(&str, Vec<usize>)], tie: bool) {
    let src = common::fixture("tiny-qwen2");
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg = common::fixture_json("tiny-qwen2", "config.json");
    cfg["tie_word_embeddings"] = serde_json::Value::Bool(tie);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let mut ts: Vec<(String, candle_core::Tensor)> =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
    for (name, shape) in extra {
        ts.push((
            name.to_string(),
            candle_core::Tensor::ones(shape.as_slice(), candle_core::DType::F32, &Device::Cpu).unwrap(),
        ));
    }
    let meta = [("format".to_string(), "pt".to_string())].into();
    std::fs::write(dir.join("model.safetensors"), miniwob_steer::util::safetensors_bytes(&ts, &meta).unwrap()).unwrap();
}

#[test]
fn untied_head_stays_on_the_last_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("untied");
    variant(&src, &[("lm_head.weight", vec![96, 32])], false);
    let out = tmp.path().join("out");
    let stages = split(&opts(&src, Some(3), &[], &out)).unwrap();
    check_manifests(&out, &stages, 3, 3, "model.safetensors");
    check_safetensors_split(&src, &stages, false);
    assert!(st_tensors(&stages[2].0.join("model.safetensors")).contains_key("lm_head.weight"));
    assert!(!st_tensors(&stages[2].0.join("model.safetensors")).contains_key("model.embed_tokens.weight"));
    assert!(stages[0].1.embed && !stages[2].1.embed && stages[2].1.head);
}

#[test]
fn unknown_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("odd");
    variant(&src, &[("model.rotary_emb.inv_freq", vec![4])], true);
    let out = tmp.path().join("out");
    let e = format!("{:#}", split(&opts(&src, Some(2), &[], &out)).unwrap_err());
    assert!(
        e.contains(
            "split: tensor `model.rotary_emb.inv_freq`: no stage owns it (expected visual.*, a layer, the \
             embedding, the final norm or the LM head)"
        ),
        "{e}"
    );
    assert!(!out.exists(), "refused before writing anything");
}

#[test]
fn qwen2_vl_vision_on_stage_zero() {
    let src = common::fixture("tiny-qwen2-vl");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vl");
    let stages = split(&opts(&src, Some(2), &[], &out)).unwrap();
    check_manifests(&out, &stages, 2, 3, "model.safetensors");
    check_safetensors_split(&src, &stages, true);
    let visual = |dir: &Path| {
        st_tensors(&dir.join("model.safetensors")).into_keys().filter(|n| n.starts_with("visual.")).count()
    };
    let all_visual =
        st_tensors(&src.join("model.safetensors")).into_keys().filter(|n| n.starts_with("visual.")).count();
    assert!(all_visual > 0);
    assert_eq!(visual(&stages[0].0), all_visual, "every visual.* tensor on stage 0");
    assert_eq!(visual(&stages[1].0), 0, "no visual.* tensor on stage 1");
    assert!(stages[0].1.vision && !stages[1].1.vision);
    // Every non-weights file of the checkpoint is copied, byte for byte; subdirectories and
    // other safetensors files are not.
    let side: BTreeSet<String> =
        files_of(&src).into_iter().filter(|f| src.join(f).is_file() && !f.ends_with(".safetensors")).collect();
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.json", "config.json"] {
        assert!(side.contains(f), "fixture has {f}");
    }
    for (dir, m) in &stages {
        let mut want = side.clone();
        want.extend(["model.safetensors", "stage.json"].map(String::from));
        assert_eq!(files_of(dir), want, "{}", dir.display());
        for f in &side {
            assert_eq!(std::fs::read(dir.join(f)).unwrap(), std::fs::read(src.join(f)).unwrap(), "{f} copied");
        }
        assert_eq!(m.source.family, "qwen2-vl");
        assert_eq!(m.source.weights_hash, loader_hash(&src));
    }
}

fn gguf_content(path: &Path) -> (gguf_file::Content, std::fs::File) {
    let mut f = std::fs::File::open(path).unwrap();
    (gguf_file::Content::read(&mut f).unwrap(), f)
}

#[test]
fn gguf_stages_keep_metadata_and_bytes() {
    let src = common::fixture("tiny-qwen3").join("model-q8_0.gguf");
    let (source, mut sf) = gguf_content(&src);
    let num_layers = miniwob_steer::models::gguf::config(&source, &src).unwrap().num_layers;
    let tied = !source.tensor_infos.contains_key("output.weight");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gguf");
    let stages = split(&opts(&src, Some(num_layers), &[], &out)).unwrap();
    let n = stages.len();
    check_manifests(&out, &stages, n, num_layers, "model.gguf");
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut quantized = 0;
    for (k, (dir, m)) in stages.iter().enumerate() {
        assert_eq!(files_of(dir), ["model.gguf", "stage.json"].map(String::from).into(), "no side files");
        assert_eq!((m.source.format.as_str(), m.source.family.as_str()), ("gguf", "qwen3"));
        assert_eq!(m.source.weights_hash, fingerprint(std::slice::from_ref(&src)).unwrap());
        assert_eq!(m.embed, k == 0 || (tied && k == n - 1));
        let (stage, mut f) = gguf_content(&dir.join("model.gguf"));
        // All the metadata, unchanged.
        assert_eq!(
            stage.metadata.keys().collect::<BTreeSet<_>>(),
            source.metadata.keys().collect::<BTreeSet<_>>(),
            "stage {k}: metadata keys"
        );
        for (key, v) in &source.metadata {
            assert_eq!(format!("{:?}", stage.metadata[key]), format!("{v:?}"), "stage {k}: metadata `{key}`");
        }
        for (name, info) in &stage.tensor_infos {
            let want = source.tensor_infos.get(name).unwrap_or_else(|| panic!("`{name}` not in the source"));
            assert_eq!((info.ggml_dtype, info.shape.dims()), (want.ggml_dtype, want.shape.dims()), "`{name}`");
            if let Some(i) = layer_of(name) {
                assert!(m.layers[0] <= i && i < m.layers[1], "stage {k} {:?} holds `{name}`", m.layers);
            }
            let got = stage.tensor(&mut f, name, &Device::Cpu).unwrap();
            let exp = source.tensor(&mut sf, name, &Device::Cpu).unwrap();
            assert_eq!(got.data().unwrap(), exp.data().unwrap(), "stage {k}: `{name}` raw bytes");
            let (a, b) = (got.dequantize(&Device::Cpu).unwrap(), exp.dequantize(&Device::Cpu).unwrap());
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(a == b, "stage {k}: `{name}` dequantized values");
            if info.ggml_dtype != candle_core::quantized::GgmlDType::F32 {
                quantized += 1;
            }
            seen.entry(name.clone()).or_default().push(k);
        }
        if k == 0 {
            // The first stage's file still parses as the same model config.
            let cfg = miniwob_steer::models::gguf::config(&stage, &dir.join("model.gguf")).unwrap();
            assert_eq!(cfg, miniwob_steer::models::gguf::config(&source, &src).unwrap());
        }
    }
    assert!(quantized > 0, "the fixture has quantized tensors");
    assert_eq!(seen.keys().collect::<BTreeSet<_>>(), source.tensor_infos.keys().collect::<BTreeSet<_>>());
    for (name, ks) in &seen {
        let want = match name.as_str() {
            "token_embd.weight" if tied && n > 1 => vec![0, n - 1],
            "token_embd.weight" => vec![0],
            "output_norm.weight" | "output.weight" => vec![n - 1],
            _ => vec![stages
                .iter()
                .position(|(_, m)| m.layers[0] <= layer_of(name).unwrap() && layer_of(name).unwrap() < m.layers[1])
                .unwrap()],
        };
        assert_eq!(ks, &want, "`{name}`");
    }
}

#[test]
fn split_point_messages() {
    let e = |r: anyhow::Result<Vec<usize>>| format!("{:#}", r.unwrap_err());
    assert_eq!(
        e(split_points(24, None, &[0], "qwen-coder-0.5b")),
        "--at 0: a split point must be between 1 and 23 (qwen-coder-0.5b has 24 layers)"
    );
    assert_eq!(
        e(split_points(24, None, &[24], "qwen-coder-0.5b")),
        "--at 24: a split point must be between 1 and 23 (qwen-coder-0.5b has 24 layers)"
    );
    assert_eq!(e(split_points(24, None, &[5, 3], "m")), "--at 5,3: split points must be strictly increasing");
    assert_eq!(e(split_points(24, None, &[5, 5], "m")), "--at 5,5: split points must be strictly increasing");
    assert_eq!(
        e(split_points(24, Some(2), &[4, 8], "m")),
        "--stages 2 --at 4,8: 2 split point(s) make 3 stages, not 2"
    );
    assert!(
        e(split_points(24, Some(30), &[], "m")).contains("m has 24 layers, and every stage needs at least one layer")
    );
    assert!(e(split_points(24, None, &[], "m")).contains("give --stages N"));
    assert!(e(split_points(24, Some(0), &[], "m")).contains("at least one stage"));
    assert_eq!(split_points(24, Some(3), &[8, 16], "m").unwrap(), vec![8, 16]);
    assert_eq!(split_points(24, None, &[12], "m").unwrap(), vec![12]);
    assert_eq!(split_points(24, Some(2), &[], "m").unwrap(), vec![12]);
    assert_eq!(split_points(24, Some(3), &[], "m").unwrap(), vec![8, 16]);
    assert_eq!(split_points(24, Some(5), &[], "m").unwrap(), vec![5, 10, 14, 19]);
}

#[test]
fn refusals_write_nothing() {
    let src = common::fixture("tiny-qwen2");
    let name = src.display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cases: [(Option<usize>, &[usize], String); 4] = [
        (None, &[0], format!("--at 0: a split point must be between 1 and 2 ({name} has 3 layers)")),
        (None, &[3], format!("--at 3: a split point must be between 1 and 2 ({name} has 3 layers)")),
        (None, &[2, 1], "--at 2,1: split points must be strictly increasing".into()),
        (Some(2), &[1, 2], "--stages 2 --at 1,2: 2 split point(s) make 3 stages, not 2".into()),
    ];
    for (stages, at, want) in cases {
        let e = format!("{:#}", split(&opts(&src, stages, at, &out)).unwrap_err());
        assert_eq!(e, want);
        assert!(!out.exists(), "nothing written for {at:?}");
    }
}

#[test]
fn refuses_an_existing_stage_dir() {
    let src = common::fixture("tiny-qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(out.join("stage-1")).unwrap();
    let e = format!("{:#}", split(&opts(&src, Some(2), &[], &out)).unwrap_err());
    assert!(e.contains(&format!("{} already exists", out.join("stage-1").display())), "{e}");
    assert!(e.contains("another --out"), "{e}");
    assert_eq!(files_of(&out), ["stage-1".to_string()].into(), "nothing else written");
    // After a successful split, a second one into the same directory is refused too.
    let out2 = tmp.path().join("out2");
    split(&opts(&src, Some(2), &[], &out2)).unwrap();
    let e = format!("{:#}", split(&opts(&src, None, &[1], &out2)).unwrap_err());
    assert!(e.contains("stage-0 already exists"), "{e}");
    // A stale partial directory from an interrupted split is replaced.
    let out3 = tmp.path().join("out3");
    std::fs::create_dir_all(out3.join(".stage-0.partial")).unwrap();
    std::fs::write(out3.join(".stage-0.partial/junk"), b"x").unwrap();
    let stages = split(&opts(&src, Some(2), &[], &out3)).unwrap();
    assert!(!stages[0].0.join("junk").exists());
    assert_eq!(files_of(&out3), ["stage-0", "stage-1"].map(String::from).into());
}
