//! Fair admission among tenants: which waiting request joins the batch next.
//! Pure state, driven by the engine loop and unit-tested here.
//!
//! Policy (S-LoRA's Virtual Token Counter, "Fairness in Serving Large Language Models",
//! Sheng et al. 2024): every tenant has a counter of the service it received — prompt tokens
//! weigh 1, generated tokens 2. The next request admitted is the oldest waiting one of the
//! tenant with the smallest counter. A tenant that comes back after having nothing queued
//! or running is lifted to the smallest counter among the tenants with work, so idling
//! banks no credit. On top, no tenant may hold more than `max_per_tenant` of the batch's
//! sequences, which keeps slots free for a newcomer even while one tenant floods.
//!
//! What this bounds: a tenant's request waits for a free slot only behind requests of
//! tenants that have received less service than it, and a flooding tenant never holds the
//! last `max_active - max_per_tenant` slots, so another tenant's first request is admitted
//! at the next step. Once admitted, every sequence gets one token per step, whoever owns it.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

/// Weight of a prompt token and of a generated token in the counters.
pub const PROMPT_WEIGHT: f64 = 1.0;
pub const GENERATED_WEIGHT: f64 = 2.0;

#[derive(Debug)]
struct TenantState<T> {
    waiting: VecDeque<T>,
    running: usize,
    counter: f64,
}

impl<T> TenantState<T> {
    fn busy(&self) -> bool {
        !self.waiting.is_empty() || self.running > 0
    }
}

/// Waiting requests by tenant, with each tenant's counter and running count.
#[derive(Debug)]
pub struct FairQueue<T> {
    tenants: HashMap<Arc<str>, TenantState<T>>,
    waiting: usize,
    max_per_tenant: usize,
}

impl<T> FairQueue<T> {
    pub fn new(max_per_tenant: usize) -> Self {
        Self {
            tenants: HashMap::new(),
            waiting: 0,
            max_per_tenant: max_per_tenant.max(1),
        }
    }

    /// Requests waiting, all tenants together.
    pub fn len(&self) -> usize {
        self.waiting
    }

    pub fn is_empty(&self) -> bool {
        self.waiting == 0
    }

    /// Queues a request of `tenant`.
    pub fn push(&mut self, tenant: &Arc<str>, item: T) {
        let floor = self
            .tenants
            .iter()
            .filter(|(name, s)| *name != tenant && s.busy())
            .map(|(_, s)| s.counter)
            .min_by(f64::total_cmp);
        let s = self
            .tenants
            .entry(tenant.clone())
            .or_insert_with(|| TenantState {
                waiting: VecDeque::new(),
                running: 0,
                counter: 0.0,
            });
        if !s.busy() {
            if let Some(f) = floor {
                s.counter = s.counter.max(f);
            }
        }
        s.waiting.push_back(item);
        self.waiting += 1;
    }

    /// The next request to admit: the oldest of the least-served tenant that is below its
    /// share of the batch (ties: the tenant with fewer running, then by name). Counts it as
    /// running.
    pub fn pop(&mut self) -> Option<(Arc<str>, T)> {
        let cap = self.max_per_tenant;
        let (name, _) = self
            .tenants
            .iter()
            .filter(|(_, s)| !s.waiting.is_empty() && s.running < cap)
            .min_by(|a, b| {
                (a.1.counter.total_cmp(&b.1.counter))
                    .then(a.1.running.cmp(&b.1.running))
                    .then_with(|| a.0.cmp(b.0))
            })?;
        let name = name.clone();
        let s = self.tenants.get_mut(&name)?;
        let item = s.waiting.pop_front()?;
        s.running += 1;
        self.waiting -= 1;
        Some((name, item))
    }

    /// Undoes a [`FairQueue::pop`] whose request could not be admitted after all (no KV
    /// room yet): it goes back to the front of its tenant's queue, counters unchanged.
    pub fn unpop(&mut self, tenant: &Arc<str>, item: T) {
        let s = self
            .tenants
            .entry(tenant.clone())
            .or_insert_with(|| TenantState {
                waiting: VecDeque::new(),
                running: 1,
                counter: 0.0,
            });
        s.running = s.running.saturating_sub(1);
        s.waiting.push_front(item);
        self.waiting += 1;
    }

