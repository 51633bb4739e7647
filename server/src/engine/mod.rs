//! The generation engine: one loop on its own thread owns every active sequence and runs
//! them together, step after step (continuous batching).
//! - [`EngineHandle`] is the cheap, cloneable front: `submit` counts a request against the
//!   queue bound (full queue -> [`SubmitError::QueueFull`]), sends it to the loop and
//!   returns the stream of its events.
//! - The loop keeps waiting requests in a fair queue (`fair.rs`): admission order is by
//!   tenant, least-served first, never FIFO across tenants.
//! - The loop (`step.rs`) is the only owner of sequences, samplers and the paged KV pool
//!   (`model::kv_cache`): KV memory is a fixed budget; admission and every step check free
//!   blocks, a step that runs out preempts the newest sequence (recomputed later, with the
//!   same output), and a request that could never fit is refused at `submit`.
//! - Policy lives in `scheduler.rs` (pure), token choice in `sampler.rs`, text in `output.rs`.
//! - A classification request ([`Task::Classify`]) is a prefill-only sequence in the same
//!   steps: its last prompt position goes through its adapter's head instead of the LM head
//!   (`Llama::forward_step`), and its answer is the class logits.
//!
//! Invariant: no lock is held across a request's generation; a request's tokens depend only
//! on the request (prompt, parameters, seed), never on the rest of the batch.

pub mod constraint;
pub mod fair;
pub mod hosted;
pub mod output;
pub mod sampler;
pub mod scheduler;
mod step;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

pub use sampler::SamplingParams;
pub use scheduler::StepLimits;
pub use step::PACKED_PROMPT_TOKENS;

use crate::{
    adapters::AdapterLease,
    model::{BaseModel, KvDtype},
};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoding together at most.
    pub max_active_sequences: usize,
    /// Requests waiting for admission at most; beyond, `submit` refuses.
    pub max_queued_requests: usize,
    /// Sequences of one tenant decoding together at most (the rest of the batch stays
    /// open to other tenants; see `fair.rs`).
    pub max_active_per_tenant: usize,
    pub limits: StepLimits,
    /// Bytes of the KV pool (keys and values of every running sequence and of cached
    /// prompt prefixes).
    pub kv_cache_bytes: usize,
    /// How the pool stores keys and values (f16 holds twice the tokens in the same bytes).
    pub kv_cache_dtype: KvDtype,
    /// Whether this engine sets the process's engine gauges (queue depth, active sequences,
    /// KV blocks). The base's engine does; a hosted fine-tuned model's does not, so the
    /// gauges keep describing one engine.
    pub gauges: bool,
}

/// The default KV budget: a quarter of the machine's memory (`/proc/meminfo`), or 2 GiB
/// where that cannot be read.
pub fn default_kv_cache_bytes() -> usize {
    machine_memory_bytes().map_or(2 << 30, |b| b / 4)
}

/// The machine's memory (`MemTotal`), where the system says.
pub fn machine_memory_bytes() -> Option<usize> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map(|kb| kb * 1024)
    })
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kv_cache_bytes: default_kv_cache_bytes(),
            kv_cache_dtype: KvDtype::default(),
            gauges: true,
            max_active_sequences: 64,
            max_queued_requests: 256,
            max_active_per_tenant: 48,
            limits: StepLimits {
                max_batch_tokens: 512,
                prefill_chunk: 256,
                background_prefill: 32,
            },
        }
    }
}

/// What a request asks of its sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Continue the prompt, token after token.
    Generate,
    /// Run the prompt once (prefill only) through the adapter's classification head; the
    /// answer is one [`StreamEvent::Classified`].
    Classify,
}

/// A validated request, ready to run.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub task: Task,
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    pub deadline: Option<Instant>,
    /// The adapter version this request runs with, leased for the request's lifetime.
    pub adapter: Option<AdapterLease>,
    /// Whose request this is: the key the engine shares decode capacity fairly by.
    pub tenant: Arc<str>,
    /// Structured output: the compiled constraint its tokens must satisfy.
    pub constraint: Option<constraint::Constraint>,
    /// Background work no one reads token by token (an RL job's rollouts and their
    /// rewards): its prompt yields to interactive requests' (`StepLimits::background_prefill`).
    pub background: bool,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Stop,
    Eos,
    Cancelled,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose KV came from the prefix cache (same tenant, same adapter
    /// version) rather than a prefill.
    pub cached_prompt_tokens: u32,
    /// The adapter's virtual tokens in front of the prompt (not in `prompt_tokens`).
    pub virtual_tokens: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    pub queue: Duration,
    pub time_to_first_token: Duration,
    pub total: Duration,
}

/// What the engine sends back for one request, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// New tokens and the text they completed (possibly empty while held back).
    Tokens {
        text: String,
        ids: Vec<u32>,
        logprobs: Vec<f32>,
        /// Per id, the most likely alternatives `(id, logprob)`, most likely first (when the
        /// request asked for `top_logprobs`; empty otherwise).
        top_logprobs: Vec<Vec<(u32, f32)>>,
    },
    /// A classified sequence's class logits, in the order of its head's labels (then
    /// `Finished`).
    Classified { logits: Vec<f32> },
    /// The last event of a sequence that ended normally or was cancelled.
    Finished {
        reason: FinishReason,
        usage: Usage,
        timings: Timings,
    },
    /// The deadline passed before the sequence finished.
    DeadlineExceeded,
    /// The engine failed on this sequence.
    Failed(String),
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the generation queue is full ({capacity} requests waiting)")]
    QueueFull {
        capacity: usize,
        retry_after: Duration,
    },
    #[error("the request needs up to {needed_tokens} tokens of KV memory (prompt {prompt_tokens} + max_new_tokens {max_new_tokens}) but the whole KV pool holds {capacity_tokens}")]
    NeverFits {
        needed_tokens: usize,
        prompt_tokens: usize,
        max_new_tokens: usize,
        capacity_tokens: usize,
    },
    #[error(
        "the adapter has a classification head: it classifies (Classify), it does not generate"
    )]
    HeadCannotGenerate,
    #[error("classification needs an adapter with a classification head")]
    NoHead,
    #[error("the server is draining and accepts no new requests")]
    Draining,
    #[error("the engine has stopped")]
    Stopped,
}

