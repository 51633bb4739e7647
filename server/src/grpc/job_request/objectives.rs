//! A job's objective from the request: its settings (DPO, GRPO, PPO) and graders, and an
//! offline job's eval grader, each defaulted and checked (INVALID_ARGUMENT naming the
//! field).

use super::*;

/// An offline job's graded evaluation with its defaults (greedy, 64 new tokens).
pub(super) fn eval_grader_from(
    e: Option<&pb::EvalGrader>,
    objective: &Objective,
    method: &MethodSpec,
) -> Result<Option<EvalGrader>, ApiError> {
    let Some(e) = e else { return Ok(None) };
    if matches!(method, MethodSpec::Full(_)) {
        return Err(ApiError::invalid(
            "eval_grader",
            "a full fine-tuning job's model is not sampled while it trains; grade the result once it is served",
        ));
    }
    if !matches!(objective, Objective::Sft | Objective::Dpo(_)) {
        let why = if objective.online() {
            format!(
                "a {0} job is evaluated by its own grader ({0}.grader)",
                objective.name()
            )
        } else {
            format!("a {} job does not generate", objective.name())
        };
        return Err(ApiError::invalid("eval_grader", why));
    }
    let temperature = e.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "eval_grader.temperature",
            format!("{temperature} is outside [0, 2] (0: greedy)"),
        ));
    }
    Ok(Some(EvalGrader {
        grader: grader_spec(e.grader.as_ref(), "eval_grader.grader")?,
        temperature,
        max_new_tokens: new_tokens_bound(e.max_new_tokens, "eval_grader.max_new_tokens")?,
    }))
}

/// The objective a request names; a classification job's labels are checked here for
/// themselves (count, length, duplicates) and against the data when the job is created.
pub(super) fn objective_from(req: &pb::CreateJobRequest) -> Result<Objective, ApiError> {
    let name = match req.objective.as_str() {
        "" => "sft",
        o => o,
    };
    for (given, field) in [
        (req.classification.is_some(), "classification"),
        (req.reward_model.is_some(), "reward_model"),
        (req.dpo.is_some(), "dpo"),
        (req.grpo.is_some(), "grpo"),
        (req.ppo.is_some(), "ppo"),
    ] {
        if given && field != name {
            return Err(ApiError::invalid(
                field,
                format!("settings of the {field} objective given, but the objective is {name}"),
            ));
        }
    }
    match name {
        "sft" => Ok(Objective::Sft),
        "classification" => Ok(Objective::Classification {
            labels: req
                .classification
                .as_ref()
                .map(|c| c.labels.clone())
                .unwrap_or_default(),
        }),
        "reward_model" => {
            let c = req
                .reward_model
                .as_ref()
                .and_then(|r| r.center_rewards_coefficient)
                .unwrap_or(0.0);
            if !(0.0..=1.0).contains(&c) {
                return Err(ApiError::invalid(
                    "reward_model.center_rewards_coefficient",
                    format!("{c} is outside [0, 1]"),
                ));
            }
            Ok(Objective::RewardModel {
                center_rewards_coefficient: c,
            })
        }
        "dpo" => {
            let d = req.dpo.clone().unwrap_or_default();
            Ok(Objective::Dpo(dpo_settings(
                d.beta,
                &d.loss_type,
                d.label_smoothing,
                "dpo.",
            )?))
        }
        "grpo" => Ok(Objective::Grpo(grpo_settings(
            req.grpo.as_ref().ok_or_else(|| {
                ApiError::invalid("grpo.grader", "the grpo objective needs a grader")
            })?,
        )?)),
        "ppo" => Ok(Objective::Ppo(ppo_settings(req.ppo.as_ref().ok_or_else(
            || ApiError::invalid("ppo.grader", "the ppo objective needs a grader"),
        )?)?)),
        o => Err(ApiError::invalid(
            "objective",
            format!("{o:?}; expected sft, classification, reward_model, dpo, grpo or ppo"),
        )),
    }
}

