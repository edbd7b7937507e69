//! `vector --tasks LIST --train-steps N`: CAA training prompts from MiniWoB episodes, built by the
//! same prompt builder as the runner's evaluation prompts (DESIGN.md §4), so a vector computed
//! here is the one `run` would compute for the same tasks, seeds and pair.
use super::plan;
use super::run::{env_config, runtime, training_observations};
use crate::agent::PromptBuilder;
use crate::env::Pool;
use crate::models::load::LoadedModel;
use crate::steering::pairs::PromptPair;
use anyhow::Result;

/// Tokenized (positive, negative) prompt pairs from `train_steps` training episodes spread over
/// `tasks`, seeds drawn from an RNG seeded with `seed` (disjoint from `run`'s evaluation seeds).
pub fn episode_pairs(
    model: &LoadedModel,
    tasks: &[String],
    train_steps: usize,
    seed: u64,
    pair: &PromptPair,
    concurrency: usize,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    if train_steps == 0 {
        anyhow::bail!("--train-steps 0: a steering vector needs training episodes");
    }
    let items = plan::training_items(tasks, train_steps, seed);
    let obs = runtime()?.block_on(async {
        let pool = Pool::new(concurrency.max(1), env_config()).await?;
        training_observations(&pool, &items).await
    })?;
    tracing::info!(episodes = obs.len(), tasks = tasks.len(), "training observations");
    PromptBuilder::default().caa_pairs(&model.tokenizer, &obs, pair)
}
