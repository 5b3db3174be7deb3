//! Denial-of-service limits: nothing queues without bound, every limit answers at once.
//!
//! - [`RateLimiter`]: token buckets. The token is checked first (constant time), then a
//!   request with a valid token draws only from its token's bucket; a request without one
//!   draws from the unauthenticated budgets (one agent-wide, one per client address) and, when
//!   it presented a wrong token, from its address's failure budget. So nothing a client without
//!   a token sends (a flood to a path that does not exist, wrong tokens from the admin's own
//!   address, which on loopback every local user shares) can make a valid token wait. A refusal
//!   carries the wait until the next token: sent as `Retry-After` with a 429.
//! - [`SingleFlight`]: identical concurrent expensive requests (same key: target or snapshot,
//!   route and canonical query) share one computation. The computation runs in
//!   `spawn_blocking` and finishes even when every waiter has gone (a disconnect does not
//!   waste it, and its permit is held until it really ends). [`SingleFlight::run_cancellable`]
//!   is for work that can stop early (a V8 inspector session): there the permit is held by the
//!   waiters, and when the last one goes (its timeout, its client gone) the permit is released
//!   at once and the work is told to stop ([`Cancel`]).
//! - [`Limits::max_expensive`]: a semaphore on concurrent snapshots and renders; when it is
//!   full the request is answered 503 with `Retry-After` at once.
//!
//! The per-key maps are bounded: when full, idle (refilled) buckets are dropped first, then
//! new keys share one overflow bucket.
use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{future::Shared, FutureExt};
use tokio::sync::Semaphore;

use super::errors::ApiError;
use crate::v8::Cancel;

/// Largest request body accepted (bytes).
pub const BODY_LIMIT_DEFAULT: u64 = 16 * 1024;
/// Most distinct keys tracked per limiter map.
const MAX_KEYS: usize = 10_000;

/// All limits of the agent; the defaults suit one agent per node.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests per second without a valid token, for the whole agent (health checks excluded),
    /// and its burst. Requests with a valid token never draw from it.
    pub unauth_per_sec: f64,
    pub unauth_burst: u32,
    /// Requests per second without a valid token from one client address (IPv4, or IPv6 /64),
    /// and its burst.
    pub unauth_per_address_per_sec: f64,
    pub unauth_per_address_burst: u32,
    /// Requests per second per token, and its burst (the only budget a valid token draws from).
    pub token_per_sec: f64,
    pub token_burst: u32,
    /// Failed authentications (a wrong or malformed token) per minute per remote IP, and its
    /// burst; past it that address's requests without a valid token get 429.
    pub auth_failures_per_min: f64,
    pub auth_failures_burst: u32,
    /// Concurrent snapshots and renders; more are answered 503 at once.
    pub max_expensive: usize,
    /// Concurrent connections (TLS handshakes included). When it is reached, the oldest
    /// connection that has not yet shown a valid token (or asked for a health check) is closed
    /// to make room; when every connection has, new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections from one address (IPv4, the whole of 127.0.0.0/8, or IPv6 /64) that have not
    /// yet shown a valid token; a new one past it closes the address's oldest (see
    /// [`super::conn_limits`]).
    pub max_connections_per_address: usize,
    /// Most targets traced at once (`--max-targets`); workloads past it wait in a queue.
    pub max_targets: usize,
    /// Largest request body.
    pub body_bytes: u64,
    /// Longest an expensive request may take before it is answered 503.
    pub request_timeout: Duration,
    /// Longest a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// Longest a client may take to send the request headers (a deadline from the moment the
    /// connection is served: bytes arriving slowly do not extend it), and a request body.
    pub header_read_timeout: Duration,
}

/// `--max-targets`: a node's worth of containers (kubelet's default is 110 pods a node), within
/// the probes' 256 MiB of maps (docs/performance.md).
pub const DEFAULT_MAX_TARGETS: usize = 256;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            unauth_per_sec: 50.0,
            unauth_burst: 100,
            unauth_per_address_per_sec: 10.0,
            unauth_per_address_burst: 20,
            token_per_sec: 5.0,
            token_burst: 20,
            auth_failures_per_min: 10.0,
            auth_failures_burst: 10,
            max_expensive: 2,
            max_connections: 128,
            max_connections_per_address: 16,
            max_targets: DEFAULT_MAX_TARGETS,
            body_bytes: BODY_LIMIT_DEFAULT,
            request_timeout: Duration::from_secs(120),
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// A token bucket: `burst` tokens, refilled at `per_sec`.
#[derive(Clone, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Rate {
    per_sec: f64,
    burst: f64,
}

