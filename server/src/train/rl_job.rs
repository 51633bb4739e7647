//! An online-RL job's glue between the runner (`jobs`) and the loop (`rl`): its grader
//! compiled against the job's prompt rows, and the serving engine as its sampler.

use std::{collections::HashMap, sync::Arc};

use super::{
    dataset::Tokenized,
    graders::{self, Grader, Resources, RewardScorer},
    ppo,
    rl::{self, RlContext},
    rollouts::EngineRollouts,
    trainer::{Control, Objective, Outcome, TrainError, TrainEvent, TrainSpec},
};
use crate::{
    engine::{constraint::Grammars, EngineHandle},
    model::BaseModel,
};

/// An online objective's grader compiled, its row references checked against every row
/// of `sets`; the error is (the request's field, why).
pub fn grader(
    objective: &Objective,
    sets: &[&[Tokenized]],
    engine: Option<&EngineHandle>,
    reward_models: &HashMap<String, Arc<dyn RewardScorer>>,
) -> Result<Option<Grader>, (String, String)> {
    let Some((spec, _)) = objective.grader() else {
        return Ok(None);
    };
    let field = format!("{}.grader", objective.name());
    let empty = serde_json::Map::new();
    let rows: Vec<&serde_json::Map<String, serde_json::Value>> = sets
        .iter()
        .flat_map(|s| s.iter())
        .map(|t| t.fields.as_deref().unwrap_or(&empty))
        .collect();
    let grammars = || -> Result<Arc<Grammars>, String> {
        engine
            .ok_or_else(|| "the serving engine is not running".to_string())?
            .grammars()
    };
    let res = Resources {
        grammars: &grammars,
        reward_models,
    };
    graders::compile(spec, &field, &rows, &res).map(Some)
}

/// Runs a GRPO job (on the training thread): the policy's rollouts are sampled by
/// `engine` under the job's tenant, as `name`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &BaseModel,
    spec: &TrainSpec,
    engine: &EngineHandle,
    tenant: &str,
    name: &str,
    train: &[Tokenized],
    eval: &[Tokenized],
    dir: &std::path::Path,
    ctl: &Control,
    reward_models: &HashMap<String, Arc<dyn RewardScorer>>,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome, TrainError> {
    let grader = grader(&spec.objective, &[train, eval], Some(engine), reward_models)
        .map_err(|(f, e)| TrainError::Label(format!("{f}: {e}")))?
        .ok_or_else(|| TrainError::Label("no grader".into()))?;
    let rollouts = EngineRollouts {
        engine: engine.clone(),
        tenant: tenant.into(),
        name: name.into(),
    };
    let cx = RlContext {
        grader: &grader,
        rollouts: &rollouts,
    };
    match &spec.objective {
        Objective::Grpo(s) => rl::train_grpo(model, spec, s, &cx, train, eval, dir, ctl, emit),
        Objective::Ppo(s) => ppo::train_ppo(model, spec, s, &cx, train, eval, dir, ctl, emit),
        other => Err(TrainError::Label(format!(
            "{} is not an online objective",
            other.name()
        ))),
    }
}
