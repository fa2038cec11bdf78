//! Abuse limits: what one source address or one node may ask of the server, so that a
//! stranger guessing enrolment tokens, or a node gone rogue, cannot wear the service down
//! for the rest of the fleet. Every refusal is counted in `/metrics` as
//! `ferry_limit_refusals_total{limit="..."}`.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use tonic::Status;

/// The limits, each configurable (`ferry server`'s `[limits]` section, in kebab case).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AbuseLimits {
    /// Failed enrolments one source address may make per minute; past that, every attempt
    /// from it is refused until the minute has refilled.
    pub enrol_failures_per_minute: u32,
    /// Heartbeats and task pulls one node may make per second, sustained; twice as many may
    /// come in a burst. An agent makes well under one per second.
    pub node_calls_per_second: f64,
    /// Uploads one node may stream at once (a node uploads one update per round; a second
    /// allows a resumed upload while the server has not yet noticed the old one broke).
    pub uploads_per_node: usize,
    /// Bytes of unfinished uploads the server keeps for one node; starting an upload past
    /// it discards that node's oldest unfinished ones. `None`: twice the largest update the
    /// model allows.
    pub staged_bytes_per_node: Option<u64>,
}

impl Default for AbuseLimits {
    fn default() -> Self {
        Self {
            enrol_failures_per_minute: 10,
            node_calls_per_second: 10.0,
            uploads_per_node: 2,
            staged_bytes_per_node: None,
        }
    }
}

impl AbuseLimits {
    /// Refuses limits that would shut out well-behaved nodes, naming the fix.
    pub fn check(&self) -> Result<(), String> {
        if self.enrol_failures_per_minute == 0 || self.uploads_per_node == 0 {
            return Err("enrol-failures-per-minute and uploads-per-node must be at least 1".into());
        }
        if !(self.node_calls_per_second.is_finite() && self.node_calls_per_second >= 0.5) {
            return Err(format!(
                "node-calls-per-second = {} is too low: an agent needs about one call a second",
                self.node_calls_per_second
            ));
        }
        if self.staged_bytes_per_node == Some(0) {
            return Err("staged-bytes-per-node must be positive".into());
        }
        Ok(())
    }
}

/// Which limit refused a call, as `/metrics` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Too many failed enrolments from one address.
    EnrolFailures,
    /// Too many heartbeats or task pulls from one node.
    NodeCallRate,
    /// Too many uploads at once from one node.
    ConcurrentUploads,
    /// An upload larger than what the server keeps for one node.
    StagedBytes,
}

impl Limit {
    /// The `limit` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::EnrolFailures => "enrol_failures",
            Self::NodeCallRate => "node_call_rate",
            Self::ConcurrentUploads => "concurrent_uploads",
            Self::StagedBytes => "staged_bytes",
        }
    }

    /// Counts a refusal by this limit and logs it; returns `status` for the caller.
    pub fn refuse(self, who: &str, status: Status) -> Status {
        tracing::warn!(
            "{who}: refused by the {} limit: {}",
            self.label(),
            status.message()
        );
        metrics::counter!("ferry_limit_refusals_total", "limit" => self.label()).increment(1);
        status
    }
}

