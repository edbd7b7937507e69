//! The run's summary (counted from the results file), the live counts of the progress bar, and
//! the paired table of `--print-table`.
use super::meta::RunMeta;
use super::plan::Item;
use super::results::{EpisodeLine, ResultsFile};
use super::settings::Settings;
use crate::agent::{Arm, Condition};
use crate::models::prefix_cache::CacheStats;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// Success and parse-failure counts of one condition (one coefficient).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    pub episodes: usize,
    pub successes: usize,
    pub parse_failures: usize,
}

impl Tally {
    pub fn add(&mut self, success: bool, parse_failure: bool) {
        self.episodes += 1;
        self.successes += usize::from(success);
        self.parse_failures += usize::from(parse_failure);
    }
    pub fn rate(&self) -> f64 {
        if self.episodes == 0 {
            0.0
        } else {
            self.successes as f64 / self.episodes as f64
        }
    }
    pub fn pf_rate(&self) -> f64 {
        if self.episodes == 0 {
            0.0
        } else {
            self.parse_failures as f64 / self.episodes as f64
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SteeredSummary {
    pub coeff: f32,
    pub success_rate: f64,
    pub delta: f64,
    pub parse_failure_rate: f64,
    #[serde(flatten)]
    pub tally: Tally,
}

/// The end-of-run summary (printed, and written by `--summary-json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub experiment: String,
    pub model: String,
    pub layer: Option<usize>,
    pub prompt_pair: Option<String>,
    pub vector_method: Option<String>,
    pub shard: String,
    pub out: String,
    pub baseline_success_rate: f64,
    pub baseline_parse_failure_rate: f64,
    pub baseline: Tally,
    pub steered: Vec<SteeredSummary>,
    /// Episodes of this run (shard) in the results file.
    pub episodes: usize,
    /// Episodes run by this invocation (the rest were already there).
    pub new_episodes: usize,
    pub planned_episodes: usize,
    pub failed_pairs: usize,
    pub wall_s: f64,
    /// Seconds of the evaluation phase alone (browsers up and vector ready → last episode).
    pub eval_s: f64,
    /// Rows per generation batch over this invocation (0 when nothing ran).
    pub rows_per_batch: f64,
    /// What the prefix cache served over this invocation's episodes.
    pub prefix_cache: CacheStats,
    /// `run --gate`: steered model turns read by the gate, and how many it steered.
    pub gate_steps: usize,
    pub gate_steps_on: usize,
}

/// Live counts for the progress bar and the summary.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub baseline: Tally,
    pub steered: BTreeMap<String, (f32, Tally)>,
}

impl Counts {
    pub fn add(&mut self, condition: Condition, coeff: f32, success: bool, parse_failure: bool) {
        if condition == Condition::Baseline {
            self.baseline.add(success, parse_failure);
        } else {
            self.steered.entry(format!("{coeff:?}")).or_insert((coeff, Tally::default())).1.add(success, parse_failure);
        }
    }