    /// Takes back every waiting request for which `drop_it` says so (callers that left).
    pub fn discard(&mut self, mut drop_it: impl FnMut(&T) -> bool) -> usize {
        let mut n = 0;
        for s in self.tenants.values_mut() {
            let before = s.waiting.len();
            s.waiting.retain(|x| !drop_it(x));
            n += before - s.waiting.len();
        }
        self.waiting -= n;
        n
    }

    /// Service `tenant` received: `prompt` tokens prefilled and `generated` tokens decoded.
    pub fn charge(&mut self, tenant: &str, prompt: usize, generated: usize) {
        if let Some(s) = self.tenants.get_mut(tenant) {
            s.counter += PROMPT_WEIGHT * prompt as f64 + GENERATED_WEIGHT * generated as f64;
        }
    }

    /// One of `tenant`'s admitted requests ended.
    pub fn finished(&mut self, tenant: &str) {
        if let Some(s) = self.tenants.get_mut(tenant) {
            s.running = s.running.saturating_sub(1);
        }
    }

    /// Forgets tenants with nothing waiting or running, keeping memory bounded by the
    /// tenants with work. (A forgotten tenant is lifted on its next push anyway.)
    pub fn forget_idle(&mut self) {
        self.tenants.retain(|_, s| s.busy());
    }

    #[cfg(test)]
    fn counter(&self, tenant: &str) -> f64 {
        self.tenants.get(tenant).map_or(0.0, |s| s.counter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Arc<str> {
        s.into()
    }

    #[test]
    fn single_tenant_is_fifo() {
        let mut q = FairQueue::new(8);
        for i in 0..5 {
            q.push(&t("a"), i);
        }
        let order: Vec<i32> = std::iter::from_fn(|| q.pop().map(|x| x.1)).collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_newcomer_goes_before_a_flooder_that_was_served() {
        let mut q = FairQueue::new(100);
        let (a, b) = (t("flood"), t("victim"));
        for i in 0..100 {
            q.push(&a, i);
        }
        for _ in 0..10 {
            let _ = q.pop();
        }
        q.charge("flood", 10 * 20, 10);
        q.push(&b, 1000);
        assert_eq!(q.pop().map(|x| x.1), Some(1000));
    }

    #[test]
    fn idling_banks_no_credit() {
        let mut q = FairQueue::new(100);
        let (a, b) = (t("a"), t("b"));
        q.push(&a, 0);
        let _ = q.pop();
        q.charge("a", 0, 1000);
        // b arrives while a is busy: lifted to a's counter, not 0.
        q.push(&b, 1);
        assert_eq!(q.counter("b"), q.counter("a"));
    }

    #[test]
    fn tenants_alternate_when_served_equally() {
        let mut q = FairQueue::new(100);
        let (a, b) = (t("a"), t("b"));
        for i in 0..4 {
            q.push(&a, i);
            q.push(&b, 10 + i);
        }
        let mut owners = Vec::new();
        while let Some((who, _)) = q.pop() {
            q.charge(&who, 10, 0);
            owners.push(who.to_string());
        }
        assert_eq!(owners, ["a", "b", "a", "b", "a", "b", "a", "b"]);
    }

    #[test]
    fn the_per_tenant_cap_holds_slots_back() {
        let mut q = FairQueue::new(2);
        let (a, b) = (t("a"), t("b"));
        for i in 0..5 {
            q.push(&a, i);
        }
        assert!(q.pop().is_some() && q.pop().is_some());
        assert!(q.pop().is_none(), "a is at its cap");
        q.push(&b, 9);
        assert_eq!(q.pop().map(|x| x.1), Some(9));
        q.finished("a");
        assert_eq!(q.pop().map(|x| x.1), Some(2));
    }

    #[test]
    fn unpop_puts_the_request_back_first() {
        let mut q = FairQueue::new(1);
        let a = t("a");
        q.push(&a, 0);
        q.push(&a, 1);
        let (who, x) = q.pop().expect("one waits");
        assert!(q.pop().is_none(), "at its cap of one");
        q.unpop(&who, x);
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop().map(|x| x.1), Some(0));
    }

    #[test]
    fn discard_and_forget_keep_counts_right() {
        let mut q = FairQueue::new(4);
        let a = t("a");
        for i in 0..4 {
            q.push(&a, i);
        }
        assert_eq!(q.discard(|x| x % 2 == 0), 2);
        assert_eq!(q.len(), 2);
        while q.pop().is_some() {}
        q.finished("a");
        q.finished("a");
        q.forget_idle();
        assert!(q.tenants.is_empty());
    }
}
