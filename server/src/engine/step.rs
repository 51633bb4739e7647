//! The engine loop: admit, reap, plan, reserve KV blocks, forward, sample, emit — once per
//! step, on one thread.
//! Invariant: this loop is the only owner of `Sequence`s (their block tables, samplers,
//! outputs) and of the KV pool; it never blocks on a caller (event channels are sized to
//! never fill).
//!
//! KV memory: a request is admitted when the blocks for everything it has (prompt, plus what
//! it generated before a preemption) are available, after taking the blocks of its prompt
//! prefix that the prefix cache holds under its salt (tenant + adapter version content
//! hash). Each step grows the block tables of the planned rows; when decode rows cannot
//! grow, the newest sequence (latest arrival) is preempted: its blocks are freed, its tokens
//! kept, and it waits to be readmitted before any new request. It then recomputes its prompt
//! through the prefill path and its generated tokens through the decode path, the very
//! paths that produced them, so its KV, and hence its output, is what it was. Prefill chunks
//! shrink to the blocks there are. A short prompt (at most [`PACKED_PROMPT_TOKENS`]) runs
//! through the decode kernel like decode rows, a long one through the exact packed kernel
//! (or, for a model without blocks, everything through the f32 GEMM); which is fixed by the
//! request, never by the step.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use tokio::sync::mpsc::{self, error::TryRecvError};

use super::{
    fair::FairQueue,
    output::TextOutput,
    sampler::{Sampled, Sampler},
    scheduler::{plan_step, SeqPhase, Slot, StepPlan},
    EngineConfig, FinishReason, Shared, StreamEvent, Submission, Timings, Usage,
};
use crate::{
    adapters::AdapterLease,
    metrics as m,
    model::{
        kv_cache::{block_hashes, blocks_for, BlockHash, BLOCK_TOKENS},
        BaseModel, KvCache, KvPool, SeqChunk,
    },
};

struct Sequence {
    /// The adapter's virtual positions ([`VIRTUAL`] placeholders, seeded from its KV prefix,
    /// never run), then the prompt's tokens.
    prompt: Vec<u32>,
    /// How many of `prompt`'s positions are virtual.
    virtual_tokens: usize,
    generated: Vec<u32>,
    /// Block table: positions `0..cache.len()` of `prompt ++ generated` are computed.
    cache: KvCache,
    /// Chained hashes of the prompt's full blocks under this sequence's salt.
    prompt_hashes: Vec<BlockHash>,
    /// Prompt blocks published to the prefix cache so far.
    published: usize,
    cached_prompt_tokens: usize,
    sampler: Sampler,
    output: TextOutput,
    events: mpsc::Sender<StreamEvent>,
    arrived: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    deadline: Option<Instant>,
    /// Held until the sequence ends: pins the adapter version.
    adapter: Option<AdapterLease>,
    tenant: Arc<str>,
    /// Classified (prefill only, one answer), not continued.
    classify: bool,
    /// Background work: its prefill yields to interactive sequences (`scheduler`).
    background: bool,
    done: bool,
}

impl Sequence {
    fn total(&self) -> usize {
        self.prompt.len() + self.generated.len()
    }

    /// Whether the prompt runs through the decode kernel: see [`packed_prompt`].
    fn packed_prompt(&self) -> bool {
        packed_prompt(self.prompt.len() - self.virtual_tokens)
    }

    fn phase(&self) -> SeqPhase {
        let done = self.cache.len();
        if done < self.prompt.len() {
            SeqPhase::Prefill {
                remaining: self.prompt.len() - done,
            }
        } else {
            SeqPhase::Decode {
                remaining: self.total() - done,
            }
        }
    }

    fn finish(&mut self, reason: FinishReason) {
        let now = Instant::now();
        let timings = Timings {
            queue: self.admitted - self.arrived,
            time_to_first_token: self
                .first_token
                .map(|t| t - self.arrived)
                .unwrap_or_default(),
            total: now - self.arrived,
        };
        let usage = Usage {
            prompt_tokens: (self.prompt.len() - self.virtual_tokens) as u32,
            virtual_tokens: self.virtual_tokens as u32,
            completion_tokens: self.generated.len() as u32,
            cached_prompt_tokens: self.cached_prompt_tokens as u32,
        };
        let _ = self.events.try_send(StreamEvent::Finished {
            reason,
            usage,
            timings,
        });
        self.done = true;
    }

    fn fail(&mut self, event: StreamEvent) {
        let _ = self.events.try_send(event);
        self.done = true;
    }
}