impl Rate {
    fn new(per_sec: f64, burst: u32) -> Rate {
        Rate { per_sec: per_sec.max(1e-6), burst: f64::from(burst.max(1)) }
    }

    fn full(self, now: Instant) -> Bucket {
        Bucket { tokens: self.burst, last: now }
    }

    fn refill(self, b: &mut Bucket, now: Instant) {
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * self.per_sec).min(self.burst);
        b.last = now;
    }

    /// Takes one token, or says how long until one is there.
    fn take(self, b: &mut Bucket, now: Instant) -> Result<(), Duration> {
        self.refill(b, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.per_sec))
        }
    }
}

/// Buckets per key, bounded to `MAX_KEYS`.
struct KeyedBuckets<K> {
    rate: Rate,
    map: HashMap<K, Bucket>,
    overflow: Bucket,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    fn new(rate: Rate) -> Self {
        KeyedBuckets { rate, map: HashMap::new(), overflow: rate.full(Instant::now()) }
    }

    fn with<R>(&mut self, key: &K, now: Instant, f: impl FnOnce(Rate, &mut Bucket) -> R) -> R {
        if !self.map.contains_key(key) && self.map.len() >= MAX_KEYS {
            let rate = self.rate;
            self.map.retain(|_, b| {
                rate.refill(b, now);
                b.tokens < rate.burst
            });
            if self.map.len() >= MAX_KEYS {
                return f(self.rate, &mut self.overflow);
            }
        }
        let rate = self.rate;
        let b = self.map.entry(key.clone()).or_insert_with(|| rate.full(now));
        f(rate, b)
    }
}

/// Which budget refused a request without a valid token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnauthRefusal {
    /// The address used up its failed-authentication budget (wrong tokens).
    AuthFailures,
    /// The address used up its unauthenticated budget.
    PerAddress,
    /// The agent-wide unauthenticated budget is used up.
    Global,
}

impl UnauthRefusal {
    pub fn message(self) -> &'static str {
        match self {
            UnauthRefusal::AuthFailures => "too many failed authentications from this address",
            UnauthRefusal::PerAddress => "too many requests without a valid token from this address",
            UnauthRefusal::Global => "too many requests without a valid token",
        }
    }
}

/// Per-token budgets for valid tokens; agent-wide, per-address and failed-authentication
/// budgets for everything else.
pub struct RateLimiter {
    unauth_rate: Rate,
    unauth: Mutex<Bucket>,
    unauth_per_address: Mutex<KeyedBuckets<IpAddr>>,
    per_token: Mutex<KeyedBuckets<String>>,
    failures: Mutex<KeyedBuckets<IpAddr>>,
}

impl RateLimiter {
    pub fn new(limits: &Limits) -> RateLimiter {
        let now = Instant::now();
        let unauth_rate = Rate::new(limits.unauth_per_sec, limits.unauth_burst);
        RateLimiter {
            unauth_rate,
            unauth: Mutex::new(unauth_rate.full(now)),
            unauth_per_address: Mutex::new(KeyedBuckets::new(Rate::new(
                limits.unauth_per_address_per_sec,
                limits.unauth_per_address_burst,
            ))),
            per_token: Mutex::new(KeyedBuckets::new(Rate::new(limits.token_per_sec, limits.token_burst))),
            failures: Mutex::new(KeyedBuckets::new(Rate::new(
                limits.auth_failures_per_min / 60.0,
                limits.auth_failures_burst,
            ))),
        }
    }

    /// One request with a valid token against the budget of the token named `name` (and no
    /// other budget).
    pub fn check_token(&self, name: &str) -> Result<(), Duration> {
        self.per_token.lock().unwrap().with(&name.to_owned(), Instant::now(), |r, b| r.take(b, Instant::now()))
    }

