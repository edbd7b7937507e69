//! Evaluation that cannot hide a collapse: accuracy beside the majority-class baseline, macro-F1,
//! per-class precision and recall, the confusion matrix (markdown and PNG), and a warning when one
//! class takes ≥ [`COLLAPSE_SHARE`] of the predictions.
use super::features::FeatureSet;
use super::head::{Head, HeadMeta, Split};
use super::train::{self, TrainConfig};
use anyhow::{bail, Result};
use image::{Rgba, RgbaImage};
use serde::Serialize;

/// A head that gives one class this share of its predictions (or more) is reported as collapsed.
pub const COLLAPSE_SHARE: f64 = 0.9;

#[derive(Debug, Clone, Serialize)]
pub struct ClassMetrics {
    pub class: String,
    pub support: usize,
    pub predicted: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub rows: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Accuracy of always answering the most frequent class of the training rows.
    pub majority_baseline: f64,
    pub majority_class: String,
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    /// The most predicted class and its share of the predictions.
    pub top_predicted: String,
    pub top_predicted_share: f64,
    pub collapsed: bool,
}

/// Metrics of `pred` against `truth`; `majority` is the class index of the baseline.
pub fn metrics(truth: &[u32], pred: &[u32], classes: &[String], majority: usize) -> Result<Metrics> {
    if truth.len() != pred.len() || truth.is_empty() {
        bail!("metrics need as many predictions as labels, at least one ({} vs {})", pred.len(), truth.len());
    }
    let c = classes.len();
    let mut cm = vec![vec![0usize; c]; c];
    for (&t, &p) in truth.iter().zip(pred) {
        cm[t as usize][p as usize] += 1;
    }
    let n = truth.len();
    let correct: usize = (0..c).map(|k| cm[k][k]).sum();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_class: Vec<ClassMetrics> = (0..c)
        .map(|k| {
            let support: usize = cm[k].iter().sum();
            let predicted: usize = (0..c).map(|t| cm[t][k]).sum();
            let (p, r) = (ratio(cm[k][k], predicted), ratio(cm[k][k], support));
            ClassMetrics {
                class: classes[k].clone(),
                support,
                predicted,
                precision: p,
                recall: r,
                f1: if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 },
            }
        })
        .collect();
    // Macro-F1 over the classes present in the evaluated rows (scikit-learn's `labels` = the
    // classes of y_true ∪ y_pred).
    let present: Vec<&ClassMetrics> = per_class.iter().filter(|m| m.support > 0 || m.predicted > 0).collect();
    let macro_f1 = present.iter().map(|m| m.f1).sum::<f64>() / present.len().max(1) as f64;
    let top = (0..c).max_by_key(|&k| (per_class[k].predicted, std::cmp::Reverse(k))).unwrap_or(0);
    let share = ratio(per_class[top].predicted, n);
    Ok(Metrics {
        rows: n,
        accuracy: ratio(correct, n),
        macro_f1,
        majority_baseline: ratio(truth.iter().filter(|&&t| t as usize == majority).count(), n),
        majority_class: classes[majority].clone(),
        per_class,
        confusion: cm,
        top_predicted: classes[top].clone(),
        top_predicted_share: share,
        collapsed: c > 1 && share >= COLLAPSE_SHARE,
    })
}

/// The most frequent class of `labels[rows]` (the lowest index on a tie).
pub fn majority(labels: &[u32], rows: &[u32], classes: usize) -> usize {
    let mut count = vec![0usize; classes];
    for &r in rows {
        count[labels[r as usize] as usize] += 1;
    }
    (0..classes).max_by_key(|&k| (count[k], std::cmp::Reverse(k))).unwrap_or(0)
}

/// The collapse warning line, or None.
pub fn collapse_warning(m: &Metrics) -> Option<String> {
    m.collapsed.then(|| {
        format!(
            "COLLAPSE: the head predicts `{}` for {:.1}% of the {} rows (≥ {:.0}%); accuracy {:.1}% against a majority-class baseline of {:.1}%: it has learnt the class prior, not the property",
            m.top_predicted,
            100.0 * m.top_predicted_share,
            m.rows,
            100.0 * COLLAPSE_SHARE,
            100.0 * m.accuracy,
            100.0 * m.majority_baseline
        )
    })
}

