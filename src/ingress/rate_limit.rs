//! Token buckets: one per agent for its trigger rate, and one per client address for failed
//! token lookups and signatures, so guessing tokens or brute-forcing signatures is throttled.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The arithmetic of a token bucket, separate from locking so that it can be tested directly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, per_second: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
        self.at = now;
    }

    /// Takes one token, or says how long until one is available.
    pub fn take(&mut self, per_second: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        self.refill(per_second, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / per_second))
        }
    }

    /// Whether a token is available, without taking it.
    pub fn peek(&mut self, per_second: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        self.refill(per_second, burst, now);
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / per_second))
        }
    }

    fn is_full(&self, burst: f64) -> bool {
        self.tokens >= burst
    }
}

/// One shared bucket (an agent's trigger rate).
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

impl RateLimiter {
    /// A limiter allowing `per_second` on average and `burst` at once.
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst: burst as f64,
            bucket: Mutex::new(Bucket::full(burst as f64, Instant::now())),
        }
    }

    /// Admits one request or says when to retry.
    pub fn admit(&self) -> Result<(), Duration> {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        b.take(self.per_second, self.burst, Instant::now())
    }
}

/// Buckets keyed by client address, charged only on failures. Memory is bounded: past
/// `max_clients` addresses, buckets that have refilled completely (clients that stopped failing)
/// are forgotten, and if none has, the whole table is reset rather than grow.
#[derive(Debug)]
pub struct FailureLimiter {
    per_second: f64,
    burst: f64,
    max_clients: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl FailureLimiter {
    /// `burst` failures are allowed at once, refilling at `per_second`.
    pub fn new(per_second: f64, burst: u32, max_clients: usize) -> Self {
        Self {
            per_second,
            burst: burst as f64,
            max_clients,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this client may try again now.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        match buckets.get_mut(&client) {
            Some(b) => b.peek(self.per_second, self.burst, Instant::now()),
            None => Ok(()),
        }
    }

    /// Charges one failure to this client.
    pub fn failed(&self, client: IpAddr) {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= self.max_clients && !buckets.contains_key(&client) {
            let (per_second, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| {
                b.refill(per_second, burst, now);
                !b.is_full(burst)
            });
            if buckets.len() >= self.max_clients {
                buckets.clear();
            }
        }
        let b = buckets
            .entry(client)
            .or_insert_with(|| Bucket::full(self.burst, now));
        let _ = b.take(self.per_second, self.burst, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let t0 = Instant::now();
        let mut b = Bucket::full(3.0, t0);
        for _ in 0..3 {
            assert!(b.take(2.0, 3.0, t0).is_ok());
        }
        let wait = b.take(2.0, 3.0, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9);
        assert!(b.take(2.0, 3.0, t0 + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn failures_throttle_only_the_failing_client() {
        let l = FailureLimiter::new(0.001, 2, 10);
        let bad: IpAddr = "10.0.0.1".parse().unwrap();
        let good: IpAddr = "10.0.0.2".parse().unwrap();
        l.failed(bad);
        assert!(l.check(bad).is_ok());
        l.failed(bad);
        assert!(l.check(bad).is_err());
        assert!(l.check(good).is_ok());
    }

    #[test]
    fn failure_table_stays_bounded() {
        let l = FailureLimiter::new(0.001, 1, 4);
        for i in 0..100u8 {
            l.failed(IpAddr::from([10, 0, 0, i]));
        }
        assert!(l.buckets.lock().unwrap().len() <= 4);
    }

    proptest! {
        /// Over any schedule, admitted requests never exceed burst + rate × elapsed.
        #[test]
        fn never_admits_more_than_the_budget(steps in proptest::collection::vec(0u64..500, 1..200), rate in 0.5f64..50.0, burst in 1u32..20) {
            let t0 = Instant::now();
            let mut b = Bucket::full(burst as f64, t0);
            let mut now = t0;
            let mut admitted = 0u32;
            for ms in steps {
                now += Duration::from_millis(ms);
                if b.take(rate, burst as f64, now).is_ok() {
                    admitted += 1;
                }
            }
            let budget = burst as f64 + rate * now.duration_since(t0).as_secs_f64();
            prop_assert!(admitted as f64 <= budget + 1e-6);
        }
    }
}
