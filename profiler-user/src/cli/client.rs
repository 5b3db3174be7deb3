//! The client commands: `memscope targets|heap|leaks|flamegraph|snapshot|diff --agent URL`
//! talk to a running `memscope agent` over HTTP(S) with a small blocking client (ureq, rustls).
//!
//! The token comes from `MEMSCOPE_TOKEN` or `--token-file FILE` (a bare token, or a
//! `NAME ROLE TOKEN` line of an agent's token file), never from the command line. Output:
//! readable tables and reports on a terminal, the raw format (JSON, SVG, pprof, folded) when
//! stdout is a pipe, files with `-o`. Failures are one line each: unreachable agent, TLS
//! trouble (`--ca-cert FILE` for a self-signed agent), 401, 403, 429/503 with the wait.
use std::{
    fmt::Write as _,
    fs,
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::{
    aggregate::growth::VerdictFields,
    render::{
        escape::{term, term_document},
        human_bytes,
    },
    store::SnapshotId,
    v8::growth::JsHeapReport,
};

/// Largest answer read from the agent.
const MAX_ANSWER_BYTES: u64 = 1 << 30;

/// How to reach the agent.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// The agent's base URL.
    #[arg(long, global = true, env = "MEMSCOPE_AGENT", default_value = "http://127.0.0.1:7411", value_name = "URL")]
    pub agent: String,
    /// File holding the token (else the MEMSCOPE_TOKEN environment variable is used).
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate to trust for an https agent (e.g. its self-signed certificate).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Give up on an answer after this long.
    #[arg(long, global = true, default_value = "150s", value_parser = crate::units::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct TargetsArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Start tracing this process (admin token).
    #[arg(long, value_name = "PID", conflicts_with = "detach")]
    pub attach: Option<u32>,
    /// Stop tracing this process (admin token).
    #[arg(long, value_name = "PID")]
    pub detach: Option<u32>,
    /// Print the agent's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct HeapArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The target's pid.
    pub pid: u32,
    /// json, pprof, folded, svg or text (default: text on a terminal, else from -o's
    /// extension, else json).
    #[arg(long)]
    pub format: Option<String>,
    /// Quantity for folded and svg: inuse, alloc or leaks.
    #[arg(long)]
    pub measure: Option<String>,
    /// Live allocations younger than this are not leaks.
    #[arg(long)]
    pub min_age: Option<String>,
    /// Write to this file instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct LeaksArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The target's pid.
    pub pid: u32,
    /// Live allocations younger than this are not leaks.
    #[arg(long, default_value = "30s")]
    pub min_age: String,
    /// Number of stacks listed.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Write the JSON report to this file.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print the JSON report instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FlamegraphArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The target's pid.
    pub pid: u32,
    /// inuse (live bytes), alloc (allocated since attach) or leaks.
    #[arg(long, default_value = "inuse")]
    pub kind: String,
    /// Live allocations younger than this are not leaks.
    #[arg(long)]
    pub min_age: Option<String>,
    /// Write the SVG to this file.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub action: SnapshotAction,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotAction {
    /// Take a snapshot of a target and store it in the agent (admin token).
    Take {
        pid: u32,
        #[arg(long)]
        min_age: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List stored snapshots, newest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Fetch a stored snapshot.
    Get {
        id: String,
        /// json, pprof, folded, svg or text.
        #[arg(long)]
        format: Option<String>,
        #[arg(long)]
        measure: Option<String>,
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Delete a stored snapshot (admin token).
    Delete { id: String },
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The earlier snapshot.
    pub before: String,
    /// The later snapshot.
    pub after: String,
    /// json, folded or svg (a differential flamegraph). Default: a table on a terminal, else
    /// from -o's extension, else json.
    #[arg(long)]
    pub format: Option<String>,
    /// inuse, alloc or leaks.
    #[arg(long)]
    pub measure: Option<String>,
    /// Number of stacks listed.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct TriggersArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub action: TriggersAction,
}

#[derive(Subcommand, Debug)]
pub enum TriggersAction {
    /// List a target's triggers: spec, firings, suppressed firings.
    List {
        /// The target's pid.
        pid: u32,
        /// Print the agent's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add triggers to a target (admin token), all or none: specs as in the agent's API
    /// (`every=30s`, `growth=20%`, `rss=1GiB`, `return=SYMBOL`, `usdt=PROVIDER:NAME`, `exit`, `gc`,
    /// `heap_limit=80%`).
    Add {
        /// The target's pid.
        pid: u32,
        /// One or more trigger specs.
        #[arg(required = true, value_name = "SPEC")]
        specs: Vec<String>,
        /// Each trigger fires at most once in this time (default: the agent's --min-spacing).
        #[arg(long, value_name = "DURATION")]
        min_spacing: Option<String>,
        /// Print the agent's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete one of a target's triggers (admin token).
    Delete {
        /// The target's pid.
        pid: u32,
        /// The trigger's id (see `list`).
        id: u64,
    },
}

// ---------------------------------------------------------------------------------------------
// HTTP

struct Client {
    base: String,
    token: Option<String>,
    http: ureq::Agent,
    timeout: Duration,
}

struct Answer {
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body).context("the agent's answer is not JSON")
    }
}

/// Reads the token: `--token-file` (first non-comment line: a bare token or `NAME ROLE
/// TOKEN`), else `MEMSCOPE_TOKEN`.
fn read_token(token_file: Option<&Path>) -> anyhow::Result<Option<String>> {
    if let Some(path) = token_file {
        use std::os::unix::fs::PermissionsExt;
        let text = fs::read_to_string(path).with_context(|| format!("reading token file {}", path.display()))?;
        if let Ok(meta) = fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                eprintln!("memscope: warning: token file {} may be read by group or others (chmod 600 it)", path.display());
            }
        }
        let line = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .find(|l| !l.is_empty())
            .ok_or_else(|| anyhow!("token file {} holds no token", path.display()))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        return match fields[..] {
            [token] | [_, _, token] => Ok(Some(token.to_owned())),
            _ => bail!("token file {}: expected a token, or `NAME ROLE TOKEN`", path.display()),
        };
    }
    match std::env::var("MEMSCOPE_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_owned())),
        _ => Ok(None),
    }
}

fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Client {
    fn new(conn: &ConnArgs) -> anyhow::Result<Client> {
        let base = conn.agent.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--agent {base}: expected an http:// or https:// URL");
        }
        let token = read_token(conn.token_file.as_deref())?;
        if token.is_some() && base.starts_with("http://") && !is_loopback_url(&base) {
            eprintln!("memscope: warning: sending the token in clear to {base}; use https");
        }
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &conn.ca_cert {
            let pem = fs::read(ca).with_context(|| format!("reading CA certificate {}", ca.display()))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading CA certificate {}", ca.display()))?;
            if certs.is_empty() {
                bail!("{} holds no PEM certificate", ca.display());
            }
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(conn.timeout))
            .timeout_connect(Some(Duration::from_secs(10)))
            .max_redirects(0)
            // The agent serves one request per connection: a pooled connection it has closed
            // would fail the next request ("Peer disconnected" over TLS).
            .max_idle_connections(0)
            .user_agent(concat!("memscope/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build();
        Ok(Client { base, token, http: config.into(), timeout: conn.timeout })
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<Answer> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match method {
            "GET" | "DELETE" => {
                let mut req = if method == "GET" { self.http.get(&url) } else { self.http.delete(&url) };
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
            _ => {
                let mut req = self.http.post(&url);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                match body {
                    Some(b) => req.header("Content-Type", "application/json").send(b),
                    None => req.send_empty(),
                }
            }
        };
        let mut resp = result.map_err(|e| self.transport_error(e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_vec()
            .map_err(|e| self.transport_error(e))?;
        if (200..300).contains(&status) {
            return Ok(Answer { body });
        }
        Err(anyhow!(self.status_error(status, retry_after.as_deref(), &body)))
    }

    fn transport_error(&self, e: ureq::Error) -> anyhow::Error {
        let base = &self.base;
        match e {
            ureq::Error::Io(io)
                if io.get_ref().is_some_and(|e| e.is::<tokio_rustls::rustls::Error>())
                    || (base.starts_with("https://") && io.kind() == std::io::ErrorKind::InvalidData) =>
            {
                anyhow!("TLS with the agent at {base} failed: {io} (for a self-signed agent give --ca-cert FILE)")
            }
            ureq::Error::Io(io) => match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    anyhow!("cannot reach the agent at {base}: connection refused (is `memscope agent` running?)")
                }
                std::io::ErrorKind::TimedOut => anyhow!("cannot reach the agent at {base}: timed out"),
                _ => anyhow!("cannot reach the agent at {base}: {io}"),
            },
            ureq::Error::HostNotFound => anyhow!("cannot reach the agent at {base}: host not found"),
            ureq::Error::ConnectionFailed => anyhow!("cannot reach the agent at {base}: connection failed"),
            ureq::Error::Timeout(_) => {
                anyhow!("the agent at {base} did not answer within {}s", self.timeout.as_secs())
            }
            e @ (ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::TlsRequired) => anyhow!(
                "TLS with the agent at {base} failed: {e} (for a self-signed agent give --ca-cert FILE)"
            ),
            ureq::Error::Protocol(p) => anyhow!(
                "the agent at {base} did not speak HTTP ({p}); is it an https agent reached with http://?"
            ),
            ureq::Error::BodyExceedsLimit(n) => anyhow!("the agent's answer is larger than {n} bytes"),
            other => anyhow!("talking to the agent at {base}: {other}"),
        }
    }

    fn status_error(&self, status: u16, retry_after: Option<&str>, body: &[u8]) -> String {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let code = v["code"].as_str().unwrap_or("");
        let msg = v["error"].as_str().map(str::to_owned).unwrap_or_else(|| {
            String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_owned()
        });
        let (msg, code) = (term(&msg).into_owned(), term(code));
        let wait = retry_after.map(|s| format!("; retry in {s}s")).unwrap_or_default();
        match status {
            401 if self.token.is_none() => {
                "the agent wants a token: set MEMSCOPE_TOKEN or give --token-file FILE".to_string()
            }
            401 => format!("the agent refused the token ({code}): check MEMSCOPE_TOKEN or --token-file"),
            403 => format!("the token's role may not do this: {msg} (use an admin token)"),
            429 => format!("the agent is rate limiting requests ({msg}){wait}"),
            503 => format!("the agent is busy ({msg}){wait}"),
            _ if code.is_empty() => format!("the agent answered {status}: {msg}"),
            _ => format!("the agent answered {status} {code}: {msg}"),
        }
    }
}

/// One request to the agent, its answer read whole (for `memscope v8 --agent`).
pub(crate) fn request(conn: &ConnArgs, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<Vec<u8>> {
    Ok(Client::new(conn)?.call(method, path, body)?.body)
}

/// A GET to the agent whose answer goes to `out` as it comes (a heap snapshot is not held
/// whole); returns the bytes written. Errors as [`Client::call`] gives them.
pub(crate) fn get_streamed(conn: &ConnArgs, path: &str, out: &mut dyn Write) -> anyhow::Result<u64> {
    let c = Client::new(conn)?;
    let mut req = c.http.get(format!("{}{path}", c.base));
    if let Some(t) = &c.token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut resp = req.call().map_err(|e| c.transport_error(e))?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = resp.body_mut().with_config().limit(1 << 20).read_to_vec().unwrap_or_default();
        bail!(c.status_error(status, retry_after.as_deref(), &body));
    }
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    std::io::copy(&mut reader, out).map_err(|e| anyhow!("reading the agent's answer: {e}"))
}

/// `?k=v&...` with values percent-encoded.
pub(crate) fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        let Some(v) = v else { continue };
        out.push(if out.is_empty() { '?' } else { '&' });
        out.push_str(k);
        out.push('=');
        for b in v.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

fn snapshot_id(s: &str) -> anyhow::Result<SnapshotId> {
    SnapshotId::parse(s).map_err(|_| anyhow!("{s:?} is not a snapshot id (like 20261124T160501Z-4242-7)"))
}

// ---------------------------------------------------------------------------------------------
// Output

fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

fn print(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("memscope: wrote {} ({})", path.display(), human_bytes(bytes.len() as u64));
    Ok(())
}

/// The format to ask for: explicit, else from the output file's extension, else `default`.
fn pick_format(explicit: Option<&str>, output: Option<&Path>, default: &str) -> String {
    if let Some(f) = explicit {
        return f.to_owned();
    }
    if let Some(name) = output.and_then(|p| p.file_name()).and_then(|n| n.to_str()) {
        for (ext, f) in [
            (".svg", "svg"),
            (".pb.gz", "pprof"),
            (".pprof", "pprof"),
            (".folded", "folded"),
            (".json", "json"),
            (".txt", "text"),
        ] {
            if name.ends_with(ext) {
                return f.to_owned();
            }
        }
    }
    default.to_owned()
}

/// Writes a report: to `-o FILE`, else to stdout, refusing binary or SVG output on a terminal.
/// Text printed on a terminal has its control characters escaped ([`term_document`]): the
/// agent's text report escapes the target's names already, folded stacks do not.
fn emit(output: Option<&Path>, format: &str, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(path) = output {
        return write_file(path, bytes);
    }
    if stdout_is_terminal() {
        if matches!(format, "pprof" | "svg") {
            bail!("{format} output is not for a terminal: give -o FILE or redirect stdout");
        }
        return print(&term_document(bytes));
    }
    print(bytes)
}

fn ago(ms: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    secs(now.saturating_sub(ms) as f64 / 1000.0) + " ago"
}

fn secs(s: f64) -> String {
    let s = s.max(0.0);
    if s < 120.0 {
        format!("{s:.0}s")
    } else if s < 7200.0 {
        format!("{:.0}m", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1}h", s / 3600.0)
    } else {
        format!("{:.1}d", s / 86_400.0)
    }
}

fn signed_bytes(n: i64) -> String {
    let sign = if n < 0 { "-" } else { "+" };
    format!("{sign}{}", human_bytes(n.unsigned_abs()))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// `function (file:line)` or the module and address, escaped for a terminal.
fn frame_text(f: &Value) -> String {
    term(&frame_text_raw(f)).into_owned()
}

fn frame_text_raw(f: &Value) -> String {
    let name = f["function"].as_str().map(str::to_owned).unwrap_or_else(|| {
        let module = f["module"].as_str().map(|m| m.rsplit('/').next().unwrap_or(m));
        match module {
            Some(m) => format!("{m}@{}", f["address"].as_str().unwrap_or("?")),
            None => f["address"].as_str().unwrap_or("?").to_owned(),
        }
    });
    match (f["file"].as_str(), f["line"].as_u64()) {
        (Some(file), Some(line)) => format!("{name}  {}:{line}", file.rsplit('/').next().unwrap_or(file)),
        (Some(file), None) => format!("{name}  {}", file.rsplit('/').next().unwrap_or(file)),
        _ => name,
    }
}

/// Aligned columns; the last column is left unpadded. Every cell is escaped for a terminal
/// ([`term`]): a cell cannot end its row, move the cursor or start an escape sequence.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| term(c).into_owned()).collect()).collect();
    let rows = &rows;
    let n = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

pub(crate) fn targets_table(v: &Value) -> String {
    let empty = Vec::new();
    let targets = v["targets"].as_array().unwrap_or(&empty);
    if targets.is_empty() {
        return "no targets: attach one with `memscope targets --attach PID`\n".to_string();
    }
    let rows: Vec<Vec<String>> = targets
        .iter()
        .map(|t| {
            let dropped: u64 = t["dropped"].as_object().map_or(0, |m| m.values().map(u).sum());
            vec![
                u(&t["pid"]).to_string(),
                t["comm"].as_str().unwrap_or("").to_owned(),
                if t["alive"].as_bool().unwrap_or(false) { "yes" } else { "exited" }.to_owned(),
                human_bytes(u(&t["live_bytes"])),
                u(&t["live_allocs"]).to_string(),
                u(&t["allocs"]).to_string(),
                u(&t["frees"]).to_string(),
                dropped.to_string(),
                t["probe_mode"].as_str().unwrap_or("").to_owned(),
                paused_cell(&t["pauses"]),
                coverage_cell(&t["coverage"]),
                ago(u(&t["attached_at_ms"])),
            ]
        })
        .collect();
    table(&["PID", "COMM", "ALIVE", "LIVE", "LIVE ALLOCS", "ALLOCS", "FREES", "DROPPED", "PROBES", "PAUSED", "COVERAGE", "ATTACHED"], &rows)
}

/// The COVERAGE column: the share of the target's anonymous memory traced by stack, and when
/// low, its reasons' names (`3% LOW: static_allocator_not_recognized`); `?` when unknown.
fn coverage_cell(c: &Value) -> String {
    let Some(ratio) = c["ratio"].as_f64() else { return "?".to_string() };
    let mut s = format!("{:.0}%", ratio * 100.0);
    if c["low"].as_bool().unwrap_or(false) {
        let empty = Vec::new();
        let names: Vec<&str> = c["reasons"].as_array().unwrap_or(&empty).iter().filter_map(|w| w["reason"].as_str()).collect();
        let _ = write!(s, " LOW: {}", if names.is_empty() { "unexplained".to_string() } else { names.join(",") });
    }
    s
}

/// The PAUSED column: paused share / budget, probe gaps, firings suppressed to spare the
/// target (`0.8%/5% 3 gaps 2 supp`); `-` for a target memscope never paused.
fn paused_cell(p: &Value) -> String {
    if p.is_null() {
        return "-".to_string();
    }
    let gaps = u(&p["probe_gaps"]["count"]);
    let suppressed: u64 = p["suppressed"].as_object().map_or(0, |m| m.values().map(u).sum());
    if gaps == 0 && suppressed == 0 {
        return "-".to_string();
    }
    let mut s = format!(
        "{:.1}%/{}% {gaps} gaps",
        p["paused_percent"].as_f64().unwrap_or(0.0),
        p["budget_percent"].as_f64().unwrap_or(0.0)
    );
    if suppressed > 0 {
        let _ = write!(s, " {suppressed} supp");
    }
    // One summary alone is predicted to take more than the budget ever allows.
    if p["exceeds_budget"].as_bool() == Some(true) {
        let _ = write!(s, ", one needs {:.1}s", u(&p["predicted_ms"]) as f64 / 1e3);
    }
    s
}

pub(crate) fn leaks_table(v: &Value) -> String {
    let empty = Vec::new();
    let leaks = v["leaks"].as_array().unwrap_or(&empty);
    let t = &v["totals"];
    let mut out = format!(
        "pid {}: live {} in {} allocations; leaks are live allocations older than {}\n",
        u(&v["pid"]),
        human_bytes(u(&t["live_bytes"])),
        u(&t["live_allocs"]),
        secs(v["min_age_s"].as_f64().unwrap_or(0.0)),
    );
    if let Some(g) = v["probe_gaps"].as_object() {
        let _ = writeln!(
            out,
            "note: the probes were out of the process {} times ({} ms in all) while V8 walked its heap: memory freed then may be listed as live (leaks marked *)",
            g.get("count").map_or(0, u),
            g.get("total_ms").map_or(0, u)
        );
    }
    let coverage = &v["coverage"];
    let low = coverage["low"].as_bool().unwrap_or(false);
    if !coverage.is_null() {
        let _ = writeln!(out, "coverage: {}", coverage_cell(coverage));
        let empty = Vec::new();
        for w in coverage["reasons"].as_array().unwrap_or(&empty) {
            let _ = writeln!(out, "  - {}", w["text"].as_str().unwrap_or(""));
        }
    }
    if leaks.is_empty() && low {
        out.push_str("no leaks found among the memory memscope sees, a small share of the process's (see coverage)\n");
    } else if leaks.is_empty() {
        out.push_str("no leaks found\n");
    }
    for (i, l) in leaks.iter().enumerate() {
        let _ = writeln!(
            out,
            "\n#{:<3} {} in {} allocations, oldest {}{}",
            i + 1,
            human_bytes(u(&l["bytes"])),
            u(&l["allocs"]),
            secs(l["oldest_age_s"].as_f64().unwrap_or(0.0)),
            if l["may_include_unseen_frees"].as_bool() == Some(true) { " *" } else { "" }
        );
        if let Ok(vf @ VerdictFields { verdict: Some(_), .. }) = serde_json::from_value::<VerdictFields>(l.clone()) {
            let _ = writeln!(out, "     {} (across {} snapshots)", vf.text(), u(&v["verdict_snapshots"]));
        }
        let frames = l["frames"].as_array().map(Vec::as_slice).unwrap_or_default();
        for f in frames.iter().take(8) {
            let _ = writeln!(out, "       {}", frame_text(f));
        }
        if frames.len() > 8 {
            let _ = writeln!(out, "       ... {} more frames", frames.len() - 8);
        }
    }
    if let Ok(js) = serde_json::from_value::<JsHeapReport>(v["v8"].clone()) {
        out.push('\n');
        out.push_str(&js.text());
    }
    out
}

pub(crate) fn diff_table(v: &Value, before: &str, after: &str) -> String {
    let t = &v["totals"];
    let mut out = format!(
        "from {before} to {after} ({}): live {} ({} allocations), {} stacks changed\n\n",
        secs(v["interval_s"].as_f64().unwrap_or(0.0)),
        signed_bytes(t["growth_bytes"].as_i64().unwrap_or(0)),
        t["growth_allocs"].as_i64().unwrap_or(0),
        u(&v["stacks_changed"]),
    );
    let empty = Vec::new();
    let rows: Vec<Vec<String>> = v["stacks"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|s| {
            let frames = s["frames"].as_array().map(Vec::as_slice).unwrap_or_default();
            let names: Vec<String> = frames
                .iter()
                .take(4)
                .map(|f| f["function"].as_str().map(str::to_owned).unwrap_or_else(|| frame_text_raw(f)))
                .collect();
            vec![
                signed_bytes(s["growth_bytes"].as_i64().unwrap_or(0)),
                human_bytes(u(&s["before_bytes"])),
                human_bytes(u(&s["after_bytes"])),
                names.join(" <- "),
            ]
        })
        .collect();
    out.push_str(&table(&["GROWTH", "BEFORE", "AFTER", "WHERE (innermost first)"], &rows));
    if let Some(grew) = v["v8"]["constructors_grew"].as_array() {
        out.push_str("\nJavaScript heap: constructors that grew (V8 heap summaries)");
        match v["v8"]["verdict_snapshots"].as_u64() {
            Some(n) => out.push_str(&format!("; verdicts across {n} summaries up to {after}\n")),
            None => out.push_str(&format!("; verdicts need at least {} summaries\n", crate::aggregate::growth::MIN_SNAPSHOTS)),
        }
        let rows: Vec<Vec<String>> = grew
            .iter()
            .map(|g| {
                let verdict = serde_json::from_value::<VerdictFields>(g.clone()).unwrap_or_default();
                vec![
                    format!("+{}", g["count_delta"].as_i64().unwrap_or(0)),
                    signed_bytes(g["self_size_delta"].as_i64().unwrap_or(0)),
                    u(&g["count_after"]).to_string(),
                    verdict.text(),
                    g["name"].as_str().unwrap_or("?").to_string(),
                ]
            })
            .collect();
        out.push_str(&table(&["OBJECTS", "SELF SIZE", "NOW", "VERDICT", "CONSTRUCTOR"], &rows));
    }
    out
}

pub(crate) fn snapshots_table(v: &Value) -> String {
    let empty = Vec::new();
    let list = v["snapshots"].as_array().unwrap_or(&empty);
    if list.is_empty() {
        return "no snapshots\n".to_string();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s["id"].as_str().unwrap_or("").to_owned(),
                u(&s["pid"]).to_string(),
                s["comm"].as_str().unwrap_or("").to_owned(),
                s["reason"].as_str().unwrap_or("").to_owned(),
                human_bytes(u(&s["size_bytes"])),
                ago(u(&s["taken_at_ms"])),
            ]
        })
        .collect();
    let mut out = table(&["ID", "PID", "COMM", "REASON", "SIZE", "TAKEN"], &rows);
    let _ = writeln!(out, "{} snapshots, {} on disk", u(&v["count"]), human_bytes(u(&v["bytes"])));
    out
}

pub(crate) fn triggers_table(v: &Value) -> String {
    let empty = Vec::new();
    let list = v["triggers"].as_array().unwrap_or(&empty);
    if list.is_empty() {
        return "no triggers\n".to_string();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            vec![
                u(&t["id"]).to_string(),
                t["spec"].as_str().unwrap_or("").to_owned(),
                u(&t["fired"]).to_string(),
                u(&t["suppressed"]).to_string(),
                t["min_spacing_s"].as_f64().map(secs).unwrap_or_default(),
                t["origin"].as_str().unwrap_or("").to_owned(),
                if t["finished"].as_bool() == Some(true) { "finished" } else { "active" }.to_owned(),
            ]
        })
        .collect();
    table(&["ID", "SPEC", "FIRED", "SUPPRESSED", "MIN SPACING", "ORIGIN", "STATE"], &rows)
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).unwrap_or_default();
    s.push(b'\n');
    s
}