/// The report as markdown: headline, warning, per-class table, confusion matrix.
pub fn markdown(title: &str, m: &Metrics) -> String {
    let mut s = format!("## {title}\n\n");
    if let Some(w) = collapse_warning(m) {
        s += &format!("> **WARNING** {w}\n\n");
    }
    s += &format!(
        "| rows | accuracy | majority baseline | macro-F1 | most predicted |\n|---|---|---|---|---|\n| {} | {:.1}% | {:.1}% (always `{}`) | {:.3} | `{}` ({:.1}%) |\n\n",
        m.rows,
        100.0 * m.accuracy,
        100.0 * m.majority_baseline,
        m.majority_class,
        m.macro_f1,
        m.top_predicted,
        100.0 * m.top_predicted_share
    );
    s += "| class | support | predicted | precision | recall | F1 |\n|---|---|---|---|---|---|\n";
    for c in &m.per_class {
        s += &format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} |\n",
            c.class, c.support, c.predicted, c.precision, c.recall, c.f1
        );
    }
    s += "\nConfusion matrix (rows: true class, columns: predicted)\n\n| true \\ pred |";
    for c in &m.per_class {
        s += &format!(" {} |", c.class);
    }
    s += "\n|---|";
    s += &"---|".repeat(m.per_class.len());
    s += "\n";
    for (k, row) in m.confusion.iter().enumerate() {
        s += &format!("| {} |", m.per_class[k].class);
        for v in row {
            s += &format!(" {v} |");
        }
        s += "\n";
    }
    s
}

/// The confusion matrix as a PNG heat map (row-normalised shading, counts printed).
pub fn confusion_png(m: &Metrics, title: &str) -> Result<Vec<u8>> {
    let font = crate::env::som::font().map_err(|e| anyhow::anyhow!(e))?;
    let c = m.confusion.len();
    let cell = (480 / c.max(1)).clamp(14, 60) as u32;
    let (l, t) = (150u32, 40u32);
    let (w, h) = (l + cell * c as u32 + 20, t + cell * c as u32 + 130);
    let mut img = RgbaImage::from_pixel(w, h, Rgba([255, 255, 255, 255]));
    crate::env::som::draw_text(&mut img, font, 14.0, 10.0, 10.0, title, [0, 0, 0]);
    let fs = (cell as f32 * 0.45).clamp(8.0, 14.0);
    for (i, row) in m.confusion.iter().enumerate() {
        let total: usize = row.iter().sum();
        for (j, &v) in row.iter().enumerate() {
            let f = if total == 0 { 0.0 } else { v as f32 / total as f32 };
            let shade = (255.0 * (1.0 - f)) as u8;
            let colour = Rgba([shade, shade, 255, 255]);
            for y in 0..cell - 1 {
                for x in 0..cell - 1 {
                    img.put_pixel(l + j as u32 * cell + x, t + i as u32 * cell + y, colour);
                }
            }
            if v > 0 && cell >= 18 {
                let ink = if f > 0.5 { [255, 255, 255] } else { [0, 0, 0] };
                let (x, y) = ((l + j as u32 * cell) as f32 + 2.0, (t + i as u32 * cell) as f32 + cell as f32 * 0.3);
                crate::env::som::draw_text(&mut img, font, fs, x, y, &v.to_string(), ink);
            }
        }
        let name: String = m.per_class[i].class.chars().take(20).collect();
        let y = (t + i as u32 * cell) as f32 + cell as f32 * 0.3;
        crate::env::som::draw_text(&mut img, font, fs, 4.0, y, &name, [0, 0, 0]);
    }
    let foot = format!(
        "rows: true, columns: predicted. accuracy {:.1}%, majority baseline {:.1}%",
        100.0 * m.accuracy,
        100.0 * m.majority_baseline
    );
    crate::env::som::draw_text(&mut img, font, 12.0, 10.0, (t + cell * c as u32 + 10) as f32, &foot, [0, 0, 0]);
    if let Some(_w) = collapse_warning(m) {
        let s = format!(
            "WARNING: collapse, {:.0}% of predictions are `{}`",
            100.0 * m.top_predicted_share,
            m.top_predicted
        );
        crate::env::som::draw_text(&mut img, font, 12.0, 10.0, (t + cell * c as u32 + 30) as f32, &s, [200, 0, 0]);
    }
    let mut buf = Vec::new();
    image::DynamicImage::ImageRgba8(img).write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)?;
    Ok(buf)
}

