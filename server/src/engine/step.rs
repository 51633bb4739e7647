//! The engine loop: admit, reap, plan, forward, sample, emit — once per step, on one thread.
//! Invariant: this loop is the only owner of `Sequence`s (their caches, samplers, outputs);
//! it never blocks on a caller (event channels are sized to never fill).

use std::{
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use tokio::sync::mpsc::{self, error::TryRecvError};

use super::{
    fair::FairQueue,
    output::TextOutput,
    sampler::Sampler,
    scheduler::{plan_step, SeqPhase},
    EngineConfig, FinishReason, Shared, StreamEvent, Submission, Timings, Usage,
};
use crate::{
    adapters::AdapterLease,
    metrics as m,
    model::{BaseModel, KvCache, SeqChunk},
};

struct Sequence {
    prompt: Vec<u32>,
    prefilled: usize,
    generated: Vec<u32>,
    cache: KvCache,
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
    done: bool,
}

impl Sequence {
    fn phase(&self) -> SeqPhase {
        if self.prefilled < self.prompt.len() {
            SeqPhase::Prefill {
                remaining: self.prompt.len() - self.prefilled,
            }
        } else {
            SeqPhase::Decode
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
            prompt_tokens: self.prompt.len() as u32,
            completion_tokens: self.generated.len() as u32,
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
}

impl EngineLoop {
    pub(super) fn new(
        model: Arc<BaseModel>,
        cfg: EngineConfig,
        rx: mpsc::UnboundedReceiver<Submission>,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            waiting: FairQueue::new(cfg.max_active_per_tenant),
            model,
            cfg,
            rx,
            shared,
            active: Vec::new(),
        }
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
        while self.active.len() < self.cfg.max_active_sequences {
            let Some((_, sub)) = self.waiting.pop() else {
                break;
            };
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            self.admit(sub);
        }
        self.waiting.forget_idle();
    }

    pub(super) fn run(mut self) {
        loop {
            let open = self.collect();
            self.admit_waiting();
            metrics::gauge!(m::QUEUE_DEPTH).set(self.waiting.len() as f64);
            if self.active.is_empty() {
                if !open && self.waiting.is_empty() {
                    return;
                }
                match self.rx.blocking_recv() {
                    Some(sub) => {
                        let tenant = sub.req.tenant.clone();
                        self.waiting.push(&tenant, sub);
                    }
                    None if self.waiting.is_empty() => return,
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

    fn admit(&mut self, sub: Submission) {
        let now = Instant::now();
        let Submission {
            req,
            arrived,
            events,
        } = sub;
        let vocab = self.model.config().vocab_size;
        let sampler = Sampler::new(req.params.clone(), vocab, &req.prompt_ids);
        metrics::counter!(m::PROMPT_TOKENS_TOTAL).increment(req.prompt_ids.len() as u64);
        self.active.push(Sequence {
            output: TextOutput::new(req.params.stop.clone()),
            prompt: req.prompt_ids,
            prefilled: 0,
            generated: Vec::new(),
            cache: self.model.llama.new_cache(),
            sampler,
            events,
            arrived,
            admitted: now,
            first_token: None,
            last_token: None,
            deadline: req.deadline,
            adapter: req.adapter,
            tenant: req.tenant,
            done: false,
        });
    }

    /// Ends sequences whose caller left, whose deadline passed, or that a drain cancelled;
    /// then drops every finished sequence.
    fn reap(&mut self) {
        let now = Instant::now();
        let cancel_all = self.shared.cancel_all.load(Ordering::SeqCst);
        for s in self.active.iter_mut().filter(|s| !s.done) {
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
                    });
                }
                s.finish(FinishReason::Cancelled);
            }
        }
        let before = self.active.len();
        for s in self.active.iter().filter(|s| s.done) {
            self.waiting.finished(&s.tenant);
        }
        self.active.retain(|s| !s.done);
        let removed = before - self.active.len();
        if removed > 0 {
            self.shared.in_flight.fetch_sub(removed, Ordering::SeqCst);
        }
        metrics::gauge!(m::ACTIVE_SEQUENCES).set(self.active.len() as f64);
    }

    fn step(&mut self) {
        let phases: Vec<SeqPhase> = self.active.iter().map(Sequence::phase).collect();
        let plan = plan_step(&phases, self.cfg.limits);
        if plan.is_empty() {
            return;
        }
        metrics::histogram!(m::BATCH_SIZE).record(plan.items.len() as f64);
        // (index, tokens run, whether the chunk ends with a token to sample after)
        let mut ran = Vec::with_capacity(plan.items.len());
        let result = {
            let mut chunks = Vec::with_capacity(plan.items.len());
            let mut items = plan.items.iter().peekable();
            for (i, seq) in self.active.iter_mut().enumerate() {
                let Some(&&(j, n)) = items.peek() else { break };
                if j != i {
                    continue;
                }
                items.next();
                let Sequence {
                    prompt,
                    prefilled,
                    generated,
                    cache,
                    adapter,
                    ..
                } = seq;
                let decode = *prefilled >= prompt.len();
                let (p, g) = if decode { (0, 1) } else { (n, 0) };
                self.waiting.charge(&seq.tenant, p, g);
                let (tokens, sample) = if decode {
                    (&generated[generated.len() - 1..], true)
                } else {
                    let end = *prefilled + n;
                    (&prompt[*prefilled..end], end == prompt.len())
                };
                chunks.push(SeqChunk {
                    tokens,
                    cache,
                    want_logits: sample,
                    decode,
                    lora: adapter.as_ref().map(|a| a.weights()),
                });
                ran.push((i, n, sample));
            }
            self.model.llama.forward_batch(&mut chunks)
        };
        let logits = match result.and_then(|l| Ok(l.to_vec2::<f32>()?)) {
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
        for (i, n, sample) in ran {
            let seq = &mut self.active[i];
            if seq.prefilled < seq.prompt.len() {
                seq.prefilled += n;
            }
            if sample {
                let Some(mut row) = rows.next() else { break };
                self.emit_next(i, &mut row);
            }
        }
    }

    /// Samples the next token of sequence `i` from its logits and sends what it completes.
    fn emit_next(&mut self, i: usize, logits: &mut [f32]) {
        let tk = &self.model.tokenizer;
        let max_pos = self.model.config().max_position;
        let seq = &mut self.active[i];
        let now = Instant::now();
        let s = seq.sampler.sample(logits);
        match seq.last_token {
            None => metrics::histogram!(m::TIME_TO_FIRST_TOKEN)
                .record((now - seq.arrived).as_secs_f64()),
            Some(t) => metrics::histogram!(m::INTER_TOKEN_LATENCY).record((now - t).as_secs_f64()),
        }
        metrics::counter!(m::GENERATED_TOKENS_TOTAL).increment(1);
        seq.first_token.get_or_insert(now);
        seq.last_token = Some(now);
        seq.generated.push(s.token);
        let logprobs = if seq.sampler.params().logprobs {
            vec![s.logprob]
        } else {
            vec![]
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
        });
        if let Some(r) = finish {
            seq.finish(r);
        }
    }
}