// ---------------------------------------------------------------------------------------------
// Commands

pub fn targets(args: TargetsArgs) -> anyhow::Result<()> {
    let c = Client::new(&args.conn)?;
    if let Some(pid) = args.attach {
        let v = c.call("POST", "/v1/targets", Some(&format!("{{\"pid\": {pid}}}")))?.json()?;
        eprintln!("memscope: attached to {} ({})", pid, term(v["comm"].as_str().unwrap_or("?")));
    }
    if let Some(pid) = args.detach {
        c.call("DELETE", &format!("/v1/targets/{pid}"), None)?;
        eprintln!("memscope: detached from {pid}");
    }
    let v = c.call("GET", "/v1/targets", None)?.json()?;
    if args.json || !stdout_is_terminal() {
        print(&pretty(&v))
    } else {
        print(targets_table(&v).as_bytes())
    }
}

pub fn heap(args: HeapArgs) -> anyhow::Result<()> {
    let c = Client::new(&args.conn)?;
    let default = if args.output.is_none() && stdout_is_terminal() { "text" } else { "json" };
    let format = pick_format(args.format.as_deref(), args.output.as_deref(), default);
    let q = query(&[("format", Some(format.clone())), ("measure", args.measure), ("min_age", args.min_age)]);
    let a = c.call("GET", &format!("/v1/targets/{}/heap{q}", args.pid), None)?;
    emit(args.output.as_deref(), &format, &a.body)
}