/// Which rows of a head's split to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Train,
    Val,
    Test,
    All,
}

impl std::str::FromStr for Which {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "train" => Which::Train,
            "val" => Which::Val,
            "test" => Which::Test,
            "all" => Which::All,
            o => bail!("--split {o}: expected train, val, test or all"),
        })
    }
}

pub fn rows_of(split: &Split, which: Which, n: usize) -> Vec<u32> {
    match which {
        Which::Train => split.train.clone(),
        Which::Val => split.val.clone(),
        Which::Test => split.test.clone(),
        Which::All => (0..n as u32).collect(),
    }
}

/// Evaluates `head` on the rows `which` of `features` (the baseline is the majority class of the
/// head's training rows).
pub fn evaluate(head: &Head, features: &FeatureSet, which: Which) -> Result<Metrics> {
    let point = head.point()?;
    if features.manifest.classes != head.meta.classes {
        bail!(
            "{}: classes {:?} differ from the head's {:?} (another dataset?)",
            features.dir.display(),
            features.manifest.classes,
            head.meta.classes
        );
    }
    let (x, labels) = features.load(point)?;
    let rows = rows_of(&head.split, which, labels.len());
    if rows.is_empty() {
        bail!("the {which:?} split of this head is empty; evaluate another (--split)");
    }
    if let Some(&r) = rows.iter().find(|&&r| r as usize >= labels.len()) {
        bail!(
            "the head's split names row {r}, {} has {} rows (another features directory?)",
            features.dir.display(),
            labels.len()
        );
    }
    let idx = candle_core::Tensor::from_vec(rows.clone(), rows.len(), x.device())?;
    let pred = head.predict_tensor(&x.index_select(&idx, 0)?)?;
    let truth: Vec<u32> = rows.iter().map(|&r| labels[r as usize]).collect();
    let maj = majority(&labels, &head.split.train, head.num_classes());
    metrics(&truth, &pred, &head.meta.classes, maj)
}

/// The head metadata a features directory gives (the training fields are filled by `train`).
pub fn base_meta(features: &FeatureSet, point: &str) -> HeadMeta {
    let m = &features.manifest;
    HeadMeta {
        head: super::HeadKind::Linear,
        classes: m.classes.clone(),
        hook_point: point.to_string(),
        pool: m.pool,
        chat: m.chat,
        hidden_size: m.hidden_size,
        num_layers: m.num_layers,
        model: m.model.clone(),
        checkpoint: m.checkpoint.clone(),
        weights_hash: m.weights_hash.clone(),
        adapter: m.adapter.clone(),
        features: features.dir.display().to_string(),
        mean_resid_norm: 0.0,
        train: serde_json::Value::Null,
        best_epoch: 0,
        best_val_loss: None,
        epochs_run: 0,
        created: crate::steering::vector::now(),
    }
}

/// One layer of a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    pub hook_point: String,
    pub test: Metrics,
    pub best_epoch: usize,
    pub seconds_per_epoch: f64,
}

