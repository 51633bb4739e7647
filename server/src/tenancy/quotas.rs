//! Per-tenant quotas: the limits (server defaults, overridden per tenant) and the pure
//! meters behind the two rate-like ones (concurrent streams, generated tokens per minute).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Quota values; `None` means "not set here" (an override that keeps the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quotas {
    pub max_adapters: Option<u64>,
    pub max_stored_bytes: Option<u64>,
    pub max_datasets: Option<u64>,
    pub max_running_jobs: Option<u32>,
    pub max_queued_jobs: Option<u32>,
    pub max_concurrent_streams: Option<u32>,
    pub max_tokens_per_minute: Option<u64>,
}

/// Effective limits of one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_adapters: u64,
    pub max_stored_bytes: u64,
    pub max_datasets: u64,
    pub max_running_jobs: u32,
    pub max_queued_jobs: u32,
    pub max_concurrent_streams: u32,
    pub max_tokens_per_minute: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_adapters: 100,
            max_stored_bytes: 10 << 30,
            max_datasets: 100,
            max_running_jobs: 1,
            max_queued_jobs: 10,
            max_concurrent_streams: 64,
            max_tokens_per_minute: 1_000_000,
        }
    }
}

impl Quotas {
    /// `self`'s values where set, else `defaults`.
    pub fn over(&self, d: &Limits) -> Limits {
        Limits {
            max_adapters: self.max_adapters.unwrap_or(d.max_adapters),
            max_stored_bytes: self.max_stored_bytes.unwrap_or(d.max_stored_bytes),
            max_datasets: self.max_datasets.unwrap_or(d.max_datasets),
            max_running_jobs: self.max_running_jobs.unwrap_or(d.max_running_jobs),
            max_queued_jobs: self.max_queued_jobs.unwrap_or(d.max_queued_jobs),
            max_concurrent_streams: self
                .max_concurrent_streams
                .unwrap_or(d.max_concurrent_streams),
            max_tokens_per_minute: self
                .max_tokens_per_minute
                .unwrap_or(d.max_tokens_per_minute),
        }
    }

    /// The fields set in `newer` replace ours.
    pub fn merged(&self, newer: &Quotas) -> Quotas {
        Quotas {
            max_adapters: newer.max_adapters.or(self.max_adapters),
            max_stored_bytes: newer.max_stored_bytes.or(self.max_stored_bytes),
            max_datasets: newer.max_datasets.or(self.max_datasets),
            max_running_jobs: newer.max_running_jobs.or(self.max_running_jobs),
            max_queued_jobs: newer.max_queued_jobs.or(self.max_queued_jobs),
            max_concurrent_streams: newer.max_concurrent_streams.or(self.max_concurrent_streams),
            max_tokens_per_minute: newer.max_tokens_per_minute.or(self.max_tokens_per_minute),
        }
    }
}

/// A token bucket of generated tokens: it holds at most a minute's allowance, refills
/// continuously, and a stream may start while it is above zero. Tokens are charged as
/// they are generated, so a long answer can take it below zero (the debt delays the
/// tenant's next stream instead of cutting this one off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    level: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn full(per_minute: u64, now: Instant) -> Self {
        Self {
            level: per_minute as f64,
            at: now,
        }
    }

    fn refill(&mut self, per_minute: u64, now: Instant) {
        let rate = per_minute as f64 / 60.0;
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * rate).min(per_minute as f64);
        self.at = now;
    }

    /// Takes `n` tokens when the bucket holds them (`Ok`); else says how long until it will.
    /// `n` must not exceed `per_minute` (a full bucket).
    pub fn take(&mut self, n: u64, per_minute: u64, now: Instant) -> Result<(), Duration> {
        self.refill(per_minute, now);
        if self.level >= n as f64 {
            self.level -= n as f64;
            return Ok(());
        }
        let rate = (per_minute as f64 / 60.0).max(1e-9);
        Err(Duration::from_secs_f64(
            ((n as f64 - self.level) / rate).clamp(0.001, 3600.0),
        ))
    }

    /// Returns `n` tokens taken but not used.
    pub fn give_back(&mut self, n: u64, per_minute: u64, now: Instant) {
        self.refill(per_minute, now);
        self.level = (self.level + n as f64).min(per_minute as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_and_merge_keeps_unset_fields() {
        let d = Limits::default();
        let q = Quotas {
            max_datasets: Some(2),
            ..Default::default()
        };
        assert_eq!(q.over(&d).max_datasets, 2);
        assert_eq!(q.over(&d).max_adapters, d.max_adapters);
        let m = q.merged(&Quotas {
            max_adapters: Some(5),
            ..Default::default()
        });
        assert_eq!((m.max_datasets, m.max_adapters), (Some(2), Some(5)));
    }

    #[test]
    fn bucket_refuses_what_it_does_not_hold_and_names_the_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(60, t0); // one token a second
        assert!(b.take(50, 60, t0).is_ok());
        let wait = b.take(20, 60, t0).expect_err("10 left");
        assert!((9.9..=10.1).contains(&wait.as_secs_f64()), "{wait:?}");
        assert!(b.take(20, 60, t0 + Duration::from_secs(10)).is_ok());
        b.give_back(15, 60, t0 + Duration::from_secs(10));
        assert!(b.take(15, 60, t0 + Duration::from_secs(10)).is_ok());
        assert!(b.take(1, 60, t0 + Duration::from_secs(10)).is_err());
    }

    #[test]
    fn bucket_never_holds_more_than_a_minute() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(60, t0);
        b.give_back(60, 60, t0 + Duration::from_secs(3600));
        assert!(b.take(60, 60, t0 + Duration::from_secs(3600)).is_ok());
        assert!(b.take(1, 60, t0 + Duration::from_secs(3600)).is_err());
    }
}
