//! The expanded episode plan, seeds and sharding (DESIGN.md §7).
//!
//! A run's plan is the list of (task, seed) items, task-major in the order the tasks were given,
//! seeds `seed, seed+1, …, seed+eval_steps−1` for every task; each item carries one episode per
//! condition (the baseline and one steered episode per coefficient). Sharding splits items, never
//! the conditions of one item (they share a generation batch): shard `i/n` takes the items whose
//! index is `i mod n`. The shards of a plan are disjoint and together are exactly the plan.
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

/// Training seeds are drawn from `[TRAIN_SEED_MIN, TRAIN_SEED_MAX)`; evaluation seeds must stay
/// below `TRAIN_SEED_MIN`, so the two never overlap.
pub const TRAIN_SEED_MIN: u64 = 1 << 32;
pub const TRAIN_SEED_MAX: u64 = 1 << 40;

/// `i/n`: this process runs shard `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    pub fn parse(s: &str) -> Result<Shard> {
        let (i, n) = s.split_once('/').with_context(|| format!("--shard {s}: expected i/n, e.g. 0/4"))?;
        let index: usize = i.trim().parse().with_context(|| format!("--shard {s}: `{i}` is not a number"))?;
        let count: usize = n.trim().parse().with_context(|| format!("--shard {s}: `{n}` is not a number"))?;
        if count == 0 || index >= count {
            bail!("--shard {s}: need 0 <= i < n");
        }
        Ok(Shard { index, count })
    }

    /// `--shard` when given, else Slurm's `SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT` when
    /// both are set, else the whole plan.
    pub fn resolve(flag: Option<&str>) -> Result<Shard> {
        if let Some(s) = flag {
            return Shard::parse(s);
        }
        match (std::env::var("SLURM_ARRAY_TASK_ID"), std::env::var("SLURM_ARRAY_TASK_COUNT")) {
            (Ok(i), Ok(n)) => {
                let min: usize = std::env::var("SLURM_ARRAY_TASK_MIN").ok().and_then(|m| m.parse().ok()).unwrap_or(0);
                let i: usize = i.trim().parse().context("SLURM_ARRAY_TASK_ID is not a number")?;
                Shard::parse(&format!("{}/{}", i.saturating_sub(min), n.trim()))
                    .context("from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT")
            }
            _ => Ok(Shard::ALL),
        }
    }

    pub fn contains(&self, item_index: usize) -> bool {
        item_index % self.count == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// One (task, seed) of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Item {
    pub index: usize,
    pub task: String,
    pub seed: u64,
}

/// Evaluation items for `tasks` × `eval_steps` seeds starting at `seed`.
pub fn expand(tasks: &[String], eval_steps: usize, seed: u64) -> Result<Vec<Item>> {
    if seed.checked_add(eval_steps as u64).is_none_or(|end| end > TRAIN_SEED_MIN) {
        bail!("--seed {seed} with --eval-steps {eval_steps}: evaluation seeds must stay below {TRAIN_SEED_MIN}");
    }
    let mut out = Vec::with_capacity(tasks.len() * eval_steps);
    for t in tasks {
        for k in 0..eval_steps {
            out.push(Item { index: out.len(), task: t.clone(), seed: seed + k as u64 });
        }
    }
    Ok(out)
}

/// The items of one shard, in plan order.
pub fn shard(items: &[Item], s: Shard) -> Vec<Item> {
    items.iter().filter(|it| s.contains(it.index)).cloned().collect()
}

/// `n` training (task, seed) draws from a RNG seeded with `seed`: tasks uniformly from `tasks`,
/// seeds in `[TRAIN_SEED_MIN, TRAIN_SEED_MAX)` (disjoint from every evaluation seed), no repeats.
pub fn training_items(tasks: &[String], n: usize, seed: u64) -> Vec<(String, u64)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x7472_6169_6e5f_7365);
    let mut out: Vec<(String, u64)> = Vec::with_capacity(n);
    if tasks.is_empty() {
        return out;
    }
    while out.len() < n {
        let t = tasks[rng.random_range(0..tasks.len())].clone();
        let s = rng.random_range(TRAIN_SEED_MIN..TRAIN_SEED_MAX);
        if !out.iter().any(|(a, b)| *a == t && *b == s) {
            out.push((t, s));
        }
    }
    out
}

/// A seed plan (`run --plan FILE`): JSONL of `{"task": …, "seed": …, "split": "train"|"eval"}`,
/// replacing the built-in seed ranges for both the vector's training episodes and the evaluation,
/// in file order, so a run can replay exactly the episodes another harness drew.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedPlan {
    /// sha256 prefix of the file's bytes (in the vector source of result lines).
    pub hash: String,
    pub train: Vec<(String, u64)>,
    pub eval: Vec<(String, u64)>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanLine {
    task: String,
    seed: u64,
    split: String,
}

