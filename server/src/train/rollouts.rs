//! The serving engine as the sampler of RL rollouts: a policy snapshot is leased to the
//! engine (never registered) and its completions are generated in the engine's batches,
//! under the job's tenant, beside live traffic and with its fairness.

use std::sync::Arc;

use super::{
    graders::RewardScorer,
    rl::{RolloutParams, Rollouts},
};
use crate::{
    adapters::AdapterLease,
    engine::{EngineHandle, GenerationRequest, SamplingParams, StreamEvent, Task},
    model::Adapter,
};

pub struct EngineRollouts {
    pub engine: EngineHandle,
    pub tenant: Arc<str>,
    /// The name the policy runs under (the job's adapter name).
    pub name: String,
}

impl Rollouts for EngineRollouts {
    fn sample(
        &self,
        policy: Adapter,
        tag: &str,
        prompts: &[(Vec<u32>, u64)],
        p: &RolloutParams,
    ) -> Result<Vec<Vec<u32>>, String> {
        let lease = AdapterLease::transient(&self.tenant, &self.name, tag, policy);
        let mut pending = Vec::with_capacity(prompts.len());
        for (ids, seed) in prompts {
            pending.push(
                self.engine
                    .submit(GenerationRequest {
                        task: Task::Generate,
                        prompt_ids: ids.clone(),
                        params: SamplingParams {
                            max_new_tokens: p.max_new_tokens,
                            temperature: p.temperature,
                            top_p: p.top_p,
                            seed: *seed,
                            ..Default::default()
                        },
                        deadline: None,
                        adapter: Some(lease.clone()),
                        tenant: self.tenant.clone(),
                        constraint: None,
                        background: true,
                    })
                    .map_err(|e| e.to_string())?,
            );
        }
        let mut out = Vec::with_capacity(pending.len());
        for mut rx in pending {
            let mut ids = Vec::new();
            loop {
                match rx.blocking_recv() {
                    Some(StreamEvent::Tokens { ids: t, .. }) => ids.extend(t),
                    Some(StreamEvent::Finished { .. }) => break,
                    Some(StreamEvent::Failed(e)) => return Err(e),
                    Some(StreamEvent::DeadlineExceeded) => return Err("deadline exceeded".into()),
                    Some(StreamEvent::Classified { .. }) => {
                        return Err("the policy classified instead of generating".into())
                    }
                    None => return Err("the engine stopped".into()),
                }
            }
            out.push(ids);
        }
        Ok(out)
    }
}

/// A reward-model adapter scoring through the engine, as the Score RPC does: each sequence
/// a prefill-only request in the engine's steps.
pub struct EngineScorer {
    pub engine: EngineHandle,
    pub tenant: Arc<str>,
    pub lease: AdapterLease,
}

impl RewardScorer for EngineScorer {
    fn reward(&self, ids: &[u32]) -> Result<f32, String> {
        let mut rx = self
            .engine
            .submit(GenerationRequest {
                task: Task::Classify,
                prompt_ids: ids.to_vec(),
                params: SamplingParams::default(),
                deadline: None,
                adapter: Some(self.lease.clone()),
                tenant: self.tenant.clone(),
                constraint: None,
                background: true,
            })
            .map_err(|e| e.to_string())?;
        let mut reward = None;
        loop {
            match rx.blocking_recv() {
                Some(StreamEvent::Classified { logits }) => reward = logits.first().copied(),
                Some(StreamEvent::Finished { .. }) => break,
                Some(StreamEvent::Failed(e)) => return Err(e),
                Some(_) => {}
                None => return Err("the engine stopped".into()),
            }
        }
        reward.ok_or_else(|| "the reward model gave no reward".into())
    }
}
