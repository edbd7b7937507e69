//! The batch-invariance check (docs/determinism.md): the same rows generated in many batch
//! compositions (alone, one batch, shuffled batches of mixed lengths, forked from a shared
//! prefix, next to steered rows, with an α = 0 hook, CAA-style shared captures) must give
//! bit-identical tokens and logits. `bench determinism` runs it on any model; the tests run it
//! on the embedded ones.
use super::decoder::Decoder;
use super::generate::{self, GenerateConfig, Generation};
use super::hooks::{Captures, HookPoint, HookSpec, Positions};
use super::prefix_cache::{CacheStats, PrefixCache};
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// What to compare.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    pub gen: GenerateConfig,
    /// Steering for the "steered" rows: a `[hidden]` direction added at the output of `layer`
    /// times `coeff`, at the `last` positions (the exp12 setting).
    pub layer: usize,
    pub vector: Tensor,
    pub coeff: f32,
    /// Seeds the shuffles of the "shuffled batches" composition.
    pub seed: u64,
}

/// One composition's result: how many rows were compared and which differed.
#[derive(Debug, Clone)]
pub struct Composition {
    pub name: String,
    pub rows: usize,
    /// `(prompt index, what differed)`.
    pub differing: Vec<(usize, String)>,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub compositions: Vec<Composition>,
    /// A hash of every reference row's tokens and logits: equal across invocations (thread
    /// counts, machines) when the outputs are bit-identical.
    pub fingerprint: u64,
    /// What the prefix cache of the cached compositions served.
    pub prefix_cache: CacheStats,
}

impl Report {
    pub fn rows_compared(&self) -> usize {
        self.compositions.iter().map(|c| c.rows).sum()
    }
    pub fn differing(&self) -> usize {
        self.compositions.iter().map(|c| c.differing.len()).sum()
    }
}

/// Rows of one batch: a prompt index and its coefficient (0 = baseline).
type Rows = Vec<(usize, f32)>;

/// Which generation path a composition takes.
#[derive(Clone, Copy)]
enum Path {
    Padded,
    Forked,
    Cached,
}

fn spec_for(cfg: &CheckConfig, coeffs: Vec<f32>) -> HookSpec {
    if coeffs.iter().all(|&c| c == 0.0) {
        return HookSpec::none();
    }
    HookSpec::none().add(HookPoint::ResidPost(cfg.layer), cfg.vector.clone(), coeffs, Positions::Last)
}

fn describe(got: &Generation, want: &Generation) -> Option<String> {
    if got.tokens != want.tokens || got.stop != want.stop {
        Some(format!("tokens {:?} instead of {:?}", got.tokens, want.tokens))
    } else if got.logits_hash != want.logits_hash {
        Some("same tokens, logits differ in their bits".into())
    } else {
        None
    }
}

/// Runs every composition over `prompts` (at least 2) and compares each row with the same
/// prompt and coefficient generated alone.
pub fn check(model: &Decoder, prompts: &[Vec<u32>], cfg: &CheckConfig) -> Result<Report> {
    if prompts.len() < 2 {
        bail!("the determinism check needs at least 2 prompts, found {}", prompts.len());
    }
    let n = prompts.len();
    let alone = |i: usize, coeff: f32| -> Result<Generation> {
        let spec = spec_for(cfg, vec![coeff]);
        Ok(generate::generate(model, &prompts[i..=i], &cfg.gen, &spec, &mut Captures::default())?.remove(0))
    };
    let base: Vec<Generation> = (0..n).map(|i| alone(i, 0.0)).collect::<Result<_>>()?;
    let steered: Vec<Generation> = (0..n).map(|i| alone(i, cfg.coeff)).collect::<Result<_>>()?;
    let reference = |i: usize, coeff: f32| if coeff == 0.0 { &base[i] } else { &steered[i] };

    let mut out = Vec::new();
    // Prefixes cached by one call and served to the next (shared across compositions, as the
    // generator shares it across episodes).
    let mut cache = PrefixCache::new(64);
    let mut compare = |name: &str, batches: Vec<Rows>, path: Path| -> Result<()> {
        let mut c = Composition { name: name.into(), rows: 0, differing: vec![] };
        for rows in batches {
            let ps: Vec<Vec<u32>> = rows.iter().map(|&(i, _)| prompts[i].clone()).collect();
            let spec = spec_for(cfg, rows.iter().map(|r| r.1).collect());
            let gens = match path {
                Path::Forked => generate::generate_shared(model, &ps, &cfg.gen, &spec, None)?,
                Path::Cached => generate::generate_shared(model, &ps, &cfg.gen, &spec, Some(&mut cache))?,
                Path::Padded => generate::generate(model, &ps, &cfg.gen, &spec, &mut Captures::default())?,
            };
            for (&(i, coeff), g) in rows.iter().zip(&gens) {
                c.rows += 1;
                if let Some(why) = describe(g, reference(i, coeff)) {
                    c.differing.push((i, format!("α={coeff}: {why}")));
                }
            }
        }
        out.push(c);
        Ok(())
    };
    let all: Rows = (0..n).map(|i| (i, 0.0)).collect();
    compare("one batch (padded to the longest)", vec![all.clone()], Path::Padded)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..n).collect();
    let mut shuffled = Vec::new();
    for sizes in [[3usize, 1, 5, 2], [2, 4, 1, 3]] {
        order.shuffle(&mut rng);
        let mut rest = &order[..];
        for &k in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (b, r) = rest.split_at(k.min(rest.len()));
            shuffled.push(b.iter().map(|&i| (i, 0.0)).collect::<Rows>());
            rest = r;
        }
    }
    compare("shuffled batches of mixed lengths", shuffled, Path::Padded)?;
    // A paired episode's rows: the same prompt baseline and steered, prefix prefilled once.
    let pairs: Vec<Rows> = (0..n)
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|c| c.iter().flat_map(|&i| [(i, 0.0), (i, cfg.coeff)]).collect())
        .collect();
    compare("forked from a shared prefix, baseline and steered", pairs.clone(), Path::Forked)?;
    // Twice: the first pass fills the cache, the second is served from it.
    compare("through the prefix cache (filling it)", pairs.clone(), Path::Cached)?;
    compare("through the prefix cache (served from it)", pairs, Path::Cached)?;
    let mixed: Rows = (0..n).map(|i| (i, if i % 2 == 0 { 0.0 } else { cfg.coeff })).collect();
    compare("next to steered rows (padded batch)", vec![mixed], Path::Padded)?;
    // A hook whose every coefficient is 0 must be a no-op to the bit.
    let mut zero = Composition { name: "α = 0 hook on every row".into(), rows: 0, differing: vec![] };
    let spec = HookSpec::none().add(HookPoint::ResidPost(cfg.layer), cfg.vector.clone(), vec![0.0; n], Positions::Last);
    let gens = generate::generate(model, prompts, &cfg.gen, &spec, &mut Captures::default())?;
    for (i, g) in gens.iter().enumerate() {
        zero.rows += 1;
        if let Some(why) = describe(g, &base[i]) {
            zero.differing.push((i, why));
        }
    }
    out.push(zero);
    out.push(captures(model, prompts, cfg)?);
    let prefix_cache = cache.stats();

    let mut fp = 0xcbf29ce484222325u64;
    for g in base.iter().chain(&steered) {
        for x in g.tokens.iter().copied().chain([g.stop.unwrap_or(u32::MAX)]) {
            fp = (fp ^ x as u64).wrapping_mul(0x100000001b3);
        }
        fp = (fp ^ g.logits_hash).wrapping_mul(0x100000001b3);
    }
    Ok(Report { compositions: out, fingerprint: fp, prefix_cache })
}