    /// One request without a valid token from `ip` (`None`: unknown peer, only the agent-wide
    /// budget applies); `failed` when it presented a token that is not valid. Checked in
    /// order: the address's failure budget (wrong tokens only), its unauthenticated budget,
    /// then the agent-wide one, so one address cannot use up the agent-wide budget beyond its
    /// own share.
    pub fn check_unauthenticated(&self, ip: Option<IpAddr>, failed: bool) -> Result<(), (UnauthRefusal, Duration)> {
        let now = Instant::now();
        if let Some(ip) = ip.map(address_key) {
            if failed {
                self.failures
                    .lock()
                    .unwrap()
                    .with(&ip, now, |r, b| r.take(b, now))
                    .map_err(|w| (UnauthRefusal::AuthFailures, w))?;
            }
            self.unauth_per_address
                .lock()
                .unwrap()
                .with(&ip, now, |r, b| r.take(b, now))
                .map_err(|w| (UnauthRefusal::PerAddress, w))?;
        }
        self.unauth_rate.take(&mut self.unauth.lock().unwrap(), now).map_err(|w| (UnauthRefusal::Global, w))
    }
}

/// The address a per-address budget applies to: IPv4 as is (also when mapped into IPv6), IPv6
/// by /64 (what one host usually gets).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// What an expensive request produced: a body and its content type.
#[derive(Debug)]
pub struct Rendered {
    pub content_type: &'static str,
    pub body: bytes::Bytes,
    /// HTTP status of the answer (200 for renders, 201 for a new snapshot).
    pub status: u16,
}

type SharedResult = Shared<Pin<Box<dyn Future<Output = Result<Arc<Rendered>, ApiError>> + Send>>>;
type WeakResult = futures_util::future::WeakShared<Pin<Box<dyn Future<Output = Result<Arc<Rendered>, ApiError>> + Send>>>;

/// Identical concurrent requests share one computation.
#[derive(Clone, Default)]
pub struct SingleFlight {
    inflight: Arc<Mutex<HashMap<String, SharedResult>>>,
    /// Cancellable computations, held only by their waiters (with a generation, so that an
    /// ended one never removes its successor).
    cancellable: Arc<Mutex<HashMap<String, (u64, WeakResult)>>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

/// Removes a cancellable computation's entry when its shared future ends or is dropped.
struct RemoveOnDrop {
    map: Arc<Mutex<HashMap<String, (u64, WeakResult)>>>,
    key: String,
    generation: u64,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap();
        if map.get(&self.key).is_some_and(|(g, _)| *g == self.generation) {
            map.remove(&self.key);
        }
    }
}

impl SingleFlight {
    pub fn new() -> SingleFlight {
        SingleFlight::default()
    }

    /// Number of computations in progress.
    pub fn in_flight(&self) -> usize {
        self.inflight.lock().unwrap().len() + self.cancellable.lock().unwrap().len()
    }

    /// Like [`Self::run`] for `work` that can stop early: it gets a [`Cancel`] that is set
    /// when every waiter has gone (each one's timeout, or its client going away). The permit of
    /// `cap` is held by the waiters' shared future, not by the work: it is released at that
    /// moment, while the work stops at its next check (an inspector session: within
    /// [`crate::v8::inspector::READ_SLICE`], then closes).
    pub async fn run_cancellable<F>(&self, key: String, cap: &Arc<Semaphore>, work: F) -> Result<Arc<Rendered>, ApiError>
    where
        F: FnOnce(Cancel) -> Result<Rendered, ApiError> + Send + 'static,
    {
        let shared = {
            let mut map = self.cancellable.lock().unwrap();
            match map.get(&key).and_then(|(_, w)| w.upgrade()) {
                Some(existing) => existing,
                None => {
                    let permit = cap.clone().try_acquire_owned().map_err(|_| ApiError::busy())?;
                    let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let cancel = Cancel::new();
                    let on_drop = cancel.on_drop();
                    let task = tokio::task::spawn_blocking(move || work(cancel));
                    let remove = RemoveOnDrop { map: self.cancellable.clone(), key: key.clone(), generation };
                    let fut: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
                        let (_permit, _on_drop, _remove) = (permit, on_drop, remove);
                        match task.await {
                            Ok(r) => r.map(Arc::new),
                            Err(e) => {
                                tracing::error!(error = %e, "an expensive request panicked or was cancelled");
                                Err(ApiError::internal("internal", "the computation failed; see the agent's log"))
                            }
                        }
                    });
                    let shared = fut.shared();
                    let weak = shared.downgrade().expect("a new shared future is not complete");
                    map.insert(key, (generation, weak));
                    shared
                }
            }
        };
        shared.await
    }

    /// Runs `work` in `spawn_blocking` unless a computation with the same `key` is already in
    /// progress, in which case its result is shared. A new computation needs a permit of
    /// `cap`; none free means 503 at once.
    pub async fn run<F>(&self, key: String, cap: &Arc<Semaphore>, work: F) -> Result<Arc<Rendered>, ApiError>
    where
        F: FnOnce() -> Result<Rendered, ApiError> + Send + 'static,
    {
        let shared = {
            let mut map = self.inflight.lock().unwrap();
            if let Some(existing) = map.get(&key) {
                existing.clone()
            } else {
                let permit = cap.clone().try_acquire_owned().map_err(|_| ApiError::busy())?;
                let inflight = self.inflight.clone();
                let k = key.clone();
                let task = tokio::spawn(async move {
                    let result = tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        work()
                    })
                    .await;
                    inflight.lock().unwrap().remove(&k);
                    match result {
                        Ok(r) => r.map(Arc::new),
                        Err(e) => {
                            tracing::error!(error = %e, "an expensive request panicked or was cancelled");
                            Err(ApiError::internal("internal", "the computation failed; see the agent's log"))
                        }
                    }
                });
                let fut: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
                    task.await.unwrap_or_else(|_| Err(ApiError::internal("internal", "the computation was cancelled")))
                });
                let shared = fut.shared();
                map.insert(key, shared.clone());
                shared
            }
        };
        shared.await
    }
}

