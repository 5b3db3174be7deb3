//! `--push URL`: heap profiles (gzip pprof) sent to a Pyroscope-compatible ingest endpoint,
//! `POST URL/ingest?name=APP{labels}&from=S&until=S&format=pprof&spyName=memscope`, over
//! HTTPS (rustls; `--push-ca-cert` for a private CA) or HTTP on loopback, with a bearer token
//! or basic auth read from a 0600 file.
//!
//! The agent makes one profile per attached workload every `--push-interval` and queues it;
//! one sender thread posts them in order, retrying a refused or failed post up to
//! `--push-retries` times (backoff 0.5 s, doubling). The queue is bounded (`--push-queue`): a
//! profile that finds it full is dropped and counted, so a slow or dead backend never makes
//! the agent grow. Counters: [`PushStats`] (in `/metrics` as `memscope_push_*`).
use std::{
    collections::{BTreeMap, VecDeque},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    time::Duration,
};

use tracing::{debug, warn};

/// How the agent authenticates to the ingest endpoint.
#[derive(Clone)]
pub enum PushAuth {
    None,
    /// `Authorization: Bearer TOKEN`.
    Bearer(String),
    /// `Authorization: Basic base64(USER:PASSWORD)`.
    Basic(String),
}

impl std::fmt::Debug for PushAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PushAuth::None => "none",
            PushAuth::Bearer(_) => "bearer (redacted)",
            PushAuth::Basic(_) => "basic (redacted)",
        })
    }
}

/// `--push` and its options.
#[derive(Clone, Debug)]
pub struct PushConfig {
    /// The endpoint's base URL (`/ingest` is appended unless the URL ends with it).
    pub url: String,
    pub interval: Duration,
    pub auth: PushAuth,
    pub ca_cert: Option<PathBuf>,
    /// Profiles waiting at most.
    pub queue: usize,
    /// Retries of a failed post.
    pub retries: u32,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("--push {0}: expected an http:// or https:// URL")]
    BadUrl(String),
    #[error("--push {0}: http:// sends the profiles (and any credentials) in clear; use https://, or --allow-insecure-remote")]
    Insecure(String),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// Reads a secret file (a bearer token, or `USER:PASSWORD`): mode 0600, one line.
pub fn read_secret(path: &Path) -> Result<String, PushError> {
    let err = |reason: String| PushError::File { path: path.to_owned(), reason };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!("has mode {mode:04o}: it must not be readable by group or others (chmod 600)")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let s = text.trim();
    if s.is_empty() || s.len() > 4096 || s.contains(['\n', '\r']) || s.chars().any(char::is_control) {
        return Err(err("must hold one line of printable characters".into()));
    }
    Ok(s.to_string())
}

/// Checks the URL: `https://` anywhere, `http://` only to loopback unless `insecure_ok`.
pub fn check_url(url: &str, insecure_ok: bool) -> Result<(), PushError> {
    let rest = match url.split_once("://") {
        Some(("https", r)) | Some(("http", r)) if !r.is_empty() => r,
        _ => return Err(PushError::BadUrl(url.to_string())),
    };
    if url.starts_with("http://") && !insecure_ok {
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
            || host.trim_matches(['[', ']']).parse::<std::net::Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(PushError::Insecure(url.to_string()));
        }
    }
    Ok(())
}

/// Counters of the pusher.
#[derive(Debug, Default)]
pub struct PushStats {
    /// Profiles the endpoint accepted (2xx).
    pub sent: AtomicU64,
    /// Profiles given up after every retry.
    pub failed: AtomicU64,
    /// Posts retried.
    pub retries: AtomicU64,
    /// Profiles dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Profiles not made because a render slot was busy or the snapshot failed.
    pub skipped: AtomicU64,
    /// Bytes of profiles accepted.
    pub bytes: AtomicU64,
}

/// One profile to send.
pub struct PushJob {
    /// The ingest query string (without `?`).
    pub query: String,
    pub body: Vec<u8>,
}

/// Label values as Pyroscope's `name` syntax accepts them.
fn label_value(v: &str) -> String {
    v.chars().take(200).map(|c| if c.is_ascii_alphanumeric() || "._/:-".contains(c) { c } else { '_' }).collect()
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `name=APP{k=v,...}&from=&until=&format=pprof&spyName=memscope`.
/// The application name (Pyroscope's `service_name`) of a workload: unique per workload, as
/// Pyroscope's own Kubernetes discovery names a container (`namespace/…/container`):
/// `NAMESPACE/POD/CONTAINER` for a pod's container (a worker, `forks=true`, adds `/wSLOT`),
/// else the workload's id (its executable's or container's name and a hash).
pub fn service_name(workload: &str, labels: &BTreeMap<String, String>) -> String {
    let name = match (labels.get("namespace"), labels.get("pod"), labels.get("container")) {
        (Some(ns), Some(pod), Some(container)) => format!("{ns}/{pod}/{container}"),
        _ => return workload.to_string(),
    };
    match labels.get("worker") {
        Some(slot) => format!("{name}/w{slot}"),
        None => name,
    }
}

pub fn ingest_query(app: &str, labels: &BTreeMap<String, String>, from_s: u64, until_s: u64) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={}", label_value(v))).collect();
    let name = format!("{}{{{}}}", label_value(app), labels.join(","));
    format!("name={}&from={from_s}&until={}&format=pprof&spyName=memscope", url_encode(&name), until_s.max(from_s + 1))
}