    pub fn message(&self) -> String {
        let b = &self.baseline;
        let mut s = format!("base {}/{} ({:.0}%)", b.successes, b.episodes, 100.0 * b.rate());
        for (c, t) in self.steered.values() {
            s.push_str(&format!(
                " | α={c} {}/{} ({:.0}%) Δ {:+.1}pp",
                t.successes,
                t.episodes,
                100.0 * t.rate(),
                100.0 * (t.rate() - b.rate())
            ));
        }
        s
    }
}

/// The run's summary, counted from the results file: every line of this run's (shard's) plan
/// and configuration, old and new. `outcome` is (failed pairs, evaluation seconds).
#[allow(clippy::too_many_arguments)]
pub fn summarize(
    s: &Settings,
    meta: &RunMeta,
    items: &[Item],
    arms: &[Arm],
    layer: Option<usize>,
    results: &ResultsFile,
    (failed, eval_s): (usize, f64),
    t_run: Instant,
) -> Result<Summary> {
    let keys: std::collections::HashSet<String> = items
        .iter()
        .flat_map(|it| {
            arms.iter().map(|a| meta.key(&it.task, it.seed, a.condition.name(), a.coeff)).collect::<Vec<_>>()
        })
        .collect();
    let mut c = Counts::default();
    let mut episodes = 0;
    let (mut gate_steps, mut gate_steps_on) = (0, 0);
    for l in &results.lines {
        if keys.contains(&l.key) {
            episodes += 1;
            c.add(l.condition, l.coeff as f32, l.success, l.parse_failure);
            for d in l.gate.iter().flatten() {
                gate_steps += 1;
                gate_steps_on += usize::from(d["on"].as_bool() == Some(true));
            }
        }
    }
    let base_rate = c.baseline.rate();
    Ok(Summary {
        experiment: s.experiment.clone(),
        model: meta.info.name.clone(),
        layer,
        prompt_pair: meta.prompt_pair.clone(),
        vector_method: meta.vector_method.clone(),
        shard: s.shard.to_string(),
        out: s.out.display().to_string(),
        baseline_success_rate: base_rate,
        baseline_parse_failure_rate: c.baseline.pf_rate(),
        baseline: c.baseline.clone(),
        steered: c
            .steered
            .values()
            .map(|(coeff, t)| SteeredSummary {
                coeff: *coeff,
                success_rate: t.rate(),
                delta: t.rate() - base_rate,
                parse_failure_rate: t.pf_rate(),
                tally: t.clone(),
            })
            .collect(),
        episodes,
        new_episodes: results.appended,
        planned_episodes: items.len() * arms.len(),
        failed_pairs: failed,
        wall_s: t_run.elapsed().as_secs_f64(),
        eval_s,
        rows_per_batch: 0.0,
        prefix_cache: CacheStats::default(),
        gate_steps,
        gate_steps_on,
    })
}

/// A markdown table of result files: per (experiment, model, layer, prompt pair, coefficient), the
/// baseline and steered success and parse-failure rates and Δ (no confidence intervals: `analyze`
/// has them).
pub fn print_table(files: &[PathBuf]) -> Result<()> {
    type Group = (String, String, String, String);
    /// (task, seed, success) of each steered episode.
    type Outcomes = Vec<(String, u64, bool)>;
    let mut base: BTreeMap<Group, Tally> = BTreeMap::new();
    let mut steer: BTreeMap<(Group, String), Tally> = BTreeMap::new();
    // Success per (task, seed), for the paired differences behind the Δ interval.
    let mut base_by_ep: BTreeMap<(Group, String, u64), bool> = BTreeMap::new();
    let mut steer_by_ep: BTreeMap<(Group, String), Outcomes> = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let mut skipped: Vec<(usize, String)> = Vec::new();
        let parsed = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).filter_map(|(i, l)| {
            serde_json::from_str::<EpisodeLine>(l).map_err(|e| skipped.push((i + 1, e.to_string()))).ok()
        });
        let parsed: Vec<EpisodeLine> = parsed.collect();
        if !skipped.is_empty() {
            // Never silently: a table of fewer lines than the file holds says so, and why.
            let shown: Vec<String> = skipped.iter().take(5).map(|(n, e)| format!("line {n}: {e}")).collect();
            tracing::warn!(
                "{}: {} lines skipped (not episode results): {}{}",
                f.display(),
                skipped.len(),
                shown.join("; "),
                if skipped.len() > 5 { "; …" } else { "" }
            );
        }
        for l in parsed {
            let g = (
                l.experiment.clone(),
                l.model.clone(),
                l.layer.map_or("-".into(), |x| x.to_string()),
                l.prompt_pair.clone().unwrap_or_else(|| "-".into()),
            );
            if l.condition == Condition::Baseline {
                base_by_ep.insert((g.clone(), l.task.clone(), l.seed), l.success);
                base.entry(g).or_default().add(l.success, l.parse_failure);
            } else {
                let key = (g, format!("{}", l.coeff));
                steer_by_ep.entry(key.clone()).or_default().push((l.task.clone(), l.seed, l.success));
                steer.entry(key).or_default().add(l.success, l.parse_failure);
            }
        }
    }
    println!("| experiment | model | layer | pair | α | n | baseline success | steered success | Δ (pp) | Δ 95% CI (pp, paired) | baseline parse fail | steered parse fail |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    for (g, b) in &base {
        let rows: Vec<_> = steer.iter().filter(|((sg, _), _)| sg == g).collect();
        if rows.is_empty() {
            println!(
                "| {} | {} | {} | {} | - | {} | {} | - | - | - | {} | - |",
                g.0,
                g.1,
                g.2,
                g.3,
                b.episodes,
                pct(b.rate()),
                pct(b.pf_rate())
            );
        }
        for (key @ (_, c), t) in rows {
            let diffs: Vec<f64> = steer_by_ep
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|(task, seed, ok)| {
                    base_by_ep
                        .get(&(g.clone(), task.clone(), *seed))
                        .map(|&b| f64::from(u8::from(*ok)) - f64::from(u8::from(b)))
                })
                .collect();
            let ci =
                paired_ci95(&diffs).map_or("-".into(), |(lo, hi)| format!("[{:+.1}, {:+.1}]", 100.0 * lo, 100.0 * hi));
            println!(
                "| {} | {} | {} | {} | {c} | {} | {} | {} | {:+.1} | {ci} | {} | {} |",
                g.0,
                g.1,
                g.2,
                g.3,
                t.episodes,
                pct(b.rate()),
                pct(t.rate()),
                100.0 * (t.rate() - b.rate()),
                pct(b.pf_rate()),
                pct(t.pf_rate())
            );
        }
    }
    Ok(())
}