struct Submission {
    req: GenerationRequest,
    arrived: Instant,
    events: mpsc::Sender<StreamEvent>,
}

/// State shared between the handle and the loop: counters and flags only.
#[derive(Debug, Default)]
struct Shared {
    draining: AtomicBool,
    cancel_all: AtomicBool,
    /// Queued plus active requests.
    in_flight: AtomicUsize,
    /// Submitted and not yet admitted (nor discarded).
    queued: AtomicUsize,
    /// Sequences preempted for lack of KV blocks, since start (this engine's own count,
    /// beside the process-wide metric).
    preemptions: AtomicU64,
}

/// The cloneable front of the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Submission>,
    shared: Arc<Shared>,
    capacity: usize,
    kv_capacity_tokens: usize,
    model: Arc<BaseModel>,
    gauges: bool,
    grammars: constraint::LazyGrammars,
}

impl EngineHandle {
    /// Starts the engine loop on its own thread.
    pub fn start(model: Arc<BaseModel>, cfg: EngineConfig) -> std::io::Result<Self> {
        let capacity = cfg.max_queued_requests.max(1);
        let gauges = cfg.gauges;
        // Unbounded channel, bounded by the `queued` count: the loop moves submissions into
        // its fair queue as they come.
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let engine = step::EngineLoop::new(model.clone(), cfg, rx, shared.clone())?;
        let kv_capacity_tokens = engine.kv_capacity_tokens();
        std::thread::Builder::new()
            .name("graft-engine".into())
            .spawn(move || engine.run())?;
        Ok(Self {
            tx,
            shared,
            capacity,
            kv_capacity_tokens,
            model,
            gauges,
            grammars: Default::default(),
        })
    }

    /// Positions the KV pool holds, all sequences together.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv_capacity_tokens
    }

    pub fn model(&self) -> &Arc<BaseModel> {
        &self.model
    }

    /// The model's grammar compiler for structured output (built on first use; the error
    /// says why the tokenizer cannot be used).
    pub fn grammars(&self) -> Result<Arc<constraint::Grammars>, String> {
        self.grammars.get(&self.model)
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request at the next step.
    pub fn submit(
        &self,
        req: GenerationRequest,
    ) -> Result<mpsc::Receiver<StreamEvent>, SubmitError> {
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::Draining);
        }
        let head = req
            .adapter
            .as_ref()
            .is_some_and(|a| a.adapter().head.is_some());
        match (req.task, head) {
            (Task::Generate, true) => return Err(SubmitError::HeadCannotGenerate),
            (Task::Classify, false) => return Err(SubmitError::NoHead),
            _ => {}
        }
        // Rounded to whole blocks, as the pool hands them out; a sequence ends at the
        // context window whatever max_new_tokens says.
        let virt = req
            .adapter
            .as_ref()
            .map_or(0, |a| a.adapter().virtual_tokens());
        let max_new = match req.task {
            Task::Generate => req.params.max_new_tokens as usize,
            Task::Classify => 0,
        };
        let prompt = req.prompt_ids.len() + virt;
        let needed = (prompt + max_new).min(self.model.config().max_position.max(prompt));
        if crate::model::kv_cache::blocks_for(needed) * crate::model::kv_cache::BLOCK_TOKENS
            > self.kv_capacity_tokens
        {
            return Err(SubmitError::NeverFits {
                needed_tokens: needed,
                prompt_tokens: prompt,
                max_new_tokens: max_new,
                capacity_tokens: self.kv_capacity_tokens,
            });
        }
        // Room for every token event plus the final one: the loop never blocks on a slow
        // reader and never drops an event.
        let (etx, erx) = mpsc::channel(req.params.max_new_tokens as usize + 4);
        let sub = Submission {
            req,
            arrived: Instant::now(),
            events: etx,
        };
        let queued = self.shared.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.capacity {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull {
                capacity: self.capacity,
                retry_after: Duration::from_secs(1),
            });
        }
        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        match self.tx.send(sub) {
            Ok(()) => {
                if self.gauges {
                    metrics::gauge!(crate::metrics::QUEUE_DEPTH).set(self.queue_depth() as f64);
                }
                Ok(erx)
            }
            Err(_) => {
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                Err(SubmitError::Stopped)
            }
        }
    }

    /// Requests waiting for admission.
    pub fn queue_depth(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// Sequences this engine preempted for lack of KV blocks since it started.
    pub fn preemptions(&self) -> u64 {
        self.shared.preemptions.load(Ordering::SeqCst)
    }

    /// Requests queued or running.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Refuses new requests from now on; running ones continue.
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    /// Ends every running and queued request with `Cancelled` at the next step.
    pub fn cancel_all(&self) {
        self.shared.cancel_all.store(true, Ordering::SeqCst);
    }

    /// Waits until nothing is in flight, or `deadline` passes; true when idle.
    pub async fn wait_idle(&self, deadline: Instant) -> bool {
        while self.in_flight() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}