/// The queue and its sender thread.
pub struct Pusher {
    config: PushConfig,
    endpoint: String,
    pub stats: Arc<PushStats>,
    queue: Mutex<VecDeque<PushJob>>,
    ready: Condvar,
    http: ureq::Agent,
}

impl Pusher {
    /// Builds the HTTP client (reads `--push-ca-cert`) and starts the sender thread.
    pub fn start(config: PushConfig) -> anyhow::Result<Arc<Pusher>> {
        use anyhow::Context as _;
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &config.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("reading --push-ca-cert {}", ca.display()))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading --push-ca-cert {}", ca.display()))?;
            anyhow::ensure!(!certs.is_empty(), "--push-ca-cert {} holds no PEM certificate", ca.display());
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(config.timeout))
            .max_redirects(0)
            .user_agent(concat!("memscope/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build()
            .into();
        let base = config.url.trim_end_matches('/');
        let endpoint = if base.ends_with("/ingest") { base.to_string() } else { format!("{base}/ingest") };
        let pusher = Arc::new(Pusher {
            config,
            endpoint,
            stats: Arc::new(PushStats::default()),
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            http,
        });
        let p = Arc::downgrade(&pusher);
        std::thread::Builder::new().name("memscope-push".into()).spawn(move || {
            while let Some(p) = p.upgrade() {
                let job = {
                    let mut q = p.queue.lock().unwrap();
                    loop {
                        if let Some(j) = q.pop_front() {
                            break Some(j);
                        }
                        let (g, timeout) = p.ready.wait_timeout(q, Duration::from_millis(500)).unwrap();
                        q = g;
                        if timeout.timed_out() {
                            break None;
                        }
                    }
                };
                if let Some(job) = job {
                    p.send(&job);
                }
            }
        })?;
        Ok(pusher)
    }

    pub fn interval(&self) -> Duration {
        self.config.interval
    }

    /// Queues a profile; drops it (counted) when the queue is full.
    pub fn enqueue(&self, job: PushJob) {
        let mut q = self.queue.lock().unwrap();
        if q.len() >= self.config.queue {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            debug!("push queue full: profile dropped");
            return;
        }
        q.push_back(job);
        self.ready.notify_one();
    }

    /// Posts one profile, with retries.
    fn send(&self, job: &PushJob) {
        let url = format!("{}?{}", self.endpoint, job.query);
        let mut backoff = Duration::from_millis(500);
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(backoff);
                backoff *= 2;
            }
            let mut req = self.http.post(&url).header("Content-Type", "application/octet-stream");
            match &self.config.auth {
                PushAuth::None => {}
                PushAuth::Bearer(t) => req = req.header("Authorization", &format!("Bearer {t}")),
                PushAuth::Basic(up) => req = req.header("Authorization", &format!("Basic {}", base64(up.as_bytes()))),
            }
            match req.send(&job.body[..]) {
                Ok(r) if r.status().is_success() => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes.fetch_add(job.body.len() as u64, Ordering::Relaxed);
                    return;
                }
                Ok(r) => warn!(status = r.status().as_u16(), endpoint = %self.endpoint, attempt, "the ingest endpoint refused a profile"),
                Err(e) => warn!(error = %e, endpoint = %self.endpoint, attempt, "pushing a profile failed"),
            }
        }
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
    }
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three pods whose container is `app` push under three names; a worker under its own;
    /// a process outside Kubernetes under its workload id.
    #[test]
    fn service_names_are_unique_per_workload() {
        let l = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        let names: std::collections::BTreeSet<String> = ["web-0", "web-1", "api-7f9c"]
            .iter()
            .map(|pod| service_name("app-1", &l(&[("namespace", "shop"), ("pod", pod), ("container", "app")])))
            .collect();
        assert_eq!(names.len(), 3);
        assert!(names.contains("shop/web-0/app"), "{names:?}");
        let worker = l(&[("namespace", "db"), ("pod", "pg-0"), ("container", "postgres"), ("worker", "3")]);
        assert_eq!(service_name("postgres-w3-1", &worker), "db/pg-0/postgres/w3");
        assert_eq!(service_name("leaky-0123456789ab", &l(&[("executable", "/opt/leaky")])), "leaky-0123456789ab");
    }

    #[test]
    fn query_and_encodings() {
        let labels: BTreeMap<String, String> =
            [("namespace", "shop"), ("pod", "web-0"), ("executable", "/usr/bin/my app")].into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        let q = ingest_query("app", &labels, 100, 100);
        assert!(q.starts_with("name=app%7Bexecutable%3D%2Fusr%2Fbin%2Fmy_app%2Cnamespace%3Dshop%2Cpod%3Dweb-0%7D&"), "{q}");
        assert!(q.ends_with("&from=100&until=101&format=pprof&spyName=memscope"), "{q}");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
    }

    #[test]
    fn urls_and_secrets() {
        assert!(check_url("https://pyro.example:4040", false).is_ok());
        assert!(check_url("http://127.0.0.1:4040", false).is_ok());
        assert!(check_url("http://localhost/x", false).is_ok());
        assert!(matches!(check_url("http://pyro.example", false), Err(PushError::Insecure(_))));
        assert!(check_url("http://pyro.example", true).is_ok());
        assert!(matches!(check_url("ftp://x", false), Err(PushError::BadUrl(_))));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "secret-token\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_secret(&f).unwrap_err().to_string().contains("0644"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&f).unwrap(), "secret-token");
        assert!(!format!("{:?}", PushAuth::Bearer("secret-token".into())).contains("secret"));
    }
}
