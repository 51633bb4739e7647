//! `graft jobs create`: every `CreateJob` field as a flag, or all of them from a TOML or
//! JSON file (`--config`), flags winning over the file. The server validates and defaults;
//! this only carries what was given. `watch` follows a job with a progress bar.

use clap::Args;
use graft_client::{proto, GraftClient};
use serde::Deserialize;

/// The settings of a training job (each optional: the server fills in defaults).
#[derive(Args, Deserialize, Default, Debug)]
#[serde(default, deny_unknown_fields)]
pub struct JobArgs {
    /// TOML or JSON file with any of these settings (by their flag names, `_` for `-`).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<std::path::PathBuf>,
    /// Training dataset (name of an uploaded dataset).
    #[arg(long)]
    pub dataset: Option<String>,
    /// The result becomes this adapter's next version.
    #[arg(long)]
    pub adapter: Option<String>,
    /// A validation dataset's name.
    #[arg(long)]
    pub validation_dataset: Option<String>,
    /// Fraction of the dataset held out for evaluation, in [0, 0.5).
    #[arg(long)]
    pub validation_split: Option<f64>,
    /// lora (default), ia3, bottleneck, prompt_tuning, p_tuning, prefix_tuning, p_tuning_v2,
    /// full (full fine-tuning: the result is a model), or head (only a classification
    /// head; with --objective classification).
    #[arg(long)]
    pub method: Option<String>,
    /// sft (default), classification (a head trained beside the method on a
    /// {"text", "label"} dataset), reward_model (a scalar head on a preference dataset) or
    /// dpo (on a preference dataset).
    #[arg(long)]
    pub objective: Option<String>,
    /// Reward model: TRL's center_rewards_coefficient (default 0).
    #[arg(long)]
    pub center_rewards_coefficient: Option<f64>,
    /// DPO: the KL weight beta (default 0.1).
    #[arg(long)]
    pub beta: Option<f64>,
    /// DPO: sigmoid (default), ipo or hinge.
    #[arg(long)]
    pub loss_type: Option<String>,
    /// DPO: cDPO's label smoothing in [0, 0.5).
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Continue this LoRA adapter (NAME or NAME@VERSION), e.g. DPO after SFT.
    #[arg(long)]
    pub init_adapter: Option<String>,
    /// GRPO: completions per prompt (default 8).
    #[arg(long)]
    pub num_generations: Option<u32>,
    /// GRPO: group (default: normalised in the prompt's group) or rloo (leave-one-out
    /// baseline).
    #[arg(long)]
    pub advantage: Option<String>,
    /// GRPO and PPO: rollout tokens at most (default 64).
    #[arg(long)]
    pub max_new_tokens: Option<u32>,
    /// GRPO and PPO: rollout sampling temperature (default 1).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// PPO: the KL penalty's weight (default 0.05).
    #[arg(long)]
    pub kl_coef: Option<f64>,
    /// PPO: adapt the KL weight towards this KL per completion.
    #[arg(long)]
    pub target_kl: Option<f64>,
    /// PPO: passes over each batch of rollouts (default 4).
    #[arg(long)]
    pub ppo_epochs: Option<u32>,
    /// GRPO and PPO: the grader as JSON, e.g. {"type": "string_match", "reference":
    /// "{{row.answer}}", "contains": true}; types string_match, regex (pattern),
    /// json_schema (schema), length (min, max, unit words|tokens), reward_model (adapter),
    /// weighted (graders: [{weight, grader}]).
    #[arg(long)]
    pub grader: Option<String>,
    /// SFT and DPO: evaluate by grading the adapter's greedy answers (--max-new-tokens at
    /// most) to the validation dataset's prompts; the grader as JSON, as --grader.
    #[arg(long)]
    pub eval_grader: Option<String>,
    /// Classification: the head's labels in output order, comma-separated (default: the
    /// dataset's labels sorted).
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Also train a replaced LM head (the whole output layer; PEFT modules_to_save lm_head).
    #[arg(long)]
    pub train_lm_head: Option<bool>,
    // LoRA
    /// LoRA rank.
    #[arg(long)]
    pub rank: Option<u32>,
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Comma-separated module names, or all-linear.
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    #[arg(long)]
    pub use_rslora: Option<bool>,
    /// DoRA: LoRA with a learned magnitude per output feature.
    #[arg(long)]
    pub use_dora: Option<bool>,
    // IA3 (target modules: --target-modules)
    /// Comma-separated targeted modules whose input is scaled.
    #[arg(long, value_delimiter = ',')]
    pub feedforward_modules: Option<Vec<String>>,
    // Bottleneck adapters
    #[arg(long)]
    pub reduction_factor: Option<f64>,
    #[arg(long)]
    pub bottleneck_size: Option<u32>,
    /// swish, relu, gelu, gelu_new, tanh, sigmoid, leakyrelu or linear.
    #[arg(long)]
    pub non_linearity: Option<String>,
    /// after_attention, after_ffn or both.
    #[arg(long)]
    pub placement: Option<String>,
    // Full fine-tuning
    /// Comma-separated decoder layers that train (default: all).
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<u32>>,
    /// Train the embeddings and LM head (default true).
    #[arg(long)]
    pub embeddings: Option<bool>,
    /// Train the RMSNorm weights (default true).
    #[arg(long)]
    pub norms: Option<bool>,
    // The prompt family
    #[arg(long)]
    pub num_virtual_tokens: Option<u32>,
    /// Prompt tuning's init: random, text or vocab.
    #[arg(long)]
    pub init: Option<String>,
    #[arg(long)]
    pub init_text: Option<String>,
    /// P-tuning's encoder: mlp or lstm.
    #[arg(long)]
    pub encoder: Option<String>,
    /// P-tuning's encoder or prefix tuning's projection hidden size.
    #[arg(long)]
    pub encoder_hidden_size: Option<u32>,
    /// P-tuning's LSTM layers.
    #[arg(long)]
    pub encoder_num_layers: Option<u32>,
    // Hyper-parameters
    #[arg(long)]
    pub epochs: Option<u32>,
    #[arg(long)]
    pub batch_size: Option<u32>,
    #[arg(long)]
    pub gradient_accumulation: Option<u32>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// constant, linear or cosine.
    #[arg(long)]
    pub lr_scheduler: Option<String>,
    #[arg(long)]
    pub warmup_steps: Option<u32>,
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub max_seq_len: Option<u32>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub eval_every: Option<u32>,
    #[arg(long)]
    pub patience: Option<u32>,
    #[arg(long)]
    pub checkpoint_every: Option<u32>,
    /// completion or all.
    #[arg(long)]
    pub loss_on: Option<String>,
    #[arg(long)]
    pub reject_too_long: Option<bool>,
    #[arg(long)]
    pub packing: Option<bool>,
}