/// Runs blocking `work` under a permit of `cap` (503 at once when none is free), without
/// sharing: for requests that must each have their own effect (taking a snapshot, attaching).
pub async fn exclusive<T, F>(cap: &Arc<Semaphore>, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    let permit = cap.clone().try_acquire_owned().map_err(|_| ApiError::busy())?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await
    .unwrap_or_else(|e| {
        tracing::error!(error = %e, "a blocking request panicked or was cancelled");
        Err(ApiError::internal("internal", "the computation failed; see the agent's log"))
    })
}

/// Like [`exclusive`] for `work` that can stop early: the permit is held by the request, not
/// by the work, and the request ending (its timeout, its client gone) releases it at once and
/// sets the work's [`Cancel`].
pub async fn exclusive_cancellable<T, F>(cap: &Arc<Semaphore>, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(Cancel) -> Result<T, ApiError> + Send + 'static,
{
    let permit = cap.clone().try_acquire_owned().map_err(|_| ApiError::busy())?;
    let cancel = Cancel::new();
    let (_permit, _on_drop) = (permit, cancel.on_drop());
    tokio::task::spawn_blocking(move || work(cancel)).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a blocking request panicked or was cancelled");
        Err(ApiError::internal("internal", "the computation failed; see the agent's log"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A bucket gives its burst, then refuses with the time until the next token.
    #[test]
    fn bucket_refuses_past_burst_with_wait() {
        let rate = Rate::new(2.0, 3);
        let t0 = Instant::now();
        let mut b = rate.full(t0);
        for _ in 0..3 {
            rate.take(&mut b, t0).unwrap();
        }
        let wait = rate.take(&mut b, t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500), "{wait:?}");
        rate.take(&mut b, t0 + Duration::from_millis(600)).unwrap();
    }

    /// Failed authentications are counted per IP; other IPs are not affected, and a valid
    /// token's budget is not touched by them.
    #[test]
    fn failures_are_per_ip() {
        let limits = Limits { auth_failures_per_min: 1.0, auth_failures_burst: 2, ..Limits::default() };
        let rl = RateLimiter::new(&limits);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        rl.check_unauthenticated(Some(a), true).unwrap();
        rl.check_unauthenticated(Some(a), true).unwrap();
        let (why, wait) = rl.check_unauthenticated(Some(a), true).unwrap_err();
        assert_eq!(why, UnauthRefusal::AuthFailures);
        assert!(wait > Duration::from_secs(30), "{wait:?}");
        rl.check_unauthenticated(Some(b), true).unwrap();
        rl.check_unauthenticated(Some(a), false).unwrap();
        for _ in 0..limits.token_burst {
            rl.check_token("admin").unwrap();
        }
    }

    /// Requests without a valid token use up their own budgets (per address first, then
    /// agent-wide) and never a token's.
    #[test]
    fn unauthenticated_budgets_spare_tokens() {
        let limits = Limits {
            unauth_per_sec: 0.001,
            unauth_burst: 5,
            unauth_per_address_per_sec: 0.001,
            unauth_per_address_burst: 3,
            token_per_sec: 0.001,
            token_burst: 4,
            ..Limits::default()
        };
        let rl = RateLimiter::new(&limits);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..3 {
            rl.check_unauthenticated(Some(a), false).unwrap();
        }
        assert_eq!(rl.check_unauthenticated(Some(a), false).unwrap_err().0, UnauthRefusal::PerAddress);
        rl.check_unauthenticated(Some(b), false).unwrap();
        rl.check_unauthenticated(None, false).unwrap();
        assert_eq!(rl.check_unauthenticated(Some(b), false).unwrap_err().0, UnauthRefusal::Global);
        for _ in 0..4 {
            rl.check_token("ops").unwrap();
        }
        assert!(rl.check_token("ops").is_err());
        rl.check_token("viewer").unwrap();
    }

    /// The key maps stay bounded under many distinct keys.
    #[test]
    fn keyed_buckets_are_bounded() {
        let mut kb = KeyedBuckets::new(Rate::new(0.001, 1));
        let now = Instant::now();
        for i in 0..(MAX_KEYS as u32 + 500) {
            let ip = IpAddr::from(i.to_be_bytes());
            let _ = kb.with(&ip, now, |r, b| r.take(b, now));
        }
        assert!(kb.map.len() <= MAX_KEYS);
    }

    /// A cancellable computation whose waiters all went away releases its permit at once and
    /// sees its cancellation; the next request gets the permit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancellable_flight_releases_its_permit_when_its_waiters_go() {
        let sf = SingleFlight::new();
        let cap = Arc::new(Semaphore::new(1));
        let (seen_tx, seen_rx) = std::sync::mpsc::channel::<bool>();
        let work = move |cancel: Cancel| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !cancel.is_cancelled() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            seen_tx.send(cancel.is_cancelled()).unwrap();
            Err(ApiError::internal("internal", "cancelled"))
        };
        let r = tokio::time::timeout(Duration::from_millis(200), sf.run_cancellable("k".into(), &cap, work)).await;
        assert!(r.is_err(), "the work cannot end by itself");
        assert_eq!(cap.available_permits(), 1, "the permit outlived its request");
        let seen = tokio::task::spawn_blocking(move || seen_rx.recv_timeout(Duration::from_secs(10))).await.unwrap();
        assert_eq!(seen, Ok(true), "the work was not told to stop");
        assert_eq!(sf.in_flight(), 0);
        let ok = sf.run_cancellable("k".into(), &cap, |_| Ok(Rendered { content_type: "text/plain", body: bytes::Bytes::from_static(b"x"), status: 200 }));
        assert_eq!(&ok.await.unwrap().body[..], b"x");
    }

    /// Identical concurrent requests run the work once; a full cap answers 503 at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_flight_shares_and_cap_refuses() {
        let sf = SingleFlight::new();
        let cap = Arc::new(Semaphore::new(1));
        let runs = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let mk = |runs: Arc<AtomicUsize>, rx: Arc<Mutex<std::sync::mpsc::Receiver<()>>>| {
            move || {
                runs.fetch_add(1, Ordering::SeqCst);
                rx.lock().unwrap().recv().unwrap();
                Ok(Rendered { content_type: "text/plain", body: bytes::Bytes::from_static(b"x"), status: 200 })
            }
        };
        // The first poll registers the leader (or joins it) before anything is awaited.
        let mut fa = Box::pin(sf.run("k".into(), &cap, mk(runs.clone(), rx.clone())));
        assert!(futures_util::poll!(&mut fa).is_pending());
        let mut fb = Box::pin(sf.run("k".into(), &cap, mk(runs.clone(), rx.clone())));
        assert!(futures_util::poll!(&mut fb).is_pending());
        // A different key needs a permit, and the only one is taken.
        let other = sf.run("other".into(), &cap, mk(runs.clone(), rx.clone())).await.unwrap_err();
        assert_eq!(other.status, 503);
        tx.send(()).unwrap();
        let (ra, rb) = tokio::join!(fa, fb);
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(Arc::ptr_eq(&ra, &rb));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(sf.in_flight(), 0);
        assert_eq!(cap.available_permits(), 1);
    }
}