/// Token buckets by key: each key may spend `burst` at once and regains `per_second`.
/// (Hand-written rather than a rate-limiter crate's because enrolment needs to look at a
/// bucket without spending from it: only failures spend.)
struct Buckets<K> {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

/// Keys kept before full buckets are forgotten.
const REMEMBERED: usize = 4096;

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(per_second: f64, burst: f64) -> Self {
        Self {
            per_second,
            burst,
            buckets: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, (f64, Instant)>> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `key`'s tokens now.
    fn refilled(&self, tokens: f64, since: Instant, now: Instant) -> f64 {
        (tokens + now.duration_since(since).as_secs_f64() * self.per_second).min(self.burst)
    }

    /// Seconds until `key` has a token again; zero when it has one now.
    fn wait(&self, key: &K) -> f64 {
        let now = Instant::now();
        match self.lock().get(key) {
            Some(&(tokens, since)) => {
                let tokens = self.refilled(tokens, since, now);
                if tokens >= 1.0 {
                    0.0
                } else {
                    (1.0 - tokens) / self.per_second
                }
            }
            None => 0.0,
        }
    }

    /// Spends one of `key`'s tokens; false (spending nothing) when it has none.
    fn spend(&self, key: &K) -> bool {
        let now = Instant::now();
        let mut buckets = self.lock();
        if buckets.len() >= REMEMBERED && !buckets.contains_key(key) {
            buckets
                .retain(|_, &mut (tokens, since)| self.refilled(tokens, since, now) < self.burst);
        }
        let (tokens, since) = buckets.entry(key.clone()).or_insert((self.burst, now));
        let available = self.refilled(*tokens, *since, now);
        *since = now;
        if available >= 1.0 {
            *tokens = available - 1.0;
            true
        } else {
            *tokens = available;
            false
        }
    }
}

/// The service's guard: checks each call against the [`AbuseLimits`].
pub struct Guard {
    limits: AbuseLimits,
    enrol_failures: Buckets<IpAddr>,
    node_calls: Buckets<String>,
    uploads: Arc<Mutex<HashMap<String, usize>>>,
}

impl Guard {
    /// A guard enforcing `limits`.
    pub fn new(limits: AbuseLimits) -> Self {
        let failures = f64::from(limits.enrol_failures_per_minute);
        let calls = limits.node_calls_per_second;
        Self {
            enrol_failures: Buckets::new(failures / 60.0, failures),
            node_calls: Buckets::new(calls, 2.0 * calls),
            uploads: Arc::default(),
            limits,
        }
    }

    /// Refuses an enrolment from `source` while it has used up its failures.
    pub fn may_enrol(&self, source: Option<IpAddr>) -> Result<(), Status> {
        let Some(source) = source else { return Ok(()) };
        let wait = self.enrol_failures.wait(&source);
        if wait <= 0.0 {
            return Ok(());
        }
        Err(Limit::EnrolFailures.refuse(
            &source.to_string(),
            Status::resource_exhausted(format!(
                "too many failed enrolments from {source}; try again in {:.0} s with a valid token",
                wait.ceil()
            )),
        ))
    }

    /// Counts a failed enrolment from `source`.
    pub fn enrol_failed(&self, source: Option<IpAddr>) {
        if let Some(source) = source {
            self.enrol_failures.spend(&source);
        }
    }

    /// Refuses a heartbeat or task pull from `node` beyond its rate.
    pub fn node_call(&self, node: &str) -> Result<(), Status> {
        if self.node_calls.spend(&node.to_string()) {
            return Ok(());
        }
        Err(Limit::NodeCallRate.refuse(
            node,
            Status::resource_exhausted(format!(
                "node {node} calls more than {} times per second; slow down",
                self.limits.node_calls_per_second
            )),
        ))
    }

    /// A slot for one of `node`'s uploads, held until the returned value drops; refused when
    /// the node already streams as many as it may.
    pub fn upload_slot(&self, node: &str) -> Result<UploadSlot, Status> {
        let mut uploads = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        let streaming = uploads.entry(node.to_string()).or_default();
        if *streaming >= self.limits.uploads_per_node {
            return Err(Limit::ConcurrentUploads.refuse(
                node,
                Status::aborted(format!(
                    "node {node} already streams {streaming} uploads, the most it may; retry when they end"
                )),
            ));
        }
        *streaming += 1;
        Ok(UploadSlot {
            uploads: self.uploads.clone(),
            node: node.to_string(),
        })
    }

    /// Bytes of unfinished uploads kept for one node, given the largest update allowed.
    pub fn staged_bytes_per_node(&self, max_update_bytes: u64) -> u64 {
        self.limits
            .staged_bytes_per_node
            .unwrap_or(max_update_bytes.saturating_mul(2))
    }
}

/// One of a node's uploads in progress; dropping it frees the slot.
pub struct UploadSlot {
    uploads: Arc<Mutex<HashMap<String, usize>>>,
    node: String,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut uploads = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(streaming) = uploads.get_mut(&self.node) {
            *streaming -= 1;
            if *streaming == 0 {
                uploads.remove(&self.node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(limits: AbuseLimits) -> Guard {
        Guard::new(limits)
    }

    #[test]
    fn enrolment_is_refused_after_the_failures_a_minute_allows_and_only_for_that_source() {
        let g = guard(AbuseLimits {
            enrol_failures_per_minute: 3,
            ..AbuseLimits::default()
        });
        let guesser = Some(IpAddr::from([10, 0, 0, 1]));
        let other = Some(IpAddr::from([10, 0, 0, 2]));
        for _ in 0..3 {
            assert!(g.may_enrol(guesser).is_ok());
            g.enrol_failed(guesser);
        }
        let refused = g.may_enrol(guesser).expect_err("out of failures");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("try again in 20 s"),
            "{}",
            refused.message()
        );
        assert!(g.may_enrol(other).is_ok());
    }

    #[test]
    fn node_calls_beyond_the_burst_are_refused_per_node() {
        let g = guard(AbuseLimits {
            node_calls_per_second: 0.001,
            ..AbuseLimits::default()
        });
        // A burst of twice the rate, rounded down: none at 0.002.
        assert_eq!(
            g.node_call("a").map_err(|s| s.code()),
            Err(tonic::Code::ResourceExhausted)
        );
        let g = guard(AbuseLimits {
            node_calls_per_second: 2.0,
            ..AbuseLimits::default()
        });
        let allowed = (0..10).filter(|_| g.node_call("a").is_ok()).count();
        assert_eq!(allowed, 4);
        assert!(g.node_call("b").is_ok());
    }

    #[test]
    fn upload_slots_are_capped_per_node_and_come_back_when_dropped() {
        let g = guard(AbuseLimits {
            uploads_per_node: 1,
            ..AbuseLimits::default()
        });
        let first = g.upload_slot("a").expect("free");
        assert_eq!(
            g.upload_slot("a").err().map(|s| s.code()),
            Some(tonic::Code::Aborted)
        );
        let _other = g.upload_slot("b").expect("another node's");
        drop(first);
        assert!(g.upload_slot("a").is_ok());
    }

    #[test]
    fn forgotten_buckets_are_only_full_ones() {
        let buckets = Buckets::<u32>::new(0.0001, 1.0);
        for key in 0..REMEMBERED as u32 {
            buckets.spend(&key);
        }
        // Every bucket is empty, so none is forgotten; a full one would be.
        assert!(buckets.spend(&(REMEMBERED as u32)));
        assert!(!buckets.spend(&0));
    }
}