/// CAA reads: last-position states at the steering layer of each prompt followed by two
/// different suffixes (a task prompt and its positive and negative instructions), each read
/// alone against a padded batch of the two and against the shared-prefix read that vector
/// computation uses.
fn captures(model: &Decoder, prompts: &[Vec<u32>], cfg: &CheckConfig) -> Result<Composition> {
    let point = HookPoint::ResidPost(cfg.layer);
    let spec = HookSpec::none().capture(point);
    let pad = cfg.gen.pad_id;
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
    };
    let read = |ps: &[Vec<u32>]| -> Result<Tensor> {
        let (_, caps, _) = generate::prefill(model, ps, pad, &spec)?;
        let h = caps.get(point)?;
        let seq = h.dim(1)?;
        Ok(h.narrow(1, seq - 1, 1)?.squeeze(1)?)
    };
    // Two suffixes of different lengths, taken from the prompts themselves.
    let suffixes = [&prompts[0], &prompts[1][..prompts[1].len().min(7)].to_vec()];
    let mut c =
        Composition { name: "captured states (padded batch, shared prefix)".into(), rows: 0, differing: vec![] };
    for (i, p) in prompts.iter().enumerate() {
        let group: Vec<Vec<u32>> = suffixes.iter().map(|s| p.iter().chain(s.iter()).copied().collect()).collect();
        let batch = read(&group)?;
        let (_, shared) = generate::last_states_shared(model, &group, pad, &spec, None)?;
        for (r, row) in group.iter().enumerate() {
            let want = bits(&read(std::slice::from_ref(row))?)?;
            for (how, t) in [("padded batch", &batch), ("shared prefix", &shared[&point])] {
                c.rows += 1;
                if bits(&t.get(r)?)? != want {
                    c.differing.push((i, format!("suffix {r}: the state at `{point}` differs in a {how}")));
                }
            }
        }
    }
    Ok(c)
}

/// A seeded unit vector of `hidden` values (a stand-in steering direction).
pub fn random_direction(hidden: usize, seed: u64) -> Result<Tensor> {
    use rand::Rng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..hidden).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    Ok(Tensor::from_vec(v.into_iter().map(|x| x / norm).collect::<Vec<_>>(), hidden, &candle_core::Device::Cpu)?)
}

/// Twelve prompts of mixed lengths; several share a prefix, as an episode prompt and its CAA
/// variants do.
pub const PROMPTS: [&str; 12] = [
    "Click on the \"Ok\" button.",
    "Task: Click on the \"Ok\" button.\nPage elements:\n<button ref=4>Ok</button>\n<button ref=5>Cancel</button>\nAnswer:",
    "Task: Click on the \"Ok\" button.\nPage elements:\n<button ref=4>Ok</button>\n<button ref=5>Cancel</button>\nAnswer carefully:",
    "Task: Focus into the text field and type \"hello\".\nPage elements:\n<input_text ref=3>\nAnswer:",
    "The capital of France is",
    "def fibonacci(n):",
    "Select Giovanna from the list and click Submit.",
    "Here is a long page. It has many elements: a header, a navigation bar with five links, a search \
     form, two columns of text, a table of prices, a footer with the copyright and a cookie banner \
     that covers the bottom of the screen. Find the button that accepts cookies.",
    "1, 2, 3, 4, 5,",
    "Translate to German: the cat sits on the mat.",
    "Q: Which element holds the text \"Cancel\"?\nA:",
    "Enter the password \"x7Qz\" into both fields, then press the button labelled Login.",
];