pub fn leaks(args: LeaksArgs) -> anyhow::Result<()> {
    let c = Client::new(&args.conn)?;
    let q = query(&[("min_age", Some(args.min_age.clone())), ("top", Some(args.top.to_string()))]);
    let a = c.call("GET", &format!("/v1/targets/{}/leaks{q}", args.pid), None)?;
    if let Some(path) = &args.output {
        return write_file(path, &a.body);
    }
    let v = a.json()?;
    if args.json || !stdout_is_terminal() {
        print(&pretty(&v))
    } else {
        print(leaks_table(&v).as_bytes())
    }
}

pub fn flamegraph(args: FlamegraphArgs) -> anyhow::Result<()> {
    let c = Client::new(&args.conn)?;
    if args.output.is_none() && stdout_is_terminal() {
        bail!("a flamegraph is SVG: give -o FILE.svg or redirect stdout");
    }
    let q = query(&[("kind", Some(args.kind.clone())), ("min_age", args.min_age)]);
    let a = c.call("GET", &format!("/v1/targets/{}/flamegraph.svg{q}", args.pid), None)?;
    emit(args.output.as_deref(), "svg", &a.body)
}

pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<()> {
    let c = Client::new(&args.conn)?;
    match args.action {
        SnapshotAction::Take { pid, min_age, json } => {
            let q = query(&[("min_age", min_age)]);
            let v = c.call("POST", &format!("/v1/targets/{pid}/snapshots{q}"), None)?.json()?;
            if json || !stdout_is_terminal() {
                print(&pretty(&v))
            } else {
                print(
                    format!(
                        "{}  (pid {}, {}, {})\n",
                        v["id"].as_str().unwrap_or("?"),
                        u(&v["pid"]),
                        term(v["comm"].as_str().unwrap_or("")),
                        human_bytes(u(&v["size_bytes"]))
                    )
                    .as_bytes(),
                )
            }
        }
        SnapshotAction::List { json } => {
            let v = c.call("GET", "/v1/snapshots", None)?.json()?;
            if json || !stdout_is_terminal() {
                print(&pretty(&v))
            } else {
                print(snapshots_table(&v).as_bytes())
            }
        }
        SnapshotAction::Get { id, format, measure, output } => {
            let id = snapshot_id(&id)?;
            let default = if output.is_none() && stdout_is_terminal() { "text" } else { "json" };
            let format = pick_format(format.as_deref(), output.as_deref(), default);
            let q = query(&[("format", Some(format.clone())), ("measure", measure)]);
            let a = c.call("GET", &format!("/v1/snapshots/{id}{q}"), None)?;
            emit(output.as_deref(), &format, &a.body)
        }
        SnapshotAction::Delete { id } => {
            let id = snapshot_id(&id)?;
            c.call("DELETE", &format!("/v1/snapshots/{id}"), None)?;
            eprintln!("memscope: deleted snapshot {id}");
            Ok(())
        }
    }
}