macro_rules! overlay {
    ($flags:ident, $file:ident, $($f:ident),*) => {
        JobArgs { config: None, $($f: $flags.$f.or($file.$f)),* }
    };
}

impl JobArgs {
    /// The flags over the `--config` file's settings.
    pub fn resolve(self) -> anyhow::Result<Self> {
        let Some(path) = &self.config else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let file: JobArgs = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        } else {
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        };
        let flags = self;
        Ok(overlay!(
            flags,
            file,
            dataset,
            adapter,
            validation_dataset,
            validation_split,
            method,
            objective,
            labels,
            center_rewards_coefficient,
            beta,
            loss_type,
            label_smoothing,
            num_generations,
            advantage,
            init_adapter,
            kl_coef,
            target_kl,
            ppo_epochs,
            max_new_tokens,
            temperature,
            grader,
            eval_grader,
            train_lm_head,
            rank,
            alpha,
            dropout,
            target_modules,
            use_rslora,
            use_dora,
            feedforward_modules,
            reduction_factor,
            bottleneck_size,
            non_linearity,
            placement,
            layers,
            embeddings,
            norms,
            num_virtual_tokens,
            init,
            init_text,
            encoder,
            encoder_hidden_size,
            encoder_num_layers,
            epochs,
            batch_size,
            gradient_accumulation,
            learning_rate,
            lr_scheduler,
            warmup_steps,
            warmup_ratio,
            weight_decay,
            max_grad_norm,
            max_seq_len,
            seed,
            eval_every,
            patience,
            checkpoint_every,
            loss_on,
            reject_too_long,
            packing
        ))
    }

    /// The request for `tenant`.
    pub fn request(self, tenant: &str) -> anyhow::Result<proto::CreateJobRequest> {
        use proto::create_job_request::MethodConfig;
        let a = self.resolve()?;
        let method = a.method.clone().unwrap_or_else(|| "lora".into());
        let method_config = match method.as_str() {
            "lora" => Some(MethodConfig::Lora(proto::LoraMethod {
                r: a.rank,
                alpha: a.alpha,
                dropout: a.dropout,
                target_modules: a.target_modules.clone().unwrap_or_default(),
                use_rslora: a.use_rslora.unwrap_or(false),
                use_dora: a.use_dora.unwrap_or(false),
            })),
            "ia3" => Some(MethodConfig::Ia3(proto::Ia3Method {
                target_modules: a.target_modules.clone().unwrap_or_default(),
                feedforward_modules: a.feedforward_modules.clone().unwrap_or_default(),
            })),
            "bottleneck" => Some(MethodConfig::Bottleneck(proto::BottleneckMethod {
                reduction_factor: a.reduction_factor,
                bottleneck_size: a.bottleneck_size,
                non_linearity: a.non_linearity.clone().unwrap_or_default(),
                placement: a.placement.clone().unwrap_or_default(),
            })),
            "prompt_tuning" => Some(MethodConfig::PromptTuning(proto::PromptTuningMethod {
                num_virtual_tokens: a.num_virtual_tokens,
                init: a.init.clone().unwrap_or_default(),
                init_text: a.init_text.clone().unwrap_or_default(),
            })),
            "p_tuning" => Some(MethodConfig::PTuning(proto::PTuningMethod {
                num_virtual_tokens: a.num_virtual_tokens,
                encoder: a.encoder.clone().unwrap_or_default(),
                encoder_hidden_size: a.encoder_hidden_size,
                encoder_num_layers: a.encoder_num_layers,
            })),
            "prefix_tuning" => Some(MethodConfig::PrefixTuning(proto::PrefixTuningMethod {
                num_virtual_tokens: a.num_virtual_tokens,
                encoder_hidden_size: a.encoder_hidden_size,
            })),
            "p_tuning_v2" => Some(MethodConfig::PTuningV2(proto::PTuningV2Method {
                num_virtual_tokens: a.num_virtual_tokens,
            })),
            "full" => Some(MethodConfig::Full(proto::FullMethod {
                layers: a.layers.clone().unwrap_or_default(),
                embeddings: a.embeddings,
                norms: a.norms,
            })),
            // The server names what it accepts.
            _ => None,
        };
        Ok(proto::CreateJobRequest {
            tenant: tenant.into(),
            dataset: a.dataset.clone().unwrap_or_default(),
            validation_dataset: a.validation_dataset.clone().unwrap_or_default(),
            validation_split: a.validation_split,
            adapter_name: a.adapter.clone().unwrap_or_default(),
            method,
            method_config,
            objective: a.objective.clone().unwrap_or_default(),
            classification: a
                .labels
                .clone()
                .map(|labels| proto::ClassificationObjective { labels }),
            reward_model: a
                .center_rewards_coefficient
                .map(|c| proto::RewardModelObjective {
                    center_rewards_coefficient: Some(c),
                }),
            dpo: (a.objective.as_deref() == Some("dpo")
                && (a.beta.is_some() || a.loss_type.is_some() || a.label_smoothing.is_some()))
            .then(|| proto::DpoObjective {
                beta: a.beta,
                loss_type: a.loss_type.clone().unwrap_or_default(),
                label_smoothing: a.label_smoothing,
            }),
            ppo: match (&a.grader, a.objective.as_deref()) {
                (Some(g), Some("ppo")) => Some(proto::PpoObjective {
                    max_new_tokens: a.max_new_tokens,
                    temperature: a.temperature,
                    kl_coef: a.kl_coef,
                    target_kl: a.target_kl,
                    ppo_epochs: a.ppo_epochs,
                    grader: Some(grader_of(
                        &serde_json::from_str(g)
                            .map_err(|e| anyhow::anyhow!("--grader is not JSON: {e}"))?,
                    )?),
                    ..Default::default()
                }),
                _ => None,
            },
            grpo: match (&a.grader, a.objective.as_deref()) {
                (None, _) | (_, Some("ppo")) => None,
                (Some(g), _) => Some(proto::GrpoObjective {
                    num_generations: a.num_generations,
                    advantage: a.advantage.clone().unwrap_or_default(),
                    beta: if a.objective.as_deref() == Some("grpo") {
                        a.beta
                    } else {
                        None
                    },
                    max_new_tokens: a.max_new_tokens,
                    temperature: a.temperature,
                    grader: Some(grader_of(
                        &serde_json::from_str(g)
                            .map_err(|e| anyhow::anyhow!("--grader is not JSON: {e}"))?,
                    )?),
                    ..Default::default()
                }),
            },
            eval_grader: match &a.eval_grader {
                Some(g) => Some(proto::EvalGrader {
                    grader: Some(grader_of(
                        &serde_json::from_str(g)
                            .map_err(|e| anyhow::anyhow!("--eval-grader is not JSON: {e}"))?,
                    )?),
                    temperature: None,
                    max_new_tokens: a.max_new_tokens,
                }),
                None => None,
            },
            init_adapter: a.init_adapter.clone().unwrap_or_default(),
            train_lm_head: a.train_lm_head.unwrap_or(false),
            hyperparameters: Some(proto::Hyperparameters {
                epochs: a.epochs,
                batch_size: a.batch_size,
                gradient_accumulation: a.gradient_accumulation,
                learning_rate: a.learning_rate,
                lr_scheduler: a.lr_scheduler.unwrap_or_default(),
                warmup_steps: a.warmup_steps,
                warmup_ratio: a.warmup_ratio,
                weight_decay: a.weight_decay,
                max_grad_norm: a.max_grad_norm,
                max_seq_len: a.max_seq_len,
                seed: a.seed,
                eval_every: a.eval_every,
                patience: a.patience,
                checkpoint_every: a.checkpoint_every,
                loss_on: a.loss_on.unwrap_or_default(),
                reject_too_long: a.reject_too_long.unwrap_or(false),
                packing: a.packing.unwrap_or(false),
            }),
        })
    }
}

