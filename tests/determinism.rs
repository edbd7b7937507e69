//! Batch invariance (docs/determinism.md): the same twelve prompts generated alone, in one
//! padded batch, in shuffled batches of mixed lengths, forked from a shared prefix, next to
//! steered rows and under an α = 0 hook give bit-identical tokens and logits, and CAA's captured
//! states are bit-identical in a padded batch and in a shared-prefix read; for the two embedded
//! models, f32 and gguf. Before the batch-invariant kernels, gguf switched kernels at 32 rows
//! (logits moved by up to 0.48 on qwen-coder-0.5b) and f32 reductions depended on padding.
use candle_core::Device;
use miniwob_steer::models::determinism::{self, CheckConfig};
use miniwob_steer::models::generate::GenerateConfig;
use miniwob_steer::models::load::LoadedModel;
use miniwob_steer::models::tokenizer::ChatMessage;
use miniwob_steer::models::weights::WeightDType;
use std::process::Command;

fn check(alias: &str, dtype: WeightDType, chat: bool) {
    let m = LoadedModel::load(alias, &Device::Cpu, dtype)
        .unwrap_or_else(|e| panic!("{alias} is needed: run ./scripts/setup.sh ({e:#})"));
    assert!(m.decoder.batch_invariant(), "{alias} {dtype:?} on the CPU is a batch-invariant path");
    let prompts: Vec<Vec<u32>> = determinism::PROMPTS
        .iter()
        .map(|p| {
            let t = if chat {
                m.tokenizer.apply_chat_template(&[ChatMessage::new("user", p)], true).unwrap()
            } else {
                p.to_string()
            };
            m.tokenizer.encode(&t, false).unwrap()
        })
        .collect();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    assert!(lens.iter().max().unwrap() > &(2 * lens.iter().min().unwrap()), "mixed lengths: {lens:?}");
    let layer = m.info.num_layers / 2;
    let cfg = CheckConfig {
        gen: GenerateConfig {
            max_new_tokens: 4,
            stop_ids: m.tokenizer.stop_token_ids(),
            pad_id: m.tokenizer.pad_token_id().unwrap_or(0),
            ..Default::default()
        },
        layer,
        vector: determinism::random_direction(m.info.hidden_size, 1).unwrap(),
        coeff: 8.0,
        seed: 7,
    };
    let report = determinism::check(&m.decoder, &prompts, &cfg).unwrap();
    let bad: Vec<String> = report
        .compositions
        .iter()
        .flat_map(|c| c.differing.iter().map(move |(i, why)| format!("{}: prompt {i}: {why}", c.name)))
        .collect();
    assert!(
        bad.is_empty(),
        "{alias} {dtype:?}: {} of {} rows differ:\n{}",
        bad.len(),
        report.rows_compared(),
        bad.join("\n")
    );
    // Every composition compared real rows: one batch 12, two shuffles 24, forked pairs 24,
    // the same through the prefix cache twice 48, next to steered 12, α = 0 hook 12, captures
    // 12 × 2 suffixes × 2 reads.
    assert_eq!(report.rows_compared(), 180);
    // The second cached pass was served from the cache.
    assert!(report.prefix_cache.hit_tokens > 0, "{:?}", report.prefix_cache);
}

#[test]
fn smollm2_f32_rows_do_not_depend_on_their_batch() {
    check("smollm2-135m", WeightDType::F32, true);
}

#[test]
fn smollm2_gguf_rows_do_not_depend_on_their_batch() {
    check("smollm2-135m", WeightDType::Gguf, false);
}

#[test]
fn qwen_coder_gguf_rows_do_not_depend_on_their_batch() {
    check("qwen-coder-0.5b", WeightDType::Gguf, true);
}

#[test]
fn qwen_coder_f32_rows_do_not_depend_on_their_batch() {
    check("qwen-coder-0.5b", WeightDType::F32, false);
}

/// The same rows with 1 and 2 threads: the kernels split work by output element, never a
/// reduction, so the fingerprints of the two runs are equal.
#[test]
fn bench_determinism_fingerprint_does_not_depend_on_the_thread_count() {
    let run = |threads: &str| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
            .args(["bench", "determinism", "--model", "smollm2-135m", "--new-tokens", "3", "--threads", threads])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "threads {threads}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("0 of 180 rows differ"), "{stdout}");
        stdout.lines().find(|l| l.starts_with("fingerprint ")).expect("a fingerprint line").to_string()
    };
    assert_eq!(run("1"), run("2"));
}

/// Seeded sampling: a row draws from its own generator seeded by the config, so its sampled
/// tokens are the same alone, at another place in a batch, or next to other rows.
#[test]
fn sampled_rows_do_not_depend_on_their_batch_position() {
    use miniwob_steer::models::generate::{generate, Sampling};
    use miniwob_steer::models::hooks::{Captures, HookSpec};
    let m = LoadedModel::load("smollm2-135m", &Device::Cpu, WeightDType::Gguf).unwrap();
    let prompts: Vec<Vec<u32>> =
        determinism::PROMPTS[..5].iter().map(|p| m.tokenizer.encode(p, false).unwrap()).collect();
    let cfg = GenerateConfig {
        max_new_tokens: 8,
        sampling: Sampling::Sample { temperature: 1.0, top_p: 0.95 },
        seed: 11,
        ..Default::default()
    };
    let gen = |ps: &[Vec<u32>]| generate(&m.decoder, ps, &cfg, &HookSpec::none(), &mut Captures::default()).unwrap();
    let alone: Vec<_> = prompts.iter().map(|p| gen(std::slice::from_ref(p)).remove(0)).collect();
    let mut reversed = prompts.clone();
    reversed.reverse();
    let batch = gen(&reversed);
    for (i, g) in batch.iter().rev().enumerate() {
        assert_eq!(g, &alone[i], "prompt {i} sampled differently in a batch");
    }
    // The sampler is real: another seed draws other tokens for some prompt.
    let other = generate(
        &m.decoder,
        &prompts,
        &GenerateConfig { seed: 12, ..cfg.clone() },
        &HookSpec::none(),
        &mut Captures::default(),
    )
    .unwrap();
    assert!(other.iter().zip(&alone).any(|(a, b)| a.tokens != b.tokens));
}
