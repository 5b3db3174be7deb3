//! The read-only metrics listener: `--metrics-listen ADDR:PORT` with `--metrics-token-file
//! FILE`, for a Prometheus in the cluster to scrape the agent on its pod IP while the API stays
//! on loopback.
//!
//! It serves three routes and nothing else: `GET /metrics` (the same text as the API's
//! `/metrics`) with `Authorization: Bearer TOKEN`, and `GET /healthz` and `GET /readyz` without
//! a token (kubelet's `httpGet` probes on the pod IP). Every other path is 404 and every other
//! method 405; no route of the API is reachable here, so the metrics token grants nothing
//! else, and an API token is not accepted here.
//!
//! The token file holds one token (16 to 256 printable ASCII characters, surrounding
//! whitespace ignored), must be readable by its owner only (as `--tokens`), and is re-read when
//! it changes (a rotated Kubernetes Secret): a changed file that is invalid leaves the token in
//! force, with a warning. Tokens are compared by their SHA-256 digests in constant time.
//!
//! Limits: TLS with `--tls-cert`/`--tls-key` when the agent has them, plain HTTP otherwise (the
//! metrics token then crosses the pod network in clear: restrict who reaches the port, as
//! deploy/networkpolicy.yaml does); 16 connections (8 from one address); 20 requests a second
//! in all (more get 429); a request head must arrive within the API's header timeout.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use subtle::ConstantTimeEq as _;
use tracing::{info, warn};
use warp::hyper::{
    self,
    header::{self, HeaderValue},
    service::{make_service_fn, service_fn},
    Body, Method, Request, Response, StatusCode,
};

use super::{handlers, tls, State};

/// Concurrent connections to the metrics listener, and from one client address.
const MAX_CONNECTIONS: usize = 16;
const MAX_CONNECTIONS_PER_ADDRESS: usize = 8;
/// Requests a second, all clients together (a scrape every few seconds needs far fewer).
const MAX_RPS: f64 = 20.0;
const MIN_TOKEN_LEN: usize = 16;
const MAX_TOKEN_LEN: usize = 256;