/// Normal-approximation 95% interval of the mean paired difference (steered − baseline success
/// on the same task and seed). The `analyze` binary gives bootstrap intervals and McNemar; this
/// is the dependency-free fallback the quick job prints when analyze is not built.
pub fn paired_ci95(diffs: &[f64]) -> Option<(f64, f64)> {
    let n = diffs.len();
    if n < 2 {
        return None;
    }
    let mean = diffs.iter().sum::<f64>() / n as f64;
    let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = 1.96 * (var / n as f64).sqrt();
    Some((mean - half, mean + half))
}

pub fn print_summary(s: &Summary) {
    let mut line = format!(
        "summary: {} {} L{} | baseline {}/{} = {:.1}% (parse failures {:.1}%)",
        s.experiment,
        s.model,
        s.layer.map_or("-".into(), |l| l.to_string()),
        s.baseline.successes,
        s.baseline.episodes,
        100.0 * s.baseline_success_rate,
        100.0 * s.baseline_parse_failure_rate
    );
    for st in &s.steered {
        line.push_str(&format!(
            " | steered α={} {}/{} = {:.1}% (parse failures {:.1}%) Δ {:+.1}pp",
            st.coeff,
            st.tally.successes,
            st.tally.episodes,
            100.0 * st.success_rate,
            100.0 * st.parse_failure_rate,
            100.0 * st.delta
        ));
    }
    if s.gate_steps > 0 {
        line.push_str(&format!(
            " | gate on {}/{} steered steps ({:.1}%)",
            s.gate_steps_on,
            s.gate_steps,
            100.0 * s.gate_steps_on as f64 / s.gate_steps as f64
        ));
    }
    line.push_str(&format!(" | {} episodes ({} new) in {:.1}s → {}", s.episodes, s.new_episodes, s.wall_s, s.out));
    println!("{line}");
}

#[cfg(test)]
mod tests {
    use super::paired_ci95;

    #[test]
    fn paired_interval_is_the_normal_approximation_of_the_mean_difference() {
        // mean 1/6, sample variance 17/30, n 6: half width 1.96 * sqrt(17/180) = 0.60234.
        let (lo, hi) = paired_ci95(&[1.0, 0.0, 0.0, 1.0, -1.0, 0.0]).unwrap();
        assert!((lo - (1.0 / 6.0 - 0.60234)).abs() < 1e-4, "{lo}");
        assert!((hi - (1.0 / 6.0 + 0.60234)).abs() < 1e-4, "{hi}");
        assert_eq!(paired_ci95(&[0.0, 0.0, 0.0]), Some((0.0, 0.0)));
        assert_eq!(paired_ci95(&[1.0]), None);
    }
}