/// Follows a job to its end with a step progress bar (ETA, live loss, last eval loss) on
/// stderr; status changes and checkpoints are printed above the bar.
pub async fn watch(client: &GraftClient, tenant: &str, id: &str, json: bool) -> anyhow::Result<()> {
    use proto::job_event::Event;
    let mut s = client
        .watch_job(tenant, id, 0)
        .await
        .map_err(crate::status_error)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40.cyan/blue} step {pos}/{len} eta {eta} {msg}",
        )?
        .progress_chars("=> "),
    );
    // A hidden bar (stderr not a terminal) prints nothing: the lines go to stderr as they are.
    let say = |line: String| {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut eval_loss = None;
    while let Some(e) = s.message().await.map_err(crate::status_error)? {
        match e.event {
            Some(Event::Status(st)) => say(format!("{} {}", st.status, st.message)),
            Some(Event::Step(st)) => {
                bar.set_length(st.total_steps);
                bar.set_position(st.step);
                let eval = eval_loss.map_or(String::new(), |l: f64| format!(" eval {l:.4}"));
                bar.set_message(format!(
                    "loss {:.4}{eval}{} lr {:.2e} {:.0} tok/s",
                    st.train_loss,
                    pair_metrics(&st.metrics),
                    st.learning_rate,
                    st.tokens_per_second
                ));
            }
            Some(Event::Eval(ev)) => {
                eval_loss = Some(ev.eval_loss);
                let f1: Vec<String> = ev
                    .per_class
                    .iter()
                    .map(|c| format!("{} {:.3}", c.label, c.f1))
                    .collect();
                say(if !ev.metrics.is_empty() {
                    format!(
                        "eval at step {}: loss {:.4} pairwise accuracy {:.3}{}",
                        ev.step,
                        ev.eval_loss,
                        ev.token_accuracy,
                        pair_metrics(&ev.metrics)
                    )
                } else if f1.is_empty() {
                    format!(
                        "eval at step {}: loss {:.4} token accuracy {:.3}",
                        ev.step, ev.eval_loss, ev.token_accuracy
                    )
                } else {
                    format!(
                        "eval at step {}: loss {:.4} accuracy {:.3} macro F1 {:.3} (F1: {})",
                        ev.step,
                        ev.eval_loss,
                        ev.token_accuracy,
                        ev.macro_f1,
                        f1.join(", ")
                    )
                });
            }
            Some(Event::Checkpoint(c)) => say(format!("checkpoint at step {}", c.step)),
            None => {}
        }
    }
    bar.finish_and_clear();
    let j = client
        .get_job(tenant, id)
        .await
        .map_err(crate::status_error)?;
    crate::print_job(&j, json);
    if j.status != "succeeded" {
        anyhow::bail!("job {} ended {}: {}", j.id, j.status, j.error);
    }
    Ok(())
}