/// `--metrics-listen` and `--metrics-token-file`.
#[derive(Clone, Debug)]
pub struct MetricsListen {
    pub addr: SocketAddr,
    pub token_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsTokenError {
    #[error("--metrics-token-file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("--metrics-token-file {path} has mode {mode:04o}: it must not be readable by group or others (chmod 600 it)")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("--metrics-token-file {path}: {reason}")]
    Invalid { path: PathBuf, reason: &'static str },
}

/// The token's SHA-256 digest.
type Digest = [u8; 32];

fn digest(token: &[u8]) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Reads the token file: one token, mode 0600 (or stricter). Returns its digest and the file's
/// modification time and length (to notice a change).
pub fn load_token(path: &Path) -> Result<(Digest, (SystemTime, u64)), MetricsTokenError> {
    use std::{io::Read as _, os::unix::fs::PermissionsExt as _};
    let io = |source| MetricsTokenError::Io { path: path.to_owned(), source };
    let invalid = |reason| MetricsTokenError::Invalid { path: path.to_owned(), reason };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(invalid("not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(MetricsTokenError::Permissions { path: path.to_owned(), mode });
    }
    let mut text = Vec::new();
    file.take(4096).read_to_end(&mut text).map_err(io)?;
    let token = text.trim_ascii();
    if token.len() < MIN_TOKEN_LEN || token.len() > MAX_TOKEN_LEN {
        return Err(invalid("the token must be 16 to 256 characters long (one token, no `NAME ROLE` fields)"));
    }
    if !token.iter().all(u8::is_ascii_graphic) {
        return Err(invalid("the token must be printable ASCII without spaces"));
    }
    Ok((digest(token), (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len())))
}

/// The token in force, re-read when its file changes.
struct Token {
    path: PathBuf,
    current: Mutex<(Digest, (SystemTime, u64))>,
}

impl Token {
    fn check(&self, presented: &[u8]) -> bool {
        let mut cur = self.current.lock().unwrap();
        let stamp = std::fs::metadata(&self.path).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if stamp.is_some_and(|s| s != cur.1) {
            match load_token(&self.path) {
                Ok(new) => {
                    *cur = new;
                    info!(target: "audit", "--metrics-token-file changed: token reloaded");
                }
                Err(e) => {
                    // Not reported again for the same file.
                    cur.1 = stamp.expect("checked");
                    warn!(target: "audit", error = %e, "--metrics-token-file changed but is invalid; the previous token stays");
                }
            }
        }
        bool::from(digest(presented).ct_eq(&cur.0))
    }
}

/// A token bucket over all requests.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * MAX_RPS).min(MAX_RPS);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A bound metrics listener, ready to serve.
pub struct MetricsServer {
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    token: Arc<Token>,
    local_addr: SocketAddr,
}

impl MetricsServer {
    /// Loads the token and binds the address (the agent does not start when either fails).
    pub async fn bind(config: &MetricsListen, tls: Option<tokio_rustls::TlsAcceptor>) -> anyhow::Result<MetricsServer> {
        use anyhow::Context as _;
        let loaded = load_token(&config.token_file)?;
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("--metrics-listen {}", config.addr))?;
        let local_addr = listener.local_addr().context("reading the metrics listener's address")?;
        if tls.is_none() && !config.addr.ip().is_loopback() {
            warn!(addr = %local_addr, "the metrics listener serves plain HTTP: its token crosses the network in clear (give --tls-cert/--tls-key, or restrict who reaches it)");
        }
        let token = Arc::new(Token { path: config.token_file.clone(), current: Mutex::new(loaded) });
        Ok(MetricsServer { listener, tls, token, local_addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until the task is aborted.
    pub fn spawn(self, state: Arc<State>) -> tokio::task::JoinHandle<()> {
        let MetricsServer { listener, tls, token, local_addr } = self;
        let scheme = if tls.is_some() { "https" } else { "http" };
        info!("metrics listener on {scheme}://{local_addr}/metrics");
        let limits = state.limits.clone();
        let incoming = tls::incoming(listener, tls, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS, limits.tls_handshake_timeout);
        let bucket = Arc::new(Mutex::new(Bucket { tokens: MAX_RPS, at: Instant::now() }));
        let make = make_service_fn(move |conn: &tls::Conn| {
            // Every connection here may stay: there is no API token to prove.
            conn.prover().prove();
            let (state, token, bucket) = (state.clone(), token.clone(), bucket.clone());
            async move {
                Ok::<_, std::convert::Infallible>(service_fn(move |req: Request<Body>| {
                    let reply = answer(&state, &token, &bucket, &req);
                    async move { Ok::<_, std::convert::Infallible>(reply) }
                }))
            }
        });
        let server = hyper::Server::builder(hyper::server::accept::from_stream(incoming))
            .http1_only(true)
            .http1_keepalive(false)
            .http1_header_read_timeout(limits.header_read_timeout)
            .http1_max_buf_size(16 * 1024)
            .serve(make);
        tokio::spawn(async move {
            if let Err(e) = server.await {
                warn!(error = %e, "the metrics listener stopped");
            }
        })
    }
}

fn json(status: StatusCode, error: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": error, "message": message }).to_string();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The answer to one request (see the module doc).
fn answer(state: &State, token: &Token, bucket: &Mutex<Bucket>, req: &Request<Body>) -> Response<Body> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return json(StatusCode::NOT_FOUND, "not_found", "this listener serves /metrics, /healthz and /readyz only");
    }
    if req.method() != Method::GET {
        let mut r = json(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "only GET");
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    match path {
        "/healthz" => return handlers::healthz(),
        "/readyz" => return handlers::readyz(state),
        _ => {}
    }
    if !bucket.lock().unwrap().take() {
        let mut r = json(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests to the metrics listener");
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let authorized = super::auth::bearer(req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()))
        .is_ok_and(|presented| token.check(presented));
    if !authorized {
        let mut r = json(StatusCode::UNAUTHORIZED, "invalid_token", "GET /metrics needs `Authorization: Bearer` with the metrics token");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"memscope-metrics\""));
        return r;
    }
    handlers::metrics(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join("metrics-token");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// The token file: one token (a trailing newline is fine), owner-only, 16-256 printable
    /// characters; anything else is refused with the file named and never the token.
    #[test]
    fn token_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let ok = write(dir.path(), "scrape-0123456789abcdef\n", 0o600);
        let (d, _) = load_token(&ok).unwrap();
        assert_eq!(d, digest(b"scrape-0123456789abcdef"));
        let e = load_token(&write(dir.path(), "scrape-0123456789abcdef", 0o640)).unwrap_err().to_string();
        assert!(e.contains("0640") && !e.contains("scrape-"), "{e}");
        for bad in ["short", "two tokens-0123456789abcdef", "prom read scrape-0123456789abcdef"] {
            let e = load_token(&write(dir.path(), bad, 0o600)).unwrap_err().to_string();
            assert!(e.contains("--metrics-token-file") && !e.contains("0123456789"), "{e}");
        }
    }

    /// A rotated token file is picked up at the next request; an invalid one keeps the old.
    #[test]
    fn token_reloads_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "first-token-0123456789", 0o600);
        let token = Token { path: p.clone(), current: Mutex::new(load_token(&p).unwrap()) };
        assert!(token.check(b"first-token-0123456789"));
        assert!(!token.check(b"second-token-0123456789"));
        write(dir.path(), "second-token-0123456789xx", 0o600);
        assert!(token.check(b"second-token-0123456789xx"));
        assert!(!token.check(b"first-token-0123456789"));
        write(dir.path(), "bad", 0o600);
        assert!(token.check(b"second-token-0123456789xx"));
    }
}
