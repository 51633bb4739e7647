//! CreateJob: a job checked against its data (formats, labels, graders), the tenant's
//! adapters (`init_adapter`, reward models) and the quotas, then stored and queued.

use std::{collections::HashMap, sync::Arc};

use super::*;

impl TrainingService {
    /// Validates a job against its data and queues it.
    /// Quotas are checked here, under the tenant's storage lock held until the job's row
    /// (and its hold on the adapter's bytes) exists: the unfinished-jobs count, and the
    /// bytes of the adapter it will store (known from the model and the method's settings),
    /// so a job whose result would not fit is refused now, not after hours of work.
    pub async fn create_job(&self, tenant: &str, job: NewJob) -> Result<JobRow, TrainingError> {
        let mut job = job;
        self.adopt_init_adapter(tenant, &mut job.spec).await?;
        job.spec.train.method.resolve(self.model.config());
        if let MethodSpec::Full(sel) = &mut job.spec.train.method {
            sel.tied = self.model.llama.weights.tied();
        }
        // The method's settings against the model and this server's caps, before any size
        // is computed from them.
        methods::check(
            &job.spec.train,
            self.model.config(),
            self.cfg.max_rank,
            self.cfg.max_virtual_tokens,
        )
        .map_err(|(field, reason)| invalid(&field, reason))?;
        self.check_memory(&job.spec.train)?;
        if let Some((field, refusal)) = job.spec.train.cpu_only() {
            if !self.model.llama.device().is_cpu() {
                return Err(invalid(field, refusal));
            }
        }
        crate::names::validate(&job.adapter_name, "adapter name")
            .map_err(|e| invalid("adapter_name", e))?;
        let _storage = self.tenancy.storage_guard(tenant).await?;
        self.tenancy.check_new_job(tenant).await?;
        let ds = self.dataset(tenant, &job.dataset).await?;
        let eval = match &job.validation_dataset {
            Some(n) => Some(
                self.dataset(tenant, n)
                    .await
                    .map_err(|_| TrainingError::NotFound(format!("validation dataset {n:?}")))?,
            ),
            None => None,
        };
        // Preference rows train the pair objectives (reward models, DPO) and prompt rows
        // the online ones (GRPO, PPO), and only they do; a grader evaluates on prompts.
        let objective = &job.spec.train.objective;
        let want = if objective.on_pairs() {
            Some(Format::Preference)
        } else if objective.online() {
            Some(Format::Prompts)
        } else {
            None
        };
        let graded = job.spec.eval_grader.is_some();
        if graded && eval.is_none() {
            return Err(invalid(
                "validation_dataset",
                "eval_grader grades the adapter's answers to a validation dataset of prompts; name one",
            ));
        }
        for (d, field, want) in [
            (Some(&ds), "dataset", want),
            (
                eval.as_ref(),
                "validation_dataset",
                if graded { Some(Format::Prompts) } else { want },
            ),
        ] {
            let Some(d) = d else { continue };
            let special = [Format::Preference, Format::Prompts]
                .into_iter()
                .find(|f| d.format == f.name());
            if special != want {
                let need = want.map_or("completions to learn from".to_string(), |f| {
                    format!("a {} dataset", f.name())
                });
                let why = if field == "validation_dataset" && graded {
                    format!("eval_grader grades answers to {need}")
                } else {
                    format!("the {} objective trains on {need}", objective.name())
                };
                return Err(invalid(
                    field,
                    format!("{:?} is a {} dataset; {why}", d.name, d.format),
                ));
            }
        }
        // Validation: the data must tokenise under this job's limits.
        let train = self.load_examples(&ds, &job.spec).await?;
        let eval_rows = match &eval {
            Some(e) => self.load_examples(e, &job.spec).await?,
            None => Vec::new(),
        };
        // A graded evaluation's prompts were checked above; they are no training rows.
        let trained: &[&[Tokenized]] = if graded {
            &[&train]
        } else {
            &[&train, &eval_rows]
        };
        classes::resolve_objective(&mut job.spec.train.objective, trained)
            .map_err(|(field, reason)| invalid(&field, reason))?;
        let reward_models = self.reward_models(tenant, &job.spec).await?;
        crate::train::rl_job::grader(
            job.spec.grader(),
            &crate::train::rl_job::graded_rows(&job.spec.train.objective, &train, &eval_rows),
            self.engine.get(),
            &reward_models,
        )
        .map_err(|(field, reason)| invalid(&field, reason))?;
        drop(eval_rows);
        // The head's size is known once its labels are.
        self.tenancy
            .check_storage(
                tenant,
                crate::tenancy::NewObject::AdapterVersion(&job.adapter_name),
                self.held_bytes(&job),
            )
            .await?;
        let (n_train, _) = split_sizes(train.len(), job.spec.validation_split);
        let spe = n_train
            .div_ceil(job.spec.train.batch_size)
            .div_ceil(job.spec.train.grad_accum);
        if job.spec.train.warmup_steps == 0 && job.spec.warmup_ratio > 0.0 {
            job.spec.train.warmup_steps =
                (job.spec.warmup_ratio * (spe * job.spec.train.epochs) as f64).round() as usize;
        }
        let row = JobRow {
            id: new_id("job"),
            tenant: tenant.into(),
            dataset: ds.id.clone(),
            dataset_name: ds.name.clone(),
            eval_dataset_name: eval.as_ref().map(|e| e.name.clone()),
            eval_dataset: eval.map(|e| e.id),
            adapter_name: job.adapter_name.clone(),
            adapter_bytes: self.held_bytes(&job),
            spec: serde_json::to_string(&job.spec)
                .map_err(|e| TrainingError::Storage(e.to_string()))?,
            status: JobStatus::Validating,
            error: None,
            adapter_version: None,
            step: 0,
            total_steps: (spe * job.spec.train.epochs) as u64,
            created_at: 0,
            updated_at: 0,
        };
        self.db.insert_job(&row).await?;
        self.event(
            &row.id,
            JobEvent::Status {
                status: JobStatus::Validating,
                message: format!("{} training examples", train.len()),
            },
        )
        .await?;
        self.db
            .set_job_status(&row.id, JobStatus::Queued, None, None, None)
            .await?;
        self.event(
            &row.id,
            JobEvent::Status {
                status: JobStatus::Queued,
                message: String::new(),
            },
        )
        .await?;
        // Read before waking the runner: CreateJob answers with the job as created
        // (queued), not with whatever state the runner raced it into.
        let created = self.job(tenant, &row.id).await;
        self.wake.notify_one();
        created
    }

