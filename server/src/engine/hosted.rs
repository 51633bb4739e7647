//! Fully fine-tuned models served in the same process as the base: each is loaded from its
//! HF directory into its own [`BaseModel`] with its own engine (its own rows, KV pool and
//! fair queue), on the first request that names it, and unloaded when idle.
//! Invariants:
//! - the loaded models' weights plus their KV pools stay within `budget_bytes`; to make room
//!   for a new one, idle models (nothing in flight) go, least recently used first; when the
//!   busy ones leave no room, the request is refused (RESOURCE_EXHAUSTED) rather than
//!   the budget exceeded;
//! - one owner: this map; an engine whose entry is removed ends once the requests holding
//!   its handle finish (its loop stops when the last handle drops);
//! - a deleted version is never served again (requests resolve names through the
//!   registry's rows first); its loaded copy goes like any idle one.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use super::{EngineConfig, EngineHandle};
use crate::{metrics as m, model::BaseModel};

/// Settings of the hosted models.
#[derive(Debug, Clone)]
pub struct HostedConfig {
    /// Bytes of loaded fine-tuned models (weights and KV pools) at most.
    pub budget_bytes: usize,
    /// Bytes of the KV pool each hosted model's engine gets.
    pub kv_cache_bytes: usize,
    /// A model without requests for this long is unloaded.
    pub idle: Duration,
}

impl Default for HostedConfig {
    fn default() -> Self {
        Self {
            budget_bytes: 2048 << 20,
            kv_cache_bytes: 256 << 20,
            idle: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "{what} needs {needed_mib} MiB to load; the hosted-model budget is {budget_mib} MiB and \
         {busy_mib} MiB of it serve requests now (--hosted-models-mb)"
    )]
    NoRoom {
        what: String,
        needed_mib: usize,
        budget_mib: usize,
        busy_mib: usize,
    },
    #[error("loading {what}: {reason}")]
    Load { what: String, reason: String },
}

struct Hosted {
    engine: EngineHandle,
    bytes: usize,
    last_used: Instant,
}

/// The hosted models, keyed by their version's row id.
pub struct HostedModels {
    cfg: HostedConfig,
    engine: EngineConfig,
    models: tokio::sync::Mutex<HashMap<i64, Hosted>>,
}

impl HostedModels {
    /// `engine`: the base engine's settings; each hosted engine gets them with its own KV
    /// budget and without the process gauges.
    pub fn new(cfg: HostedConfig, engine: EngineConfig) -> Arc<Self> {
        let engine = EngineConfig {
            kv_cache_bytes: cfg.kv_cache_bytes,
            gauges: false,
            ..engine
        };
        Arc::new(Self {
            cfg,
            engine,
            models: Default::default(),
        })
    }

    /// The engine serving version `id` (named `what` in errors), loading it from `dir`
    /// first if needed.
    pub async fn engine(&self, id: i64, what: &str, dir: &Path) -> Result<EngineHandle, HostError> {
        let mut models = self.models.lock().await;
        if let Some(h) = models.get_mut(&id) {
            h.last_used = Instant::now();
            return Ok(h.engine.clone());
        }
        let load_err = |reason: String| HostError::Load {
            what: what.into(),
            reason,
        };
        // The weights are f32 on disk as in memory.
        let file = dir.join(crate::model::save::HF_FILES[1]);
        let weights = std::fs::metadata(&file)
            .map_err(|e| load_err(e.kind().to_string()))?
            .len() as usize;
        let needed = weights + self.cfg.kv_cache_bytes;
        self.make_room(&mut models, what, needed)?;
        let started = Instant::now();
        let d = dir.to_path_buf();
        let model = tokio::task::spawn_blocking(move || {
            BaseModel::load(&d, &candle_core::Device::Cpu)
        })
        .await
        .map_err(|e| load_err(e.to_string()))?
        .map_err(|e| {
            tracing::error!(dir = %dir.display(), error = %e, "a stored fine-tuned model does not load");
            load_err(e.to_string())
        })?;
        let bytes = model.llama.weights.resident_bytes() + self.cfg.kv_cache_bytes;
        let engine = EngineHandle::start(Arc::new(model), self.engine.clone())
            .map_err(|e| load_err(e.to_string()))?;
        tracing::info!(
            model = what,
            mib = bytes >> 20,
            seconds = started.elapsed().as_secs_f64(),
            "hosted model loaded"
        );
        metrics::counter!(m::HOSTED_MODEL_LOADS_TOTAL).increment(1);
        models.insert(
            id,
            Hosted {
                engine: engine.clone(),
                bytes,
                last_used: Instant::now(),
            },
        );
        publish(&models);
        Ok(engine)
    }

    /// Unloads idle models, least recently used first, until `needed` more bytes fit.
    fn make_room(
        &self,
        models: &mut HashMap<i64, Hosted>,
        what: &str,
        needed: usize,
    ) -> Result<(), HostError> {
        let budget = self.cfg.budget_bytes;
        loop {
            let used: usize = models.values().map(|h| h.bytes).sum();
            if used + needed <= budget {
                return Ok(());
            }
            let victim = models
                .iter()
                .filter(|(_, h)| h.engine.in_flight() == 0)
                .min_by_key(|(_, h)| h.last_used)
                .map(|(k, _)| *k);
            match victim {
                Some(v) => {
                    models.remove(&v);
                    metrics::counter!(m::HOSTED_MODEL_UNLOADS_TOTAL).increment(1);
                }
                None => {
                    return Err(HostError::NoRoom {
                        what: what.into(),
                        needed_mib: needed.div_ceil(1 << 20),
                        budget_mib: budget >> 20,
                        busy_mib: used >> 20,
                    })
                }
            }
        }
    }

    /// Unloads every model idle for longer than the configured time; how many went.
    pub async fn unload_idle(&self) -> usize {
        let mut models = self.models.lock().await;
        let before = models.len();
        let idle = self.cfg.idle;
        models.retain(|_, h| h.engine.in_flight() > 0 || h.last_used.elapsed() < idle);
        let gone = before - models.len();
        if gone > 0 {
            metrics::counter!(m::HOSTED_MODEL_UNLOADS_TOTAL).increment(gone as u64);
            publish(&models);
        }
        gone
    }

    /// The loaded models' engines (for a drain).
    pub async fn engines(&self) -> Vec<EngineHandle> {
        let models = self.models.lock().await;
        models.values().map(|h| h.engine.clone()).collect()
    }

    /// Loaded models and their bytes.
    pub async fn resident(&self) -> (usize, usize) {
        let models = self.models.lock().await;
        (models.len(), models.values().map(|h| h.bytes).sum())
    }

    /// Checks for idle models a few times per idle period, for as long as `self` lives.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let me: Weak<Self> = Arc::downgrade(self);
        let every = (self.cfg.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(me) = me.upgrade() else { return };
                me.unload_idle().await;
            }
        });
    }
}

fn publish(models: &HashMap<i64, Hosted>) {
    metrics::gauge!(m::HOSTED_MODELS_RESIDENT).set(models.len() as f64);
    metrics::gauge!(m::HOSTED_MODELS_RESIDENT_BYTES)
        .set(models.values().map(|h| h.bytes).sum::<usize>() as f64);
}