/// GRPO's settings with their defaults; the grader's references are checked against the
/// data when the job is created.
fn grpo_settings(g: &pb::GrpoObjective) -> Result<GrpoSettings, ApiError> {
    let num_generations = g.num_generations.unwrap_or(8);
    if !(2..=64).contains(&num_generations) {
        return Err(ApiError::invalid(
            "grpo.num_generations",
            format!("{num_generations}; give 2 to 64 (advantages compare completions of a prompt)"),
        ));
    }
    let beta = g.beta.unwrap_or(0.0);
    if !(0.0..=10.0).contains(&beta) {
        return Err(ApiError::invalid(
            "grpo.beta",
            format!("{beta} is outside [0, 10]"),
        ));
    }
    let epsilon = g.epsilon.unwrap_or(0.2);
    if !(epsilon > 0.0 && epsilon < 1.0) {
        return Err(ApiError::invalid(
            "grpo.epsilon",
            format!("{epsilon} is outside (0, 1)"),
        ));
    }
    let num_iterations = g.num_iterations.unwrap_or(1);
    if !(1..=8).contains(&num_iterations) {
        return Err(ApiError::invalid(
            "grpo.num_iterations",
            format!("{num_iterations}; give 1 to 8"),
        ));
    }
    let (temperature, top_p, max_new_tokens) =
        rollout_sampling(g.temperature, g.top_p, g.max_new_tokens, "grpo.")?;
    let grader = grader_spec(g.grader.as_ref(), "grpo.grader")?;
    let advantage = match g.advantage.as_str() {
        "" | "group" => Advantage::Group,
        "rloo" => Advantage::Rloo,
        other => {
            return Err(ApiError::invalid(
                "grpo.advantage",
                format!("{other:?}; expected group or rloo"),
            ))
        }
    };
    Ok(GrpoSettings {
        num_generations: num_generations as usize,
        beta,
        epsilon,
        num_iterations: num_iterations as usize,
        advantage,
        temperature,
        top_p,
        max_new_tokens,
        grader,
    })
}

/// `value` (default `default`) when within `[lo, hi]`, else INVALID_ARGUMENT naming
/// `field`.
fn bounded(
    value: Option<f64>,
    default: f64,
    lo: f64,
    hi: f64,
    field: &str,
) -> Result<f64, ApiError> {
    let v = value.unwrap_or(default);
    if !(lo..=hi).contains(&v) {
        return Err(ApiError::invalid(
            field,
            format!("{v} is outside [{lo}, {hi}]"),
        ));
    }
    Ok(v)
}

/// PPO's settings with their defaults (TRL's).
fn ppo_settings(p: &pb::PpoObjective) -> Result<PpoSettings, ApiError> {
    let positive = |v: Option<f64>, d: f64, hi: f64, f: &str| {
        let v = bounded(v, d, 0.0, hi, f)?;
        if v == 0.0 {
            return Err(ApiError::invalid(f, "must be > 0"));
        }
        Ok(v)
    };
    let target_kl = match p.target_kl {
        None => None,
        Some(t) => Some(positive(Some(t), 0.0, 100.0, "ppo.target_kl")?),
    };
    let ppo_epochs = p.ppo_epochs.unwrap_or(4);
    if !(1..=16).contains(&ppo_epochs) {
        return Err(ApiError::invalid(
            "ppo.ppo_epochs",
            format!("{ppo_epochs}; give 1 to 16"),
        ));
    }
    let num_mini_batches = p.num_mini_batches.unwrap_or(1);
    if !(1..=64).contains(&num_mini_batches) {
        return Err(ApiError::invalid(
            "ppo.num_mini_batches",
            format!("{num_mini_batches}; give 1 to 64"),
        ));
    }
    let (temperature, top_p, max_new_tokens) =
        rollout_sampling(p.temperature, p.top_p, p.max_new_tokens, "ppo.")?;
    Ok(PpoSettings {
        kl_coef: bounded(p.kl_coef, 0.05, 0.0, 10.0, "ppo.kl_coef")?,
        target_kl,
        gamma: bounded(p.gamma, 1.0, 0.0, 1.0, "ppo.gamma")?,
        lam: bounded(p.lam, 0.95, 0.0, 1.0, "ppo.lam")?,
        cliprange: positive(p.cliprange, 0.2, 1.0, "ppo.cliprange")?,
        cliprange_value: positive(p.cliprange_value, 0.2, 1.0, "ppo.cliprange_value")?,
        vf_coef: bounded(p.vf_coef, 0.1, 0.0, 10.0, "ppo.vf_coef")?,
        ppo_epochs: ppo_epochs as usize,
        num_mini_batches: num_mini_batches as usize,
        whiten_advantages: p.whiten_advantages.unwrap_or(true),
        missing_eos_penalty: bounded(
            p.missing_eos_penalty,
            0.0,
            0.0,
            10.0,
            "ppo.missing_eos_penalty",
        )?,
        temperature,
        top_p,
        max_new_tokens,
        grader: grader_spec(p.grader.as_ref(), "ppo.grader")?,
    })
}

/// Rollout sampling's (temperature, top_p, max_new_tokens) with their defaults (1, 1, 64).
fn rollout_sampling(
    temperature: Option<f32>,
    top_p: Option<f32>,
    max_new_tokens: Option<u32>,
    prefix: &str,
) -> Result<(f32, f32, u32), ApiError> {
    let temperature = temperature.unwrap_or(1.0);
    if !(temperature > 0.0 && temperature <= 2.0) {
        return Err(ApiError::invalid(
            format!("{prefix}temperature"),
            format!("{temperature} is outside (0, 2]: rollouts are sampled"),
        ));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("{prefix}top_p"),
            format!("{top_p} is outside (0, 1]"),
        ));
    }
    let max_new_tokens = new_tokens_bound(max_new_tokens, &format!("{prefix}max_new_tokens"))?;
    Ok((temperature, top_p, max_new_tokens))
}