pub fn triggers(args: TriggersArgs) -> anyhow::Result<()> {
    let c = Client::new(&args.conn)?;
    let (v, json) = match args.action {
        TriggersAction::List { pid, json } => (c.call("GET", &format!("/v1/targets/{pid}/triggers"), None)?.json()?, json),
        TriggersAction::Add { pid, specs, min_spacing, json } => {
            let body = serde_json::json!({ "specs": specs, "min_spacing": min_spacing }).to_string();
            (c.call("POST", &format!("/v1/targets/{pid}/triggers"), Some(&body))?.json()?, json)
        }
        TriggersAction::Delete { pid, id } => {
            c.call("DELETE", &format!("/v1/targets/{pid}/triggers/{id}"), None)?;
            eprintln!("memscope: deleted trigger {id} of target {pid}");
            return Ok(());
        }
    };
    if json || !stdout_is_terminal() {
        print(&pretty(&v))
    } else {
        print(triggers_table(&v).as_bytes())
    }
}

pub fn diff(args: DiffArgs) -> anyhow::Result<()> {
    let c = Client::new(&args.conn)?;
    let (before, after) = (snapshot_id(&args.before)?, snapshot_id(&args.after)?);
    let table_view = args.format.is_none() && args.output.is_none() && stdout_is_terminal();
    let format = pick_format(args.format.as_deref(), args.output.as_deref(), "json");
    let q = query(&[
        ("format", Some(format.clone())),
        ("measure", args.measure),
        ("top", Some(args.top.to_string())),
    ]);
    let a = c.call("GET", &format!("/v1/snapshots/{before}/diff/{after}{q}"), None)?;
    if table_view {
        return print(diff_table(&a.json()?, before.as_str(), after.as_str()).as_bytes());
    }
    emit(args.output.as_deref(), &format, &a.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Query values are percent-encoded and absent ones left out.
    #[test]
    fn builds_queries() {
        assert_eq!(query(&[("a", Some("30s".into())), ("b", None), ("c", Some("x y&z".into()))]), "?a=30s&c=x%20y%26z");
        assert_eq!(query(&[("a", None)]), "");
    }

    /// Formats come from the flag, else from the file extension, else the default.
    #[test]
    fn picks_formats() {
        assert_eq!(pick_format(Some("folded"), Some(Path::new("x.svg")), "json"), "folded");
        assert_eq!(pick_format(None, Some(Path::new("heap.pb.gz")), "json"), "pprof");
        assert_eq!(pick_format(None, Some(Path::new("f.svg")), "json"), "svg");
        assert_eq!(pick_format(None, None, "text"), "text");
    }

    /// Only loopback hosts count as loopback.
    #[test]
    fn loopback_urls() {
        assert!(is_loopback_url("http://127.0.0.1:7411"));
        assert!(is_loopback_url("http://localhost:7411/"));
        assert!(is_loopback_url("http://[::1]:7411"));
        assert!(!is_loopback_url("http://10.1.2.3:7411"));
        assert!(!is_loopback_url("http://agent.example:7411"));
    }

    /// The token file may hold a bare token or an agent token-file line; comments are skipped.
    #[test]
    fn reads_token_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        fs::write(&p, "# mine\n\n  abcdefghijklmnopq  \n").unwrap();
        assert_eq!(read_token(Some(&p)).unwrap().unwrap(), "abcdefghijklmnopq");
        fs::write(&p, "ops admin abcdefghijklmnopq # note\n").unwrap();
        assert_eq!(read_token(Some(&p)).unwrap().unwrap(), "abcdefghijklmnopq");
        fs::write(&p, "a b\n").unwrap();
        assert!(read_token(Some(&p)).is_err());
    }

    /// Tables show the key numbers of the agent's JSON.
    #[test]
    fn renders_tables() {
        let targets = serde_json::json!({"targets": [{"id": 7, "pid": 7, "comm": "demo", "alive": true,
            "live_bytes": 2048, "live_allocs": 2, "allocs": 10, "frees": 8, "dropped": {"x": 1},
            "probe_mode": "session", "attached_at_ms": 0}]});
        let t = targets_table(&targets);
        assert!(t.starts_with("PID"), "{t}");
        assert!(t.contains("demo") && t.contains("2.0 KiB") && t.contains("session"), "{t}");
        assert!(t.contains("PAUSED") && t.lines().nth(1).unwrap().contains(" - "), "never paused: {t}");
        let mut paused = targets.clone();
        paused["targets"][0]["pauses"] = serde_json::json!({"probe_gaps": {"count": 3, "total_ms": 900, "last_end_ms": 1},
            "paused_percent": 0.84, "budget_percent": 5.0, "suppressed": {"pause_budget": 10, "self_caused_gc": 2}});
        let t = targets_table(&paused);
        assert!(t.contains("0.8%/5% 3 gaps 12 supp"), "{t}");
        assert!(t.contains("COVERAGE") && t.lines().nth(1).unwrap().contains(" ? "), "{t}");
        let mut low = targets.clone();
        low["targets"][0]["coverage"] = serde_json::json!({"ratio": 0.03, "low": true,
            "reasons": [{"reason": "static_allocator_not_recognized", "text": "..."}]});
        let t = targets_table(&low);
        assert!(t.contains("3% LOW: static_allocator_not_recognized"), "{t}");
        paused["targets"][0]["pauses"]["exceeds_budget"] = true.into();
        paused["targets"][0]["pauses"]["predicted_ms"] = 8400.into();
        let t = targets_table(&paused);
        assert!(t.contains("0.8%/5% 3 gaps 12 supp, one needs 8.4s"), "{t}");
        let leaks = serde_json::json!({"pid": 7, "min_age_s": 30.0, "totals": {"live_bytes": 4096, "live_allocs": 3},
            "leaks": [{"bytes": 2048, "allocs": 2, "oldest_age_s": 55.0,
                       "frames": [{"function": "leaky", "file": "/src/demo.c", "line": 7, "module": null, "address": "0x1"}]}]});
        let l = leaks_table(&leaks);
        assert!(l.contains("2.0 KiB in 2 allocations, oldest 55s") && l.contains("leaky  demo.c:7"), "{l}");
        assert!(!l.contains("verdict") && !l.contains("JavaScript"), "{l}");
        // With verdicts, and the JavaScript heap's report.
        let mut leaks = leaks;
        leaks["verdict_snapshots"] = 4.into();
        leaks["leaks"][0]["verdict"] = "growing".into();
        leaks["leaks"][0]["slope_bytes_per_s"] = 1536.0.into();
        leaks["leaks"][0]["confidence"] = 0.91.into();
        leaks["v8"] = serde_json::json!({"reason": "api", "taken_at_ms": 0, "node_count": 9, "self_size": 640,
            "retained_size_computed": false, "verdict_snapshots": 3, "window_s": 6.0, "constructor_count": 1,
            "constructors": [{"name": "LeakyRecord", "count": 20, "self_size": 640, "verdict": "growing",
                              "slope_bytes_per_s": 100.0, "confidence": 0.73}]});
        let l = leaks_table(&leaks);
        assert!(l.contains("growing        +1.5 KiB/s  confidence 0.91 (across 4 snapshots)"), "{l}");
        assert!(l.contains("across 3 V8 heap summaries over 6.0s"), "{l}");
        assert!(l.lines().any(|x| x.contains("#1") && x.contains("growing") && x.contains("confidence 0.73") && x.contains("LeakyRecord")), "{l}");
        let diff = serde_json::json!({"interval_s": 60.0, "totals": {"growth_bytes": -1024, "growth_allocs": -1},
            "stacks_changed": 1, "stacks": [{"growth_bytes": 2048, "before_bytes": 0, "after_bytes": 2048,
            "frames": [{"function": "leaky"}, {"function": "main"}]}]});
        let d = diff_table(&diff, "a", "b");
        assert!(d.contains("-1.0 KiB") && d.contains("+2.0 KiB") && d.contains("leaky <- main"), "{d}");
        let mut diff = diff;
        diff["v8"] = serde_json::json!({"verdict_snapshots": 3, "constructors_grew": [{"name": "LeakyRecord", "count_before": 1,
            "count_after": 9, "self_size_before": 32, "self_size_after": 288, "count_delta": 8, "self_size_delta": 256,
            "verdict": "growing", "slope_bytes_per_s": 40.0, "confidence": 0.7}]});
        let d = diff_table(&diff, "a", "b");
        assert!(d.contains("verdicts across 3 summaries up to b"), "{d}");
        assert!(d.lines().any(|l| l.contains("+8") && l.contains("growing") && l.contains("confidence 0.70") && l.contains("LeakyRecord")), "{d}");
        let triggers = serde_json::json!({"id": 7, "alive": true, "triggers": [{"id": 3, "spec": "every=30s",
            "reason": "interval", "fired": 4, "suppressed": 1, "min_spacing_s": 5.0, "origin": "api", "finished": false}]});
        let t = triggers_table(&triggers);
        assert!(t.starts_with("ID") && t.contains("every=30s") && t.contains("api") && t.contains("active"), "{t}");
        assert_eq!(triggers_table(&serde_json::json!({"triggers": []})), "no triggers\n");
    }
}