pub(super) struct EngineLoop {
    model: Arc<BaseModel>,
    cfg: EngineConfig,
    rx: mpsc::UnboundedReceiver<Submission>,
    shared: Arc<Shared>,
    /// Submitted, not yet admitted; admission order is the fair queue's.
    waiting: FairQueue<Submission>,
    active: Vec<Sequence>,
    /// Preempted for lack of KV blocks, by arrival: readmitted before anything waiting.
    preempted: Vec<Sequence>,
    pool: KvPool,
}

impl EngineLoop {
    pub(super) fn new(
        model: Arc<BaseModel>,
        cfg: EngineConfig,
        rx: mpsc::UnboundedReceiver<Submission>,
        shared: Arc<Shared>,
    ) -> std::io::Result<Self> {
        let pool = KvPool::with_budget(
            model.llama.kv_shape().with_dtype(cfg.kv_cache_dtype),
            cfg.kv_cache_bytes,
        )
        .map_err(|e| {
            std::io::Error::other(format!(
                "cannot map {} MiB of KV memory (--kv-cache-mb): {e}",
                cfg.kv_cache_bytes >> 20
            ))
        })?;
        if cfg.gauges {
            metrics::gauge!(m::KV_BLOCKS_TOTAL).set(pool.num_blocks() as f64);
        }
        Ok(Self {
            waiting: FairQueue::new(cfg.max_active_per_tenant),
            model,
            cfg,
            rx,
            shared,
            active: Vec::new(),
            preempted: Vec::new(),
            pool,
        })
    }

    pub(super) fn kv_capacity_tokens(&self) -> usize {
        self.pool.capacity_tokens()
    }

