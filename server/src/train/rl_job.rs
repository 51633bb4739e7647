//! The glue between the runner (`jobs`) and the loops of jobs that sample with the serving
//! engine (online RL, and offline jobs evaluated by a grader): the grader compiled
//! against the job's prompt rows, and the engine as the sampler.

use std::{collections::HashMap, sync::Arc};

use super::{
    dataset::Tokenized,
    graders::{self, EvalGrader, Grader, GraderSpec, Resources, RewardScorer},
    ppo,
    rl::{self, RlContext},
    rollouts::EngineRollouts,
    trainer::{self, Control, Objective, Outcome, TrainError, TrainEvent, TrainSpec},
};
use crate::{
    engine::{constraint::Grammars, EngineHandle},
    model::BaseModel,
};

/// A job's grader ([`job_grader`]) compiled, its row references checked against every
/// row of `sets`; the error is (the request's field, why).
pub fn grader(
    graded: Option<(&GraderSpec, String)>,
    sets: &[&[Tokenized]],
    engine: Option<&EngineHandle>,
    reward_models: &HashMap<String, Arc<dyn RewardScorer>>,
) -> Result<Option<Grader>, (String, String)> {
    let Some((spec, field)) = graded else {
        return Ok(None);
    };
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

/// The grader a job runs and the request's field that gave it: an online objective's, or
/// an offline job's `eval_grader`.
pub fn job_grader<'a>(
    objective: &'a Objective,
    eval_grader: Option<&'a EvalGrader>,
) -> Option<(&'a GraderSpec, String)> {
    match (objective.grader(), eval_grader) {
        (Some((g, _)), _) => Some((g, format!("{}.grader", objective.name()))),
        (None, Some(e)) => Some((&e.grader, "eval_grader.grader".into())),
        (None, None) => None,
    }
}

/// The rows a job's grader reads: an online job's prompts, training and validation; an
/// offline job's validation prompts only (its training rows are answers, not graded).
pub fn graded_rows<'a>(
    objective: &Objective,
    train: &'a [Tokenized],
    eval: &'a [Tokenized],
) -> Vec<&'a [Tokenized]> {
    if objective.online() {
        vec![train, eval]
    } else {
        vec![eval]
    }
}

/// Runs a job that samples with the serving engine (on the training thread): an online
/// objective's rollouts, or an offline job's graded evaluation (`eval_grader`), sampled by
/// `engine` under the job's tenant, as `name`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &BaseModel,
    spec: &TrainSpec,
    eval_grader: Option<&EvalGrader>,
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
    let grader = grader(
        job_grader(&spec.objective, eval_grader),
        &graded_rows(&spec.objective, train, eval),
        Some(engine),
        reward_models,
    )
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
    match (&spec.objective, eval_grader) {
        (Objective::Grpo(s), _) => rl::train_grpo(model, spec, s, &cx, train, eval, dir, ctl, emit),
        (Objective::Ppo(s), _) => ppo::train_ppo(model, spec, s, &cx, train, eval, dir, ctl, emit),
        (_, Some(e)) => {
            let grading = rl::Grading {
                cx,
                params: rl::RolloutParams {
                    temperature: e.temperature,
                    top_p: 1.0,
                    max_new_tokens: e.max_new_tokens,
                },
            };
            trainer::train_graded(model, spec, train, eval, dir, ctl, Some(&grading), emit)
        }
        (other, None) => Err(TrainError::Label(format!(
            "{} is not an online objective",
            other.name()
        ))),
    }
}
