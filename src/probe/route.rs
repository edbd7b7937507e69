//! Routing inputs to LoRA adapters with a router head (`probe route`): the head, read on the
//! frozen base model at its hook point and pooling, picks a class for each prompt; the class
//! names an adapter (or none: the base model); every row then generates with its own adapter in
//! one batch (unmerged adapters, [`crate::models::lora`]), each row computing what it would
//! alone.
use super::head::Head;
use crate::models::decoder::Decoder;
use crate::models::generate::{self, GenerateConfig, Generation};
use crate::models::hooks::{Captures, HookPoint, HookSpec};
use crate::models::lora::{self, LoraAdapter};
use anyhow::{bail, Context, Result};

pub struct Router {
    pub head: Head,
    pub point: HookPoint,
    /// Per head class, the adapter it routes to (`None` = the base model).
    pub routes: Vec<Option<u16>>,
    /// Per head class, the adapter's name, or `None`.
    pub names: Vec<Option<String>>,
}

/// One routed prompt.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The head's class (index into its classes).
    pub class: usize,
    /// Its probability.
    pub probability: f32,
    pub adapter: Option<u16>,
    pub generation: Generation,
}

impl Router {
    /// Attaches each `NAME=DIR` adapter to `decoder`; every name must be one of the head's
    /// classes (the router's labels are adapter names). Classes without an adapter run on the
    /// base model.
    pub fn new(head: Head, decoder: &mut Decoder, specs: &[String]) -> Result<Self> {
        if decoder.default_adapter().is_some() {
            bail!("the router reads the base model: load it without --adapter (route adapters go in --adapters)");
        }
        let point = head.point()?;
        let c = head.num_classes();
        let mut routes = vec![None; c];
        let mut names = vec![None; c];
        for spec in specs {
            let (name, dir) = lora::parse_named(spec);
            let class = head
                .class_index(&name)
                .with_context(|| format!("--adapters {spec}: an adapter is named by the router class it serves"))?;
            if routes[class].is_some() {
                bail!("--adapters: two adapters for class `{name}`");
            }
            let a = LoraAdapter::load(&name, &dir, &decoder.cfg, decoder.device(), decoder.dtype())
                .with_context(|| format!("--adapters {spec}"))?;
            routes[class] = Some(decoder.attach_adapter(a)?);
            names[class] = Some(name);
        }
        Ok(Self { head, point, routes, names })
    }

    /// Classifies each prompt (token ids, as the head's features were encoded) and generates
    /// every row with its class's adapter, in one batch.
    pub fn route(&self, decoder: &Decoder, prompts: &[Vec<u32>], cfg: &GenerateConfig) -> Result<Vec<Routed>> {
        let states = generate::prompt_states(decoder, prompts, cfg.pad_id, self.point)?;
        let mut picks = Vec::with_capacity(prompts.len());
        for s in &states {
            let p = self.head.probs_of_states(s, &[])?;
            let class = super::head::argmax(&p);
            picks.push((class, p[class]));
        }
        let adapters: Vec<Option<u16>> = picks.iter().map(|&(c, _)| self.routes[c]).collect();
        let gens = generate::generate_routed(
            decoder,
            prompts,
            Some(&adapters),
            cfg,
            &HookSpec::none(),
            &mut Captures::default(),
        )?;
        Ok(picks
            .into_iter()
            .zip(adapters)
            .zip(gens)
            .map(|(((class, probability), adapter), generation)| Routed { class, probability, adapter, generation })
            .collect())
    }
}