    /// The reward-model adapters an online objective's grader names, leased from the
    /// tenant's own (another tenant's or a missing one is NOT_FOUND; an adapter without a
    /// one-output head is INVALID_ARGUMENT), as engine-backed scorers.
    pub(super) async fn reward_models(
        &self,
        tenant: &str,
        job: &JobSpec,
    ) -> Result<HashMap<String, Arc<dyn crate::train::graders::RewardScorer>>, TrainingError> {
        let mut out: HashMap<String, Arc<dyn crate::train::graders::RewardScorer>> = HashMap::new();
        let Some((spec, field)) = job.grader() else {
            return Ok(out);
        };
        for name in spec.reward_models() {
            let r: crate::adapters::AdapterRef =
                name.parse().map_err(|e: String| invalid(&field, e))?;
            let lease = self.registry.lease(tenant, &r).await.map_err(|e| match e {
                crate::adapters::RegistryError::NotFound(_) => {
                    TrainingError::NotFound(format!("reward model {name}"))
                }
                other => TrainingError::Registry(other),
            })?;
            if !lease.adapter().head.as_ref().is_some_and(|h| h.is_reward()) {
                return Err(invalid(
                    &field,
                    format!("{name} is not a reward model (a head of one output)"),
                ));
            }
            let engine = self.engine.get().ok_or_else(|| {
                TrainingError::Storage("the serving engine is not running".into())
            })?;
            out.insert(
                name.to_string(),
                Arc::new(crate::train::rollouts::EngineScorer {
                    engine: engine.clone(),
                    tenant: tenant.into(),
                    lease,
                }),
            );
        }
        Ok(out)
    }

    /// A job continuing an adapter (`init_adapter`): the tenant's LoRA version (a missing
    /// or another tenant's is NOT_FOUND), whose rank, alpha, targets and rsLoRA become the
    /// job's; the name is pinned to its version so a resumed job starts from the same one.
    async fn adopt_init_adapter(
        &self,
        tenant: &str,
        spec: &mut JobSpec,
    ) -> Result<(), TrainingError> {
        let Some(name) = spec.init_adapter.clone() else {
            return Ok(());
        };
        let r: crate::adapters::AdapterRef = name
            .parse()
            .map_err(|e: String| invalid("init_adapter", e))?;
        let lease = self.registry.lease(tenant, &r).await.map_err(|e| match e {
            crate::adapters::RegistryError::NotFound(_) => {
                TrainingError::NotFound(format!("init_adapter {name}"))
            }
            other => TrainingError::Registry(other),
        })?;
        if spec.train.method != MethodSpec::Lora {
            return Err(invalid(
                "init_adapter",
                format!(
                    "continues a LoRA adapter; the method is {}",
                    spec.train.method.name()
                ),
            ));
        }
        match &lease.row.details {
            Details::Lora {
                rank,
                alpha,
                target_modules,
                use_rslora,
                use_dora: false,
            } if lease.row.head.is_none() && !lease.row.lm_head => {
                let scale = if *use_rslora {
                    *alpha / (*rank as f64).sqrt()
                } else {
                    *alpha / *rank as f64
                };
                let uniform = lease.adapter().linear.iter().flatten().flatten().all(|d| {
                    matches!(d, crate::model::adapter::LinearDelta::Lora(p)
                        if p.rank == *rank
                            && (f64::from(p.scale) - scale).abs() <= 1e-6 * scale.abs().max(1.0))
                });
                if !uniform {
                    return Err(invalid(
                        "init_adapter",
                        format!(
                            "{name} has ranks or alphas per module (PEFT's rank_pattern or alpha_pattern); a job trains one rank and alpha"
                        ),
                    ));
                }
                spec.train.rank = *rank;
                spec.train.alpha = *alpha;
                spec.train.targets = target_modules.clone();
                spec.train.use_rslora = *use_rslora;
                spec.train.use_dora = false;
            }
            _ => {
                return Err(invalid(
                    "init_adapter",
                    format!(
                        "{name} is not a plain LoRA adapter (DoRA, heads and other methods cannot be continued)"
                    ),
                ))
            }
        }
        spec.init_adapter = Some(format!("{}@{}", lease.row.name, lease.row.version));
        Ok(())
    }

    /// Full fine-tuning's memory estimate against the configured limit (the adapter methods'
    /// parameters are small beside the model and are not checked).
    fn check_memory(&self, spec: &TrainSpec) -> Result<(), TrainingError> {
        let MethodSpec::Full(sel) = &spec.method else {
            return Ok(());
        };
        let needed = sel.memory_bytes(self.model.config(), spec.batch_size, spec.max_seq_len);
        let limit = self.cfg.max_training_memory_bytes;
        if needed > limit {
            return Err(TrainingError::Memory {
                method: "full fine-tuning".into(),
                needed_mib: needed.div_ceil(1 << 20),
                limit_mib: limit >> 20,
            });
        }
        Ok(())
    }
}
