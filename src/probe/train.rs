//! Head training on candle-nn: f32 parameters (`Var`s initialised from a seeded RNG, so two runs
//! with the same seed are bit-identical), AdamW, a class-weighted cross-entropy, and early stopping
//! on the validation loss that keeps the best epoch's parameters.
//!
//! The split is stratified: per class, a seeded shuffle of its rows, the first `test` fraction to
//! test, the next `val` fraction to validation, the rest to training (a class with a single row
//! goes to training). Features of any dtype are cast to f32 before anything else.
use super::head::{Head, HeadKind, HeadMeta, Split};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Optimizer;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassWeights {
    None,
    /// n / (classes · n_c) over the training rows (scikit-learn's `balanced`).
    Balanced,
}

impl std::str::FromStr for ClassWeights {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(ClassWeights::None),
            "balanced" => Ok(ClassWeights::Balanced),
            o => bail!("--class-weights {o}: expected none or balanced"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    pub head: HeadKind,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub weight_decay: f64,
    pub class_weights: ClassWeights,
    pub val_split: f64,
    pub test_split: f64,
    pub seed: u64,
    /// Stop after this many epochs without a lower validation loss.
    pub patience: usize,
    /// L2 penalty `l2/2 · Σ W²` on the weight matrices (not the biases) added to the mean loss:
    /// scikit-learn's `LogisticRegression(C)` on n training rows is `l2 = 1 / (C · n)`. AdamW's
    /// decoupled weight decay is another objective; the peer comparison uses this one.
    pub l2: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            head: HeadKind::Linear,
            epochs: 50,
            lr: 1e-3,
            batch_size: 32,
            weight_decay: 1e-2,
            class_weights: ClassWeights::None,
            val_split: 0.1,
            test_split: 0.2,
            seed: 0,
            patience: 5,
            l2: 0.0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub epochs: Vec<EpochLog>,
    pub best_epoch: usize,
    pub seconds_per_epoch: f64,
}

/// The stratified split of `labels` (see the module doc).
pub fn stratified_split(labels: &[u32], classes: usize, val: f64, test: f64, seed: u64) -> Result<Split> {
    if !(0.0..1.0).contains(&val) || !(0.0..1.0).contains(&test) || val + test >= 1.0 {
        bail!("--val-split {val} and --test-split {test}: each in [0, 1) and together below 1");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x7072_6f62_655f_7370);
    let mut s = Split::default();
    for c in 0..classes as u32 {
        let mut rows: Vec<u32> = (0..labels.len() as u32).filter(|&i| labels[i as usize] == c).collect();
        rows.shuffle(&mut rng);
        let n = rows.len();
        let (mut nt, mut nv) = ((n as f64 * test).round() as usize, (n as f64 * val).round() as usize);
        if n >= 3 {
            nt = nt.max(usize::from(test > 0.0));
            nv = nv.max(usize::from(val > 0.0));
        }
        while nt + nv >= n && nt + nv > 0 {
            if nv > 0 {
                nv -= 1;
            } else {
                nt -= 1;
            }
        }
        s.test.extend(&rows[..nt]);
        s.val.extend(&rows[nt..nt + nv]);
        s.train.extend(&rows[nt + nv..]);
    }
    s.train.sort();
    s.val.sort();
    s.test.sort();
    Ok(s)
}

fn gather(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let idx = Tensor::from_vec(rows.to_vec(), rows.len(), x.device())?;
    Ok(x.index_select(&idx, 0)?)
}

fn forward(kind: HeadKind, p: &[Var], z: &Tensor) -> Result<Tensor> {
    let aff = |x: &Tensor, w: &Var, b: &Var| -> Result<Tensor> { Ok(x.matmul(&w.t()?)?.broadcast_add(b.as_tensor())?) };
    Ok(match kind {
        HeadKind::Linear => aff(z, &p[0], &p[1])?,
        HeadKind::Mlp { .. } => aff(&aff(z, &p[0], &p[1])?.relu()?, &p[2], &p[3])?,
    })
}

/// Weighted mean cross-entropy of `logits` `[n, c]` against `targets`.
fn loss(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<Tensor> {
    let dev = logits.device();
    let lsm = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let t = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), dev)?;
    let picked = lsm.gather(&t, 1)?.squeeze(1)?;
    let w: Vec<f32> = targets.iter().map(|&c| weights[c as usize]).collect();
    let total: f32 = w.iter().sum();
    if total <= 0.0 {
        bail!("every row of the batch has class weight 0");
    }
    let w = Tensor::from_vec(w, targets.len(), dev)?;
    Ok((picked.mul(&w)?.sum_all()?.neg()? / total as f64)?)
}