impl SeedPlan {
    /// Reads and checks a plan: every line names a known task (`known`), a seed the page can
    /// take and a split; no (task, seed) twice in one split. Errors name the file and the line.
    pub fn read(path: &std::path::Path, known: impl Fn(&str) -> bool) -> Result<SeedPlan> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading --plan {}", path.display()))?;
        let mut plan = SeedPlan { hash: miniwob_steer_schema::hash16(&text), train: Vec::new(), eval: Vec::new() };
        for (i, line) in text.lines().enumerate() {
            let at = || format!("{} line {}", path.display(), i + 1);
            if line.trim().is_empty() {
                continue;
            }
            let l: PlanLine = serde_json::from_str(line).with_context(|| {
                format!("{}: expected {{\"task\": …, \"seed\": …, \"split\": \"train\"|\"eval\"}}", at())
            })?;
            if !known(&l.task) {
                bail!("{}: unknown task `{}`", at(), l.task);
            }
            if l.seed > crate::env::session::MAX_SEED {
                bail!(
                    "{}: seed {} is above {} (the largest exact JavaScript integer)",
                    at(),
                    l.seed,
                    crate::env::session::MAX_SEED
                );
            }
            let split = match l.split.as_str() {
                "train" => &mut plan.train,
                "eval" => &mut plan.eval,
                s => bail!("{}: split {s:?}: expected \"train\" or \"eval\"", at()),
            };
            if split.iter().any(|(t, s)| *t == l.task && *s == l.seed) {
                bail!("{}: {} seed {} is already in the {} split", at(), l.task, l.seed, l.split);
            }
            split.push((l.task, l.seed));
        }
        if plan.eval.is_empty() {
            bail!("--plan {}: no \"eval\" line", path.display());
        }
        Ok(plan)
    }

    /// The evaluation items, in file order.
    pub fn eval_items(&self) -> Vec<Item> {
        self.eval
            .iter()
            .enumerate()
            .map(|(index, (task, seed))| Item { index, task: task.clone(), seed: *seed })
            .collect()
    }

    /// The evaluation tasks in order of first appearance.
    pub fn tasks(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (t, _) in &self.eval {
            if !out.contains(t) {
                out.push(t.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("task-{i}")).collect()
    }

    #[test]
    fn shards_partition_the_plan() {
        let plan = expand(&tasks(7), 5, 100).unwrap();
        assert_eq!(plan.len(), 35);
        for n in 1..=6 {
            let mut all: Vec<Item> = (0..n).flat_map(|i| shard(&plan, Shard { index: i, count: n })).collect();
            all.sort_by_key(|it| it.index);
            assert_eq!(all, plan, "n = {n}");
        }
        // Deterministic.
        assert_eq!(shard(&plan, Shard::parse("1/3").unwrap()), shard(&plan, Shard::parse("1/3").unwrap()));
    }

    #[test]
    fn shard_parsing() {
        assert_eq!(Shard::parse("2/3").unwrap(), Shard { index: 2, count: 3 });
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seeds_are_disjoint() {
        let plan = expand(&tasks(3), 10, 0).unwrap();
        let train = training_items(&tasks(3), 50, 0);
        assert_eq!(train.len(), 50);
        assert!(train.iter().all(|(_, s)| *s >= TRAIN_SEED_MIN));
        assert!(plan.iter().all(|it| it.seed < TRAIN_SEED_MIN));
        assert_eq!(train, training_items(&tasks(3), 50, 0));
        assert_ne!(train, training_items(&tasks(3), 50, 1));
        assert!(expand(&tasks(1), 10, TRAIN_SEED_MIN - 5).is_err());
    }

    #[test]
    fn seed_plans_replay_in_order_and_name_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("plan.jsonl");
        let known = |t: &str| t.starts_with("click-");
        std::fs::write(
            &p,
            "{\"task\": \"click-b\", \"seed\": 9, \"split\": \"eval\"}\n\n\
             {\"task\": \"click-a\", \"seed\": 3, \"split\": \"train\"}\n\
             {\"task\": \"click-a\", \"seed\": 1, \"split\": \"eval\"}\n",
        )
        .unwrap();
        let plan = SeedPlan::read(&p, known).unwrap();
        assert_eq!(plan.train, vec![("click-a".to_string(), 3)]);
        let items = plan.eval_items();
        assert_eq!((items[0].task.as_str(), items[0].seed, items[1].seed, items[1].index), ("click-b", 9, 1, 1));
        assert_eq!(plan.tasks(), vec!["click-b", "click-a"]);
        for (line, want) in [
            ("{\"task\": \"nope\", \"seed\": 1, \"split\": \"eval\"}", "line 2: unknown task `nope`"),
            ("{\"task\": \"click-a\", \"split\": \"eval\"}", "line 2"),
            ("{\"task\": \"click-a\", \"seed\": 1, \"split\": \"test\"}", "line 2: split \"test\""),
            ("{\"task\": \"click-b\", \"seed\": 9, \"split\": \"eval\"}", "line 2: click-b seed 9 is already"),
            ("{\"task\": \"click-a\", \"seed\": 1, \"split\": \"eval\", \"x\": 1}", "line 2"),
        ] {
            std::fs::write(&p, format!("{{\"task\": \"click-b\", \"seed\": 9, \"split\": \"eval\"}}\n{line}\n"))
                .unwrap();
            let e = format!("{:#}", SeedPlan::read(&p, known).unwrap_err());
            assert!(e.contains(want) && e.contains("plan.jsonl"), "{line}: {e}");
        }
        std::fs::write(&p, "{\"task\": \"click-a\", \"seed\": 1, \"split\": \"train\"}\n").unwrap();
        assert!(SeedPlan::read(&p, known).unwrap_err().to_string().contains("no \"eval\" line"));
    }
}