    /// Moves every submission from the channel to the fair queue; false once the channel
    /// is closed (every handle dropped).
    fn collect(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(sub) => {
                    let tenant = sub.req.tenant.clone();
                    self.waiting.push(&tenant, sub);
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Admits waiting requests, fairly, while there are free slots; drops the ones whose
    /// caller left while waiting.
    fn admit_waiting(&mut self) {
        let gone = self.waiting.discard(|s| s.events.is_closed());
        if gone > 0 {
            self.shared.queued.fetch_sub(gone, Ordering::SeqCst);
            self.shared.in_flight.fetch_sub(gone, Ordering::SeqCst);
        }
        // Preempted sequences first, oldest first: nothing new jumps ahead of them.
        while self.active.len() < self.cfg.max_active_sequences && !self.preempted.is_empty() {
            let seq = &self.preempted[0];
            let Some(mut cache) = take_blocks(
                &mut self.pool,
                &seq.prompt_hashes,
                seq.prompt.len(),
                seq.total(),
            ) else {
                return;
            };
            if !seed_prefix(&mut self.pool, &mut cache, seq.adapter.as_ref()) {
                return;
            }
            let mut seq = self.preempted.remove(0);
            seq.published = cache.blocks().len();
            seq.cache = cache;
            self.active.push(seq);
        }
        while self.active.len() < self.cfg.max_active_sequences {
            let Some((tenant, sub)) = self.waiting.pop() else {
                break;
            };
            let stream = positions(&sub.req);
            let hashes = block_hashes(&prefix_salt(&sub.req), &stream);
            let Some(mut cache) = take_blocks(&mut self.pool, &hashes, stream.len(), stream.len())
            else {
                self.waiting.unpop(&tenant, sub);
                break;
            };
            let virt = stream.len() - sub.req.prompt_ids.len();
            let cached = cache.len().saturating_sub(virt);
            if !seed_prefix(&mut self.pool, &mut cache, sub.req.adapter.as_ref()) {
                self.waiting.unpop(&tenant, sub);
                break;
            }
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!(m::PROMPT_TOKENS_TOTAL).increment(sub.req.prompt_ids.len() as u64);
            metrics::counter!(m::PREFIX_CACHE_HIT_TOKENS_TOTAL).increment(cached as u64);
            let seq = self.new_sequence(sub, stream, hashes, cache, cached);
            self.active.push(seq);
        }
        self.waiting.forget_idle();
    }

    pub(super) fn run(mut self) {
        loop {
            let open = self.collect();
            self.admit_waiting();
            if self.cfg.gauges {
                metrics::gauge!(m::QUEUE_DEPTH)
                    .set((self.waiting.len() + self.preempted.len()) as f64);
            }
            if self.active.is_empty() {
                if !open && self.waiting.is_empty() && self.preempted.is_empty() {
                    return;
                }
                match self.rx.blocking_recv() {
                    Some(sub) => {
                        let tenant = sub.req.tenant.clone();
                        self.waiting.push(&tenant, sub);
                    }
                    None if self.waiting.is_empty() && self.preempted.is_empty() => return,
                    None => {}
                }
                continue;
            }
            self.reap();
            if !self.active.is_empty() {
                // A bug in one step must not take the engine (and every later request) down:
                // fail the sequences of that step and carry on.
                let stepped =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
                if stepped.is_err() {
                    tracing::error!("engine step panicked; failing its sequences");
                    for s in self.active.iter_mut() {
                        s.fail(StreamEvent::Failed(
                            "internal error in the engine step".into(),
                        ));
                    }
                }
                self.reap();
            }
        }
    }

    fn new_sequence(
        &self,
        sub: Submission,
        prompt: Vec<u32>,
        prompt_hashes: Vec<BlockHash>,
        cache: KvCache,
        cached_prompt_tokens: usize,
    ) -> Sequence {
        let Submission {
            req,
            arrived,
            events,
        } = sub;
        let vocab = self.model.config().vocab_size;
        let sampler = Sampler::new(req.params.clone(), vocab, &req.prompt_ids)
            .with_constraint(req.constraint);
        Sequence {
            output: TextOutput::new(req.params.stop.clone()),
            virtual_tokens: prompt.len() - req.prompt_ids.len(),
            prompt,
            generated: Vec::new(),
            published: cache.blocks().len(),
            cached_prompt_tokens,
            cache,
            prompt_hashes,
            sampler,
            events,
            arrived,
            admitted: Instant::now(),
            first_token: None,
            last_token: None,
            deadline: req.deadline,
            adapter: req.adapter,
            tenant: req.tenant,
            classify: req.task == super::Task::Classify,
            background: req.background,
            done: false,
        }
    }

    /// Ends sequences whose caller left, whose deadline passed, or that a drain cancelled;
    /// then drops every finished sequence.
    fn reap(&mut self) {
        let now = Instant::now();
        let cancel_all = self.shared.cancel_all.load(Ordering::SeqCst);
        for s in self
            .active
            .iter_mut()
            .chain(self.preempted.iter_mut())
            .filter(|s| !s.done)
        {
            if s.events.is_closed() {
                s.done = true;
            } else if s.deadline.is_some_and(|d| now >= d) {
                s.fail(StreamEvent::DeadlineExceeded);
            } else if cancel_all {
                let rest = s.output.flush();
                if !rest.is_empty() {
                    let _ = s.events.try_send(StreamEvent::Tokens {
                        text: rest,
                        ids: vec![],
                        logprobs: vec![],
                        top_logprobs: vec![],
                    });
                }
                s.finish(FinishReason::Cancelled);
            }
        }
        let mut removed = 0;
        for s in self
            .active
            .iter_mut()
            .chain(self.preempted.iter_mut())
            .filter(|s| s.done)
        {
            self.waiting.finished(&s.tenant);
            self.pool.release(&mut s.cache);
            removed += 1;
        }
        self.active.retain(|s| !s.done);
        self.preempted.retain(|s| !s.done);
        if removed > 0 {
            self.shared.in_flight.fetch_sub(removed, Ordering::SeqCst);
        }
        if self.cfg.gauges {
            metrics::gauge!(m::ACTIVE_SEQUENCES).set(self.active.len() as f64);
            metrics::gauge!(m::KV_BLOCKS_USED).set(self.pool.in_use() as f64);
        }
    }

    /// Plans the next step and grows the planned rows' block tables. Steady decode rows
    /// cannot shrink: while they cannot grow, the newest sequence is preempted. Prefill and
    /// replay chunks then shrink to the blocks left; a step with nothing able to run
    /// preempts too.
    fn plan_with_blocks(&mut self) -> Option<StepPlan> {
        loop {
            if self.active.is_empty() {
                return None;
            }
            let phases: Vec<SeqPhase> = self.active.iter().map(Sequence::phase).collect();
            let slots: Vec<Slot> = self
                .active
                .iter()
                .zip(&phases)
                .map(|(s, &phase)| Slot {
                    phase,
                    background: s.background,
                })
                .collect();
            let mut plan = plan_step(&slots, self.cfg.limits);
            let mut short = false;
            for &(i, n) in &plan.items {
                if phases[i] == SeqPhase::NEXT {
                    let c = &mut self.active[i].cache;
                    if self.pool.grow(c, c.len() + n).is_err() {
                        short = true;
                        break;
                    }
                }
            }
            if !short {
                let mut kept = Vec::with_capacity(plan.items.len());
                for (i, n) in plan.items {
                    if phases[i] != SeqPhase::NEXT {
                        let c = &mut self.active[i].cache;
                        let room =
                            (c.blocks().len() + self.pool.available()) * BLOCK_TOKENS - c.len();
                        let n = n.min(room);
                        if n == 0 || self.pool.grow(c, c.len() + n).is_err() {
                            continue;
                        }
                        kept.push((i, n));
                    } else {
                        kept.push((i, n));
                    }
                }
                if !kept.is_empty() {
                    return Some(StepPlan { items: kept });
                }
                plan = StepPlan::default();
            }
            debug_assert!(plan.is_empty() || short);
            if self.active.len() == 1 {
                // Cannot happen for a request `submit` accepted (it fits the whole pool);
                // fail it rather than spin.
                let e = crate::model::KvExhausted {
                    needed: blocks_for(self.active[0].total()),
                    available: self.pool.available(),
                    total: self.pool.num_blocks(),
                };
                self.active[0].fail(StreamEvent::Failed(e.to_string()));
                return None;
            }
            self.preempt_newest();
        }
    }

    /// Frees the blocks of the latest-arrived active sequence and parks it, tokens kept, to
    /// be readmitted (and recomputed) before anything new.
    fn preempt_newest(&mut self) {
        let Some(i) = (0..self.active.len()).max_by_key(|&i| self.active[i].arrived) else {
            return;
        };
        let mut seq = self.active.remove(i);
        self.pool.release(&mut seq.cache);
        seq.published = 0;
        metrics::counter!(m::KV_PREEMPTIONS_TOTAL).increment(1);
        self.shared.preemptions.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(
            tokens = seq.total(),
            "preempted a sequence for lack of KV blocks"
        );
        let at = self.preempted.partition_point(|s| s.arrived <= seq.arrived);
        self.preempted.insert(at, seq);
    }

    /// Publishes the prompt blocks of sequence `i` that are now full, for prefix sharing.
    fn publish_prompt_blocks(&mut self, i: usize) {
        let seq = &mut self.active[i];
        let full = seq.cache.len().min(seq.prompt.len()) / BLOCK_TOKENS;
        for b in seq.published..full {
            self.pool.publish(&seq.cache, b, seq.prompt_hashes[b]);
        }
        seq.published = seq.published.max(full);
    }

    fn step(&mut self) {
        let Some(plan) = self.plan_with_blocks() else {
            return;
        };
        metrics::histogram!(m::BATCH_SIZE).record(plan.items.len() as f64);
        // (index, tokens run, whether the chunk ends with a token to sample after)
        let mut ran = Vec::with_capacity(plan.items.len());
        let result = {
            let mut chunks = Vec::with_capacity(plan.items.len());
            // Constraints of the sequences that sample this step: their next masks are
            // computed while the forward pass runs.
            let mut constraints = Vec::new();
            let mut items = plan.items.iter().peekable();
            for (i, seq) in self.active.iter_mut().enumerate() {
                let Some(&&(j, n)) = items.peek() else { break };
                if j != i {
                    continue;
                }
                items.next();
                let total = seq.total();
                let packed = seq.packed_prompt();
                let Sequence {
                    prompt,
                    generated,
                    cache,
                    adapter,
                    sampler,
                    ..
                } = seq;
                let done = cache.len();
                let decode = done >= prompt.len();
                let sample = done + n == total;
                if sample {
                    constraints.extend(sampler.constraint_mut());
                }
                // A replay after preemption is service already charged once.
                let (p, g) = match (decode, sample && n == 1) {
                    (false, _) => (n, 0),
                    (true, true) => (0, 1),
                    (true, false) => (0, 0),
                };
                self.waiting.charge(&seq.tenant, p, g);
                let tokens = if decode {
                    let at = done - prompt.len();
                    &generated[at..at + n]
                } else {
                    &prompt[done..done + n]
                };
                chunks.push(SeqChunk {
                    tokens,
                    cache,
                    want_logits: sample,
                    decode: decode || packed,
                    adapter: adapter.as_ref().map(|a| a.adapter()),
                });
                ran.push((i, n, sample));
            }
            let (model, pool) = (&self.model, &mut self.pool);
            if constraints.is_empty() {
                model.llama.forward_step(pool, &mut chunks)
            } else {
                std::thread::scope(|s| {
                    s.spawn(|| {
                        use rayon::prelude::*;
                        constraints.par_iter_mut().for_each(|c| c.prepare());
                    });
                    model.llama.forward_step(pool, &mut chunks)
                })
            }
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed");
                for &(i, _, _) in &ran {
                    self.active[i].fail(StreamEvent::Failed(e.to_string()));
                }
                return;
            }
        };
        let mut rows = logits.into_iter();
        let mut to_sample = Vec::new();
        for (i, _, sample) in ran {
            self.publish_prompt_blocks(i);
            if sample {
                let Some(row) = rows.next() else { break };
                if self.active[i].classify {
                    self.emit_classes(i, row);
                } else {
                    to_sample.push((i, row));
                }
            }
        }
        for (i, sampled) in self.sample_rows(to_sample) {
            self.emit_next(i, sampled);
        }
    }

    /// Sends classified sequence `i` its class logits and ends it.
    fn emit_classes(&mut self, i: usize, logits: Vec<f32>) {
        let seq = &mut self.active[i];
        seq.first_token.get_or_insert(Instant::now());
        let _ = seq.events.try_send(StreamEvent::Classified { logits });
        seq.finish(FinishReason::Stop);
    }

    /// Samples each `(sequence, logits)` row's next token with the sequence's own sampler,
    /// the rows in parallel (each sampler's draws are its own, so the tokens do not depend
    /// on the order or the threads). A sampler reads every logit of its row, ~49 K for
    /// SmolLM2: serially, 32 rows held one core while the other waited (BENCHMARKS.md,
    /// issue 17's eighth part: ~5 % of the 32-stream decode phase).
    fn sample_rows(
        &mut self,
        rows: Vec<(usize, Vec<f32>)>,
    ) -> Vec<(usize, Result<Sampled, String>)> {
        use rayon::prelude::*;
        let mut seqs: Vec<Option<&mut Sequence>> = self.active.iter_mut().map(Some).collect();
        let mut jobs: Vec<(usize, &mut Sampler, Vec<f32>)> = rows
            .into_iter()
            .filter_map(|(i, row)| Some((i, &mut seqs.get_mut(i)?.take()?.sampler, row)))
            .collect();
        jobs.par_iter_mut()
            .map(|(i, sampler, row)| (*i, sampler.sample(row)))
            .collect()
    }

    /// Records sequence `i`'s sampled token and sends what it completes.
    fn emit_next(&mut self, i: usize, sampled: Result<Sampled, String>) {
        let tk = &self.model.tokenizer;
        let max_pos = self.model.config().max_position;
        let seq = &mut self.active[i];
        let now = Instant::now();
        let s = match sampled {
            Ok(s) => s,
            Err(e) => {
                seq.fail(StreamEvent::Failed(format!("structured output: {e}")));
                return;
            }
        };
        match seq.last_token {
            None => metrics::histogram!(m::TIME_TO_FIRST_TOKEN)
                .record((now - seq.arrived).as_secs_f64()),
            Some(t) => metrics::histogram!(m::INTER_TOKEN_LATENCY).record((now - t).as_secs_f64()),
        }
        metrics::counter!(m::GENERATED_TOKENS_TOTAL).increment(1);
        seq.first_token.get_or_insert(now);
        seq.last_token = Some(now);
        seq.generated.push(s.token);
        let (logprobs, top_logprobs) = if seq.sampler.params().logprobs {
            let top = if seq.sampler.params().top_logprobs > 0 {
                vec![s.top]
            } else {
                vec![]
            };
            (vec![s.logprob], top)
        } else {
            (vec![], vec![])
        };
        let mut finish = None;
        let mut text = String::new();
        if tk.is_eos(s.token) {
            finish = Some(FinishReason::Eos);
        } else {
            match seq.output.push(tk, &seq.generated) {
                Ok(p) => {
                    text = p.text;
                    if p.stopped {
                        finish = Some(FinishReason::Stop);
                    }
                }
                Err(e) => {
                    seq.fail(StreamEvent::Failed(e.to_string()));
                    return;
                }
            }
        }
        if finish.is_none() && seq.sampler.constraint_done() {
            // The constrained output is complete and nothing may follow.
            finish = Some(FinishReason::Stop);
        }
        let full = seq.generated.len() >= seq.sampler.params().max_new_tokens as usize
            || seq.prompt.len() + seq.generated.len() >= max_pos;
        if finish.is_none() && full {
            finish = Some(FinishReason::Length);
        }
        if matches!(finish, Some(FinishReason::Length | FinishReason::Eos)) {
            text.push_str(&seq.output.flush());
        }
        let _ = seq.events.try_send(StreamEvent::Tokens {
            text,
            ids: vec![s.token],
            logprobs,
            top_logprobs,
        });
        if let Some(r) = finish {
            seq.finish(r);
        }
    }
}

/// The placeholder of a virtual position in a sequence's `prompt` (never a vocabulary id:
/// those positions are seeded from the adapter's KV prefix, never run). Position `i` holds
/// `VIRTUAL - i`, so block hashes tell positions apart; the salt tells adapters apart.
const VIRTUAL: u32 = u32::MAX;

/// What a request's cache holds positions for: its adapter's virtual tokens, then its
/// prompt.
fn positions(req: &super::GenerationRequest) -> Vec<u32> {
    let virt = req
        .adapter
        .as_ref()
        .map_or(0, |a| a.adapter().virtual_tokens());
    (0..virt as u32)
        .map(|i| VIRTUAL - i)
        .chain(req.prompt_ids.iter().copied())
        .collect()
}

/// Fills the virtual positions of a new block table from the adapter's KV prefix: computed
/// once per adapter version (at load) and copied here, or already present where the table's
/// first blocks came from the prefix cache. `take_blocks` has checked the blocks are there;
/// should they not be, the table is released and false returned (the request waits).
fn seed_prefix(pool: &mut KvPool, cache: &mut KvCache, adapter: Option<&AdapterLease>) -> bool {
    let Some(prefix) = adapter.and_then(|a| a.adapter().prefix.as_deref()) else {
        return true;
    };
    if cache.len() < prefix.len {
        if pool.grow(cache, prefix.len).is_err() {
            pool.release(cache);
            return false;
        }
        pool.seed_prefix(cache, prefix);
    }
    true
}

/// Prompts of at most this many tokens run through the decode kernel (`--decode-kernel`),
/// like decode rows; longer ones through the exact packed kernel (`Linear::forward_rows`).
/// Under the default `exact` kernel the two are one path. `int16` is fast for a few rows and
/// slow for many (1.9-2.7x the exact kernel's time at 256 rows, `kernels`), so long prompts
/// keep the exact one. (Before GGUF weights were held as blocks only, long prompts ran
/// through an f32 GEMM, and this limit kept the ~85 ms that GEMM put before a short
/// request's first token away from it.)
pub const PACKED_PROMPT_TOKENS: usize = 32;

/// Whether a prompt of `tokens` tokens runs through the decode kernel. A property of the
/// request alone, never of the step it shares or of how its prefill is chunked, so a
/// sequence's bits stay what they are alone; the prefix cache keeps the two kinds apart
/// ([`prefix_salt`]).
fn packed_prompt(tokens: usize) -> bool {
    tokens <= PACKED_PROMPT_TOKENS
}

/// The prefix cache's isolation key of a request: its tenant, the content hash of its
/// adapter version and whether its prompt runs through the decode kernel. Blocks are shared
/// only under equal salts, so a tenant's prompt never makes another tenant's identical
/// prompt faster, a new adapter version never sees the KV of an older one, and KV computed
/// by one kernel never stands in for the other's.
fn prefix_salt(req: &super::GenerationRequest) -> Vec<u8> {
    let adapter = req
        .adapter
        .as_ref()
        .map_or("base", |a| a.row.sha256.as_str());
    let mut salt = Vec::with_capacity(req.tenant.len() + adapter.len() + 2);
    salt.extend_from_slice(req.tenant.as_bytes());
    salt.push(0);
    salt.extend_from_slice(adapter.as_bytes());
    salt.push(packed_prompt(req.prompt_ids.len()) as u8);
    salt
}

/// Takes the cached blocks of a prompt's prefix (never the whole prompt: its last token is
/// always run, for its logits) when the blocks for the rest of `total` positions are
/// available too; otherwise holds nothing and answers None.
fn take_blocks(
    pool: &mut KvPool,
    hashes: &[BlockHash],
    prompt_len: usize,
    total: usize,
) -> Option<KvCache> {
    let max_hit = prompt_len.saturating_sub(1) / BLOCK_TOKENS;
    let mut cache = pool.lookup(hashes, max_hit);
    let needed = blocks_for(total) - cache.blocks().len();
    if needed > pool.available() {
        pool.release(&mut cache);
        return None;
    }
    Some(cache)
}