/// Trains a head on `x` `[rows, hidden]` (any dtype; cast to f32) with class indices `labels`.
/// `meta` supplies the model/features fields; the training fields are filled in here.
pub fn train(x: &Tensor, labels: &[u32], cfg: &TrainConfig, mut meta: HeadMeta) -> Result<(Head, TrainReport)> {
    let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (n, h) = x.dims2()?;
    if n != labels.len() {
        bail!("{n} feature rows but {} labels", labels.len());
    }
    if h != meta.hidden_size {
        bail!("features have {h} values per row, the head expects hidden_size {}", meta.hidden_size);
    }
    let c = meta.classes.len();
    if cfg.epochs == 0 || cfg.batch_size == 0 {
        bail!("--epochs and --batch-size must be at least 1");
    }
    let split = stratified_split(labels, c, cfg.val_split, cfg.test_split, cfg.seed)?;
    if split.train.is_empty() {
        bail!("no training rows after the split");
    }
    let xt = gather(&x, &split.train)?;
    let yt: Vec<u32> = split.train.iter().map(|&i| labels[i as usize]).collect();
    // Standardisation from the training rows, in f64.
    let rows: Vec<Vec<f32>> = xt.to_vec2()?;
    let nt = rows.len() as f64;
    let mut mean = vec![0f64; h];
    for r in &rows {
        mean.iter_mut().zip(r).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= nt);
    let mut var = vec![0f64; h];
    for r in &rows {
        var.iter_mut().zip(r.iter().zip(&mean)).for_each(|(s, (&v, m))| *s += (v as f64 - m).powi(2));
    }
    let std: Vec<f32> = var.iter().map(|s| (s / nt).sqrt()).map(|s| if s > 1e-6 { s as f32 } else { 1.0 }).collect();
    let mean: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    meta.mean_resid_norm =
        (rows.iter().map(|r| r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt()).sum::<f64>() / nt) as f32;
    drop(rows);
    let mu = Tensor::from_vec(mean.clone(), (1, h), &Device::Cpu)?;
    let sd = Tensor::from_vec(std.clone(), (1, h), &Device::Cpu)?;
    let standardise = |t: &Tensor| -> Result<Tensor> { Ok(t.broadcast_sub(&mu)?.broadcast_div(&sd)?) };
    let zt = standardise(&xt)?;
    let zv = if split.val.is_empty() { None } else { Some(standardise(&gather(&x, &split.val)?)?) };
    let yv: Vec<u32> = split.val.iter().map(|&i| labels[i as usize]).collect();
    let weights: Vec<f32> = match cfg.class_weights {
        ClassWeights::None => vec![1.0; c],
        ClassWeights::Balanced => (0..c as u32)
            .map(|k| {
                let nk = yt.iter().filter(|&&y| y == k).count();
                if nk == 0 {
                    0.0
                } else {
                    (yt.len() as f64 / (c as f64 * nk as f64)) as f32
                }
            })
            .collect(),
    };
    // Seeded init: uniform(−1/√fan_in, 1/√fan_in), as torch.nn.Linear.
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let vars: Vec<Var> = Head::param_shapes(cfg.head, h, c)
        .into_iter()
        .enumerate()
        .map(|(i, (r, k))| {
            let fan_in = if k == 1 { Head::param_shapes(cfg.head, h, c)[i - 1].1 } else { k };
            let b = 1.0 / (fan_in as f32).sqrt();
            let v: Vec<f32> = (0..r * k).map(|_| rng.random_range(-b..b)).collect();
            let t =
                if k == 1 { Tensor::from_vec(v, r, &Device::Cpu)? } else { Tensor::from_vec(v, (r, k), &Device::Cpu)? };
            Ok(Var::from_tensor(&t)?)
        })
        .collect::<Result<_>>()?;
    let mut opt = candle_nn::AdamW::new(
        vars.clone(),
        candle_nn::ParamsAdamW { lr: cfg.lr, weight_decay: cfg.weight_decay, ..Default::default() },
    )?;
    let snapshot = |vars: &[Var]| -> Result<Vec<Vec<f32>>> {
        vars.iter().map(|v| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)).collect()
    };
    let mut best = snapshot(&vars)?;
    let (mut best_epoch, mut best_val) = (0usize, None::<f64>);
    let mut logs = Vec::new();
    let mut order: Vec<u32> = (0..split.train.len() as u32).collect();
    let pb = crate::interp::progress(cfg.epochs as u64, "probe train");
    let t_all = std::time::Instant::now();
    for epoch in 1..=cfg.epochs {
        let t0 = std::time::Instant::now();
        order.shuffle(&mut rng);
        let (mut sum, mut batches) = (0f64, 0usize);
        for chunk in order.chunks(cfg.batch_size) {
            let targets: Vec<u32> = chunk.iter().map(|&i| yt[i as usize]).collect();
            if targets.iter().all(|&t| weights[t as usize] == 0.0) {
                continue;
            }
            let zb = gather(&zt, chunk)?;
            let mut l = loss(&forward(cfg.head, &vars, &zb)?, &targets, &weights)?;
            if cfg.l2 > 0.0 {
                for w in vars.iter().step_by(2) {
                    l = (l + (w.as_tensor().sqr()?.sum_all()? * (cfg.l2 / 2.0))?)?;
                }
            }
            opt.backward_step(&l)?;
            sum += l.to_scalar::<f32>()? as f64;
            batches += 1;
        }
        let val_loss = match &zv {
            Some(zv) => {
                Some(loss(&forward(cfg.head, &vars, zv)?.detach(), &yv, &vec![1.0; c])?.to_scalar::<f32>()? as f64)
            }
            None => None,
        };
        let log =
            EpochLog { epoch, train_loss: sum / batches.max(1) as f64, val_loss, seconds: t0.elapsed().as_secs_f64() };
        tracing::debug!(epoch, train_loss = log.train_loss, val_loss = ?log.val_loss, "epoch");
        pb.inc(1);
        logs.push(log);
        match (val_loss, best_val) {
            (Some(v), Some(b)) if v >= b => {
                if epoch - best_epoch >= cfg.patience.max(1) {
                    tracing::info!("early stop after epoch {epoch}: no lower validation loss since epoch {best_epoch}");
                    break;
                }
            }
            (Some(v), _) => {
                best_val = Some(v);
                best_epoch = epoch;
                best = snapshot(&vars)?;
            }
            (None, _) => {
                best_epoch = epoch;
                best = snapshot(&vars)?;
            }
        }
        if val_loss.is_some_and(|v| !v.is_finite()) {
            bail!("validation loss is {} at epoch {epoch}; lower --lr", val_loss.unwrap());
        }
    }
    pb.finish_and_clear();
    let secs = t_all.elapsed().as_secs_f64();
    meta.head = cfg.head;
    meta.train = serde_json::to_value(cfg)?;
    meta.best_epoch = best_epoch;
    meta.best_val_loss = best_val;
    meta.epochs_run = logs.len();
    let report = TrainReport { best_epoch, seconds_per_epoch: secs / logs.len().max(1) as f64, epochs: logs };
    Ok((Head { meta, mean, std, params: best, split }, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stratified_disjoint_and_seeded() {
        let labels: Vec<u32> = (0..100).map(|i| if i < 90 { 0 } else { 1 }).collect();
        let s = stratified_split(&labels, 2, 0.1, 0.2, 7).unwrap();
        assert_eq!(s.train.len() + s.val.len() + s.test.len(), 100);
        let mut all: Vec<u32> = s.train.iter().chain(&s.val).chain(&s.test).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(s.test.iter().filter(|&&i| labels[i as usize] == 1).count(), 2);
        assert_eq!(s.val.iter().filter(|&&i| labels[i as usize] == 1).count(), 1);
        assert_eq!(s, stratified_split(&labels, 2, 0.1, 0.2, 7).unwrap());
        assert_ne!(s, stratified_split(&labels, 2, 0.1, 0.2, 8).unwrap());
        assert!(stratified_split(&labels, 2, 0.6, 0.5, 0).is_err());
    }
}