/// Trains and evaluates (test split) one head per hook point of `features` in `points`; with
/// `heads`, saves each head there as `<hook point>.safetensors` (for `eval`, `vector from-probe`
/// and the scikit-learn peer, which reads their splits).
pub fn sweep(
    features: &FeatureSet,
    points: &[String],
    cfg: &TrainConfig,
    heads: Option<&std::path::Path>,
) -> Result<Vec<SweepRow>> {
    let mut out = Vec::new();
    let pb = crate::interp::progress(points.len() as u64, "probe sweep");
    for p in points {
        let point = features.point(p)?;
        let (x, labels) = features.load(point)?;
        let (head, rep) = train::train(&x, &labels, cfg, base_meta(features, &point.to_string()))?;
        let m = evaluate(&head, features, Which::Test)?;
        if let Some(dir) = heads {
            std::fs::create_dir_all(dir)?;
            head.save(&dir.join(format!("{point}.safetensors")))?;
        }
        if let Some(w) = collapse_warning(&m) {
            tracing::warn!("{point}: {w}");
        }
        tracing::info!(
            "{point}: test accuracy {:.1}% (majority {:.1}%), macro-F1 {:.3}, best epoch {}",
            100.0 * m.accuracy,
            100.0 * m.majority_baseline,
            m.macro_f1,
            rep.best_epoch
        );
        out.push(SweepRow {
            hook_point: point.to_string(),
            test: m,
            best_epoch: rep.best_epoch,
            seconds_per_epoch: rep.seconds_per_epoch,
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(out)
}

pub fn sweep_markdown(rows: &[SweepRow]) -> String {
    let mut s = String::from(
        "| hook point | test accuracy | majority baseline | macro-F1 | most predicted (share) | best epoch | s/epoch |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let m = &r.test;
        s += &format!(
            "| {} | {:.1}% | {:.1}% | {:.3} | `{}` ({:.0}%){} | {} | {:.3} |\n",
            r.hook_point,
            100.0 * m.accuracy,
            100.0 * m.majority_baseline,
            m.macro_f1,
            m.top_predicted,
            100.0 * m.top_predicted_share,
            if m.collapsed { " **COLLAPSE**" } else { "" },
            r.best_epoch,
            r.seconds_per_epoch
        );
    }
    s
}

pub fn sweep_csv(rows: &[SweepRow]) -> String {
    let mut s = String::from("hook_point,test_rows,accuracy,majority_baseline,macro_f1,top_predicted_share,collapsed,best_epoch,seconds_per_epoch\n");
    for r in rows {
        let m = &r.test;
        s += &format!(
            "{},{},{},{},{},{},{},{},{}\n",
            r.hook_point,
            m.rows,
            m.accuracy,
            m.majority_baseline,
            m.macro_f1,
            m.top_predicted_share,
            m.collapsed,
            r.best_epoch,
            r.seconds_per_epoch
        );
    }
    s
}

pub fn sweep_png(rows: &[SweepRow], title: &str) -> Result<Vec<u8>> {
    let x: Vec<String> = rows.iter().map(|r| r.hook_point.clone()).collect();
    let series = vec![
        ("probe accuracy".to_string(), rows.iter().map(|r| Some(r.test.accuracy)).collect()),
        ("macro-F1".to_string(), rows.iter().map(|r| Some(r.test.macro_f1)).collect()),
        ("majority baseline".to_string(), rows.iter().map(|r| Some(r.test.majority_baseline)).collect()),
    ];
    crate::interp::plot::line_plot(title, &x, &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_by_hand() {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let truth = [0, 0, 1, 1, 2, 2];
        let pred = [0, 1, 1, 1, 0, 2];
        let m = metrics(&truth, &pred, &classes, 0).unwrap();
        assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(m.confusion, vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 1]]);
        // a: p 1/2 r 1/2; b: p 2/3 r 1; c: p 1 r 1/2.
        let f = |p: f64, r: f64| 2.0 * p * r / (p + r);
        let want = (f(0.5, 0.5) + f(2.0 / 3.0, 1.0) + f(1.0, 0.5)) / 3.0;
        assert!((m.macro_f1 - want).abs() < 1e-12);
        assert!((m.majority_baseline - 2.0 / 6.0).abs() < 1e-12);
        assert!(!m.collapsed && collapse_warning(&m).is_none());
        let md = markdown("t", &m);
        assert!(md.contains("| a | 1 | 1 | 0 |") && md.contains("33.3% (always `a`)"), "{md}");
        // Everything predicted `b`: collapse, reported loudly.
        let m = metrics(&truth, &[1; 6], &classes, 1).unwrap();
        assert!(m.collapsed);
        assert!(markdown("t", &m).contains("**WARNING** COLLAPSE: the head predicts `b` for 100.0%"));
        assert!(confusion_png(&m, "t").unwrap().starts_with(b"\x89PNG"));
    }

    #[test]
    fn majority_of_rows() {
        assert_eq!(majority(&[2, 1, 1, 2, 2], &[0, 1, 2], 3), 1);
        assert_eq!(majority(&[2, 1, 1, 2, 2], &[0, 1, 2, 3, 4], 3), 2);
    }
}