/// The preference and RL objectives' headline metrics (TRL's names), as ` name value`
/// pairs.
fn pair_metrics(m: &std::collections::HashMap<String, f64>) -> String {
    [
        ("rewards/accuracies", "acc"),
        ("rewards/margins", "margin"),
        ("rewards/chosen", "chosen"),
        ("rewards/rejected", "rejected"),
        ("reward", "reward"),
        ("kl", "kl"),
        ("completion_length", "len"),
    ]
    .iter()
    .filter_map(|(k, short)| m.get(*k).map(|v| format!(" {short} {v:.3}")))
    .collect()
}

/// A grader given as JSON (`{"type": ...}`, the server's own spec shape) as the request's
/// message.
fn grader_of(v: &serde_json::Value) -> anyhow::Result<proto::Grader> {
    use proto::grader::Kind;
    let s = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let b = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
    let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as u32);
    let kind = match v.get("type").and_then(|t| t.as_str()) {
        Some("string_match") => Kind::StringMatch(proto::StringMatchGrader {
            reference: s("reference"),
            case_insensitive: b("case_insensitive"),
            contains: b("contains"),
        }),
        Some("regex") => Kind::Regex(proto::RegexGrader {
            pattern: s("pattern"),
        }),
        Some("json_schema") => Kind::JsonSchema(proto::JsonSchemaGrader {
            schema: v.get("schema").map(|x| x.to_string()).unwrap_or_default(),
        }),
        Some("length") => Kind::Length(proto::LengthGrader {
            min: u("min"),
            max: u("max"),
            unit: s("unit"),
        }),
        Some("reward_model") => Kind::RewardModel(proto::RewardModelGrader {
            adapter: s("adapter"),
        }),
        Some("weighted") => Kind::Weighted(proto::WeightedGraders {
            graders: v
                .get("graders")
                .and_then(|g| g.as_array())
                .map(|a| a.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|w| {
                    Ok(proto::WeightedGrader {
                        weight: w.get("weight").and_then(|x| x.as_f64()).unwrap_or(1.0),
                        grader: Some(grader_of(
                            w.get("grader").unwrap_or(&serde_json::Value::Null),
                        )?),
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        }),
        other => anyhow::bail!(
            "grader type {other:?}; expected string_match, regex, json_schema, length, reward_model or weighted"
        ),
    };
    Ok(proto::Grader { kind: Some(kind) })
}