/// A sampled answer's length bound: default 64, at most 1024.
fn new_tokens_bound(n: Option<u32>, field: &str) -> Result<u32, ApiError> {
    let n = n.unwrap_or(64);
    if !(1..=1024).contains(&n) {
        return Err(ApiError::invalid(field, format!("{n}; give 1 to 1024")));
    }
    Ok(n)
}

/// A grader as the domain's spec; only what the wire form cannot say is checked here.
fn grader_spec(g: Option<&pb::Grader>, field: &str) -> Result<GraderSpec, ApiError> {
    use pb::grader::Kind;
    let kind = g.and_then(|g| g.kind.as_ref()).ok_or_else(|| {
        ApiError::invalid(
            field,
            "give one of string_match, regex, json_schema, length, reward_model or weighted",
        )
    })?;
    Ok(match kind {
        Kind::StringMatch(m) => GraderSpec::StringMatch {
            reference: m.reference.clone(),
            case_insensitive: m.case_insensitive,
            contains: m.contains,
        },
        Kind::Regex(r) => GraderSpec::Regex {
            pattern: r.pattern.clone(),
        },
        Kind::JsonSchema(j) => GraderSpec::JsonSchema {
            schema: serde_json::from_str(&j.schema).map_err(|e| {
                ApiError::invalid(format!("{field}.json_schema.schema"), e.to_string())
            })?,
        },
        Kind::Length(l) => GraderSpec::Length {
            min: l.min,
            max: l.max,
            unit: match l.unit.as_str() {
                "" | "words" => LengthUnit::Words,
                "tokens" => LengthUnit::Tokens,
                u => {
                    return Err(ApiError::invalid(
                        format!("{field}.length.unit"),
                        format!("{u:?}; expected words or tokens"),
                    ))
                }
            },
        },
        Kind::RewardModel(r) => {
            if r.adapter.is_empty() {
                return Err(ApiError::invalid(
                    format!("{field}.reward_model.adapter"),
                    "name the reward model",
                ));
            }
            GraderSpec::RewardModel {
                adapter: r.adapter.clone(),
            }
        }
        Kind::Weighted(w) => GraderSpec::Weighted {
            graders: w
                .graders
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    Ok(Weighted {
                        weight: g.weight,
                        grader: grader_spec(
                            g.grader.as_ref(),
                            &format!("{field}.weighted.graders[{i}].grader"),
                        )?,
                    })
                })
                .collect::<Result<_, ApiError>>()?,
        },
    })
}

/// DPO's settings with their defaults (β 0.1, sigmoid loss, no smoothing); `prefix` is
/// where the request keeps them (`dpo.` here, OpenAI's `method.dpo.hyperparameters.`).
pub fn dpo_settings(
    beta: Option<f64>,
    loss_type: &str,
    label_smoothing: Option<f64>,
    prefix: &str,
) -> Result<DpoSettings, ApiError> {
    let beta = beta.unwrap_or(0.1);
    if !(beta > 0.0 && beta <= 10.0) {
        return Err(ApiError::invalid(
            format!("{prefix}beta"),
            format!("{beta} is outside (0, 10]"),
        ));
    }
    let loss_type = DpoLoss::parse(loss_type).ok_or_else(|| {
        ApiError::invalid(
            format!("{prefix}loss_type"),
            format!("{loss_type:?}; expected sigmoid, ipo or hinge"),
        )
    })?;
    let label_smoothing = label_smoothing.unwrap_or(0.0);
    if !(0.0..0.5).contains(&label_smoothing) {
        return Err(ApiError::invalid(
            format!("{prefix}label_smoothing"),
            format!("{label_smoothing} is outside [0, 0.5)"),
        ));
    }
    if label_smoothing > 0.0 && loss_type != DpoLoss::Sigmoid {
        return Err(ApiError::invalid(
            format!("{prefix}label_smoothing"),
            "label smoothing applies to the sigmoid loss only",
        ));
    }
    Ok(DpoSettings {
        beta,
        loss_type,
        label_smoothing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpo_advantage_names_map_to_their_baselines() {
        let grader = Some(pb::Grader {
            kind: Some(pb::grader::Kind::Regex(pb::RegexGrader {
                pattern: "x".into(),
            })),
        });
        for (name, want) in [
            ("", Advantage::Group),
            ("group", Advantage::Group),
            ("rloo", Advantage::Rloo),
        ] {
            let g = grpo_settings(&pb::GrpoObjective {
                advantage: name.into(),
                grader: grader.clone(),
                ..Default::default()
            })
            .expect(name);
            assert_eq!(g.advantage, want, "{name:?}");
        }
    }
}
