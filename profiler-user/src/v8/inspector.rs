//! One DevTools-protocol session with a Node.js process's inspector, opened from outside:
//! no flag, no code change in the target.
//!
//! Identity: a session acts on one process, the one memscope attached ([`Process`]: pidfd and
//! start time), never on whatever process has its pid now. [`Inspector::open`] checks that the
//! process still runs as that pid before anything, reads `/proc/PID/...` and then checks again
//! (a pid cannot be reused while its process lives), and sends `SIGUSR1` only through the
//! pidfd: a process that took a dead target's pid is never signalled ([`V8Error::Gone`]).
//!
//! Opening: the target must catch `SIGUSR1` (`SigCgt` in `/proc/PID/status`: Node installs a
//! handler; for any other process the default action of `SIGUSR1` is to terminate it, so it is
//! never sent). An inspector the target already listens on is refused (another debugger may be
//! attached; memscope does not share it nor close it). `SIGUSR1` makes Node listen inside its
//! own network namespace on the host and port of its `--inspect-port` (or `--inspect=`,
//! command line or `NODE_OPTIONS`; 127.0.0.1:9229 by default), read here before signalling: a
//! non-loopback host or port 0 (random) is refused before any signal.
//!
//! Exclusive: before the signal, the [`super::guard`] refuses every connect to that port in
//! that namespace but from memscope's own sockets (registered by cookie), and it stays until
//! the inspector is closed. memscope talks only to the target's own listener: the listening
//! socket on that port whose inode is among the target's descriptors (`/proc/PID/fd` matched
//! against `/proc/PID/net/tcp{,6}`), at exactly its address (127.0.0.1, ::1, ...), never an
//! assumed one; a listener of another process is never talked to. An inspector that came up
//! on a non-loopback address (reachable from other hosts, which the guard cannot stop) or on
//! another port than announced is closed at once and the operation refused. Sockets are
//! created by a dedicated thread that entered the target's network namespace
//! (`setns(CLONE_NEWNET)`) and used from the caller's thread. `/json/list` gives the WebSocket
//! path (only the path is used). The protocol runs over tungstenite + serde_json.
//!
//! Closing (also on drop): `process._debugEnd()` through `Runtime.evaluate`, then a wait until
//! the port no longer listens, so that no debug port stays open; then the guard goes (a window
//! that would not close keeps its guard until its port is gone). Every session (open, close,
//! refusal) is in the audit log (tracing target `audit`). One session per process at a time.
//!
//! Everything the target sends is hostile. Every message is capped ([`MAX_MESSAGE_BYTES`]; a
//! caller may allow up to [`MAX_PROFILE_MESSAGE_BYTES`] for one call) and checked at its frame
//! header, before it is read; messages are parsed into a small envelope (the result stays raw
//! text for the caller to parse into typed structs). The whole exchange, from the listing and
//! the handshake to the last call, has one deadline ([`Budget`]), and every read waits at most
//! [`READ_SLICE`] before the deadline and the [`Cancel`] flag are checked again: a request
//! that ends (timeout, client gone) stops its session within a slice, whatever the target sends.
//!
//! Memory budget: each message read is charged to the target's account
//! ([`crate::budget::Use::V8`]) while it is held (an event until handled, an answer until its
//! [`RawReply`] is dropped). The WebSocket library hands a message over whole, so the charge
//! comes once it is read (up to the frame cap above, in memory for that long); a refusal drops
//! it at once and fails the call with [`V8Error::TooLarge`] (the session stays in step).
use std::{
    borrow::Cow,
    collections::HashSet,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::{json, value::RawValue, Value};
use tracing::info;
use tungstenite::{protocol::WebSocketConfig, Message, WebSocket};

use super::{guard::Guard, V8Error};
use crate::{
    budget::{Account, Reservation, Use},
    process::Process,
};

/// Largest `/json/list` answer read.
const MAX_LIST_BYTES: usize = 64 * 1024;
/// Largest protocol message accepted by default: V8 sends a heap snapshot as
/// `addHeapSnapshotChunk` events of ~100 KB of text; an evaluation's result is at most 1 MiB.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Largest message a caller may allow for one call ([`Inspector::call_raw`]): the sampling
/// heap profile comes whole in one answer. With both render slots busy the agent holds at most
/// two such messages and what they parse into (see [`super::sampling`]'s caps).
pub const MAX_PROFILE_MESSAGE_BYTES: usize = 16 << 20;
/// Longest one read blocks before the deadline and the cancellation are checked again.
pub const READ_SLICE: Duration = Duration::from_millis(200);
/// How long cleaning up may take after a failed or cancelled open (closing the inspector we
/// started), whatever the request's own deadline.
const CLEANUP_BUDGET: Duration = Duration::from_secs(5);
/// How long Node may take to start listening after `SIGUSR1`.
const LISTEN_WAIT: Duration = Duration::from_secs(5);
/// How long the inspector may take to stop listening after `_debugEnd`.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// Default deadline of one protocol call (a heap snapshot of a large heap takes long).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A cancellation shared by a request and the blocking work it started: set when the request
/// ends early (its timeout, its client gone); a session sees it within [`READ_SLICE`].
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// A guard that cancels when dropped (held by the request: its end cancels the work).
    pub fn on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }
}

/// Cancels its [`Cancel`] when dropped.
#[derive(Debug)]
pub struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// The one deadline of a whole exchange with an inspector (the listing, the handshake, every
/// call) and its cancellation.
#[derive(Clone, Debug)]
pub struct Budget {
    deadline: Instant,
    timeout: Duration,
    cancel: Cancel,
}

impl Budget {
    /// `timeout` from now, not cancellable.
    pub fn new(timeout: Duration) -> Budget {
        Budget::with_cancel(timeout, Cancel::new())
    }

    /// `timeout` from now, or until `cancel` is set.
    pub fn with_cancel(timeout: Duration, cancel: Cancel) -> Budget {
        Budget { deadline: Instant::now() + timeout, timeout, cancel }
    }

    /// Time left (zero once past the deadline).
    pub fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The time left, or why `what` must stop now.
    pub fn check(&self, what: &str) -> Result<Duration, V8Error> {
        if self.cancel.is_cancelled() {
            return Err(V8Error::Cancelled(what.to_string()));
        }
        let left = self.left();
        if left.is_zero() {
            return Err(V8Error::Timeout(what.to_string(), self.timeout));
        }
        Ok(left)
    }

    /// How long the next read may block.
    fn slice(&self) -> Duration {
        self.left().clamp(Duration::from_millis(1), READ_SLICE)
    }
}

/// Processes with a session open right now.
static OPEN: Mutex<Option<HashSet<u32>>> = Mutex::new(None);
/// Network namespaces (by inode) where this process has a session open: Node listens on 9229
/// unless told otherwise, so two Node processes of one namespace cannot both be open at once.
/// A second session in the same namespace waits for the first (up to [`NETNS_WAIT`]).
static NETNS: Mutex<Option<HashSet<u64>>> = Mutex::new(None);
static NETNS_FREED: std::sync::Condvar = std::sync::Condvar::new();
const NETNS_WAIT: Duration = Duration::from_secs(30);

/// Holds a network namespace for one session.
struct NetnsTurn(u64);

impl NetnsTurn {
    fn take(process: &Process, budget: &Budget) -> Result<NetnsTurn, V8Error> {
        use std::os::unix::fs::MetadataExt;
        let pid = process.pid();
        let ino = std::fs::metadata(format!("/proc/{pid}/ns/net")).map_err(|_| V8Error::Gone(pid))?.ino();
        // Read, then check: the namespace was the target's if it still runs as `pid`.
        if !process.alive() {
            return Err(V8Error::Gone(pid));
        }
        let deadline = Instant::now() + NETNS_WAIT;
        let mut held = NETNS.lock().unwrap();
        while held.get_or_insert_with(HashSet::new).contains(&ino) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(V8Error::Connect(format!("another inspector session in the network namespace of {pid} has not ended in {NETNS_WAIT:?}")));
            }
            budget.check("waiting for the network namespace's inspector port")?;
            held = NETNS_FREED.wait_timeout(held, left.min(budget.slice())).unwrap().0;
        }
        held.get_or_insert_with(HashSet::new).insert(ino);
        Ok(NetnsTurn(ino))
    }
}

impl Drop for NetnsTurn {
    fn drop(&mut self) {
        NETNS.lock().unwrap().get_or_insert_with(HashSet::new).remove(&self.0);
        NETNS_FREED.notify_all();
    }
}

/// A DevTools-protocol session with one Node.js process.
pub struct Inspector {
    pid: u32,
    /// The process this session acts on.
    process: Arc<Process>,
    /// The exchange's deadline and cancellation.
    budget: Budget,
    port: u16,
    ws: WebSocket<TcpStream>,
    next_id: u64,
    /// Who asked, for the audit log.
    purpose: String,
    closed: bool,
    /// Why the WebSocket can no longer be read (after a read error, a refused message: its
    /// frame is half read), if it cannot.
    broken: Option<String>,
    opened_at: Instant,
    turn: Option<NetnsTurn>,
    /// Keeps every other process off the port until the inspector is closed.
    guard: Option<Guard>,
    /// The target's share of the memory budget: every message held is charged to it.
    account: Arc<Account>,
}

/// Whether the process catches `sig` (its bit in `SigCgt`).
pub fn catches_signal(pid: u32, sig: i32) -> Result<bool, V8Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|_| V8Error::NoSuchProcess(pid))?;
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or(V8Error::NoSuchProcess(pid))?;
    Ok(mask & (1u64 << (sig - 1)) != 0)
}

/// The socket inodes among the target's descriptors.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return out };
    for e in dir.flatten() {
        if let Ok(link) = std::fs::read_link(e.path()) {
            let l = link.to_string_lossy();
            if let Some(n) = l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).and_then(|n| n.parse().ok()) {
                out.insert(n);
            }
        }
    }
    out
}

/// A TCP socket listening in the target's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    /// The address it is bound to (`0.0.0.0` or `::` for every address).
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u64,
}

impl Listener {
    /// Bound to a loopback address only (`::ffff:127.x` included).
    pub fn is_loopback(&self) -> bool {
        self.addr.to_canonical().is_loopback()
    }

    /// Where to connect to reach it from inside its namespace: its own address, or loopback of
    /// its family for a wildcard one.
    pub fn connect_addr(&self) -> SocketAddr {
        let ip = match self.addr.to_canonical() {
            IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            a => a,
        };
        SocketAddr::new(ip, self.port)
    }
}

/// An address as `/proc/net/tcp{,6}` prints it: each 32-bit word of the network-order
/// address as a native (little-endian here) integer in hex.
fn proc_net_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| hex.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()).map(u32::to_ne_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Every listening TCP socket in the network namespace of `pid` (IPv4 and IPv6).
pub fn listeners(pid: u32) -> Vec<Listener> {
    let mut out = Vec::new();
    for file in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let Some((ip, port)) = f[1].split_once(':') else { continue };
            if let (Some(addr), Ok(port), Ok(inode)) = (proc_net_addr(ip), u16::from_str_radix(port, 16), f[9].parse()) {
                out.push(Listener { addr, port, inode });
            }
        }
    }
    out
}

/// Listening loopback TCP sockets in the network namespace of `pid` (IPv4 and IPv6).
pub fn loopback_listeners(pid: u32) -> Vec<Listener> {
    listeners(pid).into_iter().filter(Listener::is_loopback).collect()
}

/// Every listening socket the target itself owns (its inode among the target's descriptors),
/// on any address.
pub fn own_listener_sockets(pid: u32) -> Vec<Listener> {
    let mine = socket_inodes(pid);
    listeners(pid).into_iter().filter(|l| mine.contains(&l.inode)).collect()
}

/// The loopback ports the target itself listens on.
pub fn own_listeners(pid: u32) -> Vec<u16> {
    let mut ports: Vec<u16> = own_listener_sockets(pid).into_iter().filter(Listener::is_loopback).map(|l| l.port).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Where Node will listen after `SIGUSR1`, from its flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InspectorEndpoint {
    /// The host of `--inspect-port=HOST:PORT` (or `--inspect=`...), if one was given.
    pub host: Option<String>,
    pub port: u16,
}

/// The inspector host and port in Node's options: `NODE_OPTIONS` first, then the command line
/// up to the script (the last one given wins, as in Node).
pub fn parse_endpoint<'a>(node_options: impl IntoIterator<Item = &'a str>, argv: &'a [String]) -> InspectorEndpoint {
    let mut ep = InspectorEndpoint { host: None, port: 9229 };
    let mut apply = |v: &str| {
        let (host, port) = split_host_port(v);
        if let Some(h) = host {
            ep.host = Some(h);
        }
        if let Some(p) = port {
            ep.port = p;
        }
    };
    const INSPECT: [&str; 5] = ["--inspect", "--inspect-brk", "--inspect-wait", "--inspect-port", "--debug-port"];
    // Node's options that take their value as the next argument.
    const WITH_VALUE: [&str; 12] =
        ["-r", "--require", "--import", "--loader", "--experimental-loader", "-C", "--conditions", "--title", "--env-file", "--input-type", "--stack-size", "--max-old-space-size"];
    let mut scan = |args: &mut dyn Iterator<Item = &str>, stop_at_script: bool| {
        while let Some(a) = args.next() {
            if a == "--" || (stop_at_script && !a.starts_with('-')) {
                break;
            }
            if let Some((flag, v)) = a.split_once('=') {
                if INSPECT.contains(&flag) {
                    apply(v);
                }
            } else if a == "--inspect-port" || a == "--debug-port" {
                if let Some(v) = args.next() {
                    apply(v);
                }
            } else if WITH_VALUE.contains(&a) {
                args.next();
            } else if matches!(a, "-e" | "--eval" | "-p" | "--print") {
                break;
            }
        }
    };
    scan(&mut node_options.into_iter(), false);
    scan(&mut argv.iter().skip(1).map(String::as_str), true);
    ep
}

/// Node's `[HOST:]PORT`, `HOST` or `[IPV6]:PORT`.
fn split_host_port(v: &str) -> (Option<String>, Option<u16>) {
    if let Some(rest) = v.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else { return (Some(v.to_string()), None) };
        return (Some(host.to_string()), after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return (None, v.parse().ok());
    }
    match v.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (Some(h.to_string()), p.parse().ok()),
        _ => (Some(v.to_string()), None),
    }
}

/// The endpoint of `pid`'s inspector, refused if the guard could not cover it: a port chosen
/// at random (0) or a host that is not loopback (remote hosts are beyond any local rule).
pub fn expected_endpoint(pid: u32) -> Result<InspectorEndpoint, V8Error> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(|_| V8Error::NoSuchProcess(pid))?;
    let argv: Vec<String> = cmdline.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let node_options = environ
        .split(|&b| b == 0)
        .find_map(|e| e.strip_prefix(b"NODE_OPTIONS="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    let ep = parse_endpoint(node_options.split_whitespace(), &argv);
    let unguardable = |reason: String| V8Error::Unguardable { pid, reason };
    if ep.port == 0 {
        return Err(unguardable("its inspector port is 0 (chosen at random when it opens), which cannot be guarded before it opens".into()));
    }
    match ep.host.as_deref() {
        None | Some("localhost") => {}
        Some(h) => match h.parse::<IpAddr>() {
            Ok(ip) if ip.to_canonical().is_loopback() => {}
            Ok(ip) => return Err(unguardable(format!("its inspector would listen on {ip}, reachable from other hosts"))),
            Err(_) => return Err(unguardable(format!("its inspector host {h:?} is not a loopback address"))),
        },
    }
    Ok(ep)
}

/// `SO_COOKIE` and `SO_NETNS_COOKIE` (Linux 4.12 and 5.14).
const SO_COOKIE: libc::c_int = 57;
const SO_NETNS_COOKIE: libc::c_int = 71;

fn sockopt_u64(fd: &OwnedFd, opt: libc::c_int) -> std::io::Result<u64> {
    let mut v = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    if unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// A new TCP socket of the target's network namespace (the namespace is the socket's for
/// life: it is connected from the caller's thread afterwards).
fn socket_in_netns(pid: u32, v6: bool) -> Result<OwnedFd, V8Error> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| V8Error::Connect(format!("opening the network namespace of {pid}: {e}")))?;
    // setns changes only the calling thread's namespace: a thread of its own, which ends after.
    std::thread::Builder::new()
        .name(format!("netns-{pid}"))
        .spawn(move || -> Result<OwnedFd, V8Error> {
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(V8Error::Connect(format!("entering the network namespace of {pid}: {}", std::io::Error::last_os_error())));
            }
            let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
            let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(V8Error::Connect(format!("a socket in the network namespace of {pid}: {}", std::io::Error::last_os_error())));
            }
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .map_err(|e| V8Error::Connect(format!("starting the namespace thread: {e}")))?
        .join()
        .map_err(|_| V8Error::Connect("the namespace thread panicked".into()))?
}

/// The cookie of the network namespace of `pid` (what the guard's programs see as
/// `bpf_get_netns_cookie`).
pub fn netns_cookie(pid: u32) -> Result<u64, V8Error> {
    let s = socket_in_netns(pid, false)?;
    sockopt_u64(&s, SO_NETNS_COOKIE).map_err(|e| V8Error::Connect(format!("the network namespace cookie of {pid}: {e}")))
}

/// Connects to `addr` from inside the network namespace of `pid`, from a socket the guard lets
/// through (its cookie registered before the connect).
fn connect_in_netns(pid: u32, addr: SocketAddr, guard: &mut Guard, timeout: Duration) -> Result<TcpStream, V8Error> {
    let fd = socket_in_netns(pid, addr.is_ipv6())?;
    let err = |what: &str, e: std::io::Error| V8Error::Connect(format!("{what} the inspector of {pid} at {addr}: {e}"));
    let cookie = sockopt_u64(&fd, SO_COOKIE).map_err(|e| err("a socket cookie for", e))?;
    guard.allow(cookie)?;
    let (storage, len) = sockaddr(addr);
    let raw = fd.as_raw_fd();
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK);
        if libc::connect(raw, (&raw const storage).cast(), len) != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err("connecting to", e));
            }
            let mut pfd = libc::pollfd { fd: raw, events: libc::POLLOUT, revents: 0 };
            let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
            match libc::poll(&mut pfd, 1, ms) {
                1 => {}
                0 => return Err(err("connecting to", std::io::ErrorKind::TimedOut.into())),
                _ => return Err(err("connecting to", std::io::Error::last_os_error())),
            }
            let mut so_error: libc::c_int = 0;
            let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            libc::getsockopt(raw, libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut so_error).cast(), &mut l);
            if so_error != 0 {
                return Err(err("connecting to", std::io::Error::from_raw_os_error(so_error)));
            }
        }
        libc::fcntl(raw, libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    Ok(TcpStream::from(fd))
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The WebSocket path from the inspector's `/json/list` (an HTTP/1.0 GET, answer capped).
fn websocket_path(pid: u32, addr: SocketAddr, guard: &mut Guard, budget: &Budget) -> Result<String, V8Error> {
    let port = addr.port();
    let left = budget.check("asking the inspector's /json/list")?;
    let mut s = connect_in_netns(pid, addr, guard, left.min(Duration::from_secs(3)))?;
    s.set_read_timeout(Some(budget.slice())).ok();
    s.set_write_timeout(Some(left.min(Duration::from_secs(5)))).ok();
    s.write_all(format!("GET /json/list HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| V8Error::Protocol(format!("asking /json/list: {e}")))?;
    // Node keeps the connection open after answering: read until the body is complete.
    let mut buf = Vec::new();
    let mut piece = [0u8; 8192];
    let (body_at, body_len) = loop {
        // One deadline for the whole answer, however slowly it comes.
        budget.check("reading the inspector's /json/list")?;
        s.set_read_timeout(Some(budget.slice())).ok();
        let n = match s.read(&mut piece) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) => continue,
            Err(e) => return Err(V8Error::Protocol(format!("reading /json/list: {e}"))),
        };
        buf.extend_from_slice(&piece[..n]);
        if buf.len() > MAX_LIST_BYTES {
            return Err(V8Error::Protocol("the /json/list answer is larger than 64 KiB".into()));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(at)) if resp.code == Some(200) => {
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok());
                match len {
                    Some(len) if buf.len() >= at + len => break (at, len),
                    None if n == 0 => break (at, buf.len() - at),
                    _ if n == 0 => return Err(V8Error::Protocol("/json/list answer cut short".into())),
                    _ => {}
                }
            }
            Ok(httparse::Status::Partial) if n > 0 => {}
            _ => return Err(V8Error::Protocol(format!("port {port} did not answer /json/list like Node's inspector"))),
        }
    };
    let buf = &buf[..body_at + body_len];
    let list: Value = serde_json::from_slice(&buf[body_at..]).map_err(|_| V8Error::Protocol("/json/list is not JSON".into()))?;
    let url = list
        .as_array()
        .and_then(|a| a.iter().find_map(|t| t.get("webSocketDebuggerUrl").and_then(Value::as_str)))
        .ok_or_else(|| V8Error::Protocol("/json/list names no WebSocket".into()))?;
    let path = url.strip_prefix("ws://").and_then(|r| r.find('/').map(|i| &r[i..])).unwrap_or("");
    if path.len() < 2 || path.len() > 128 || !path[1..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(V8Error::Protocol("/json/list gave an unexpected WebSocket URL".into()));
    }
    Ok(path.to_string())
}

/// Guards of inspectors that would not close: each stays until its port no longer listens
/// (checked at every new session), so a window memscope opened is never left unguarded.
static PARKED: Mutex<Vec<(u32, u16, Guard)>> = Mutex::new(Vec::new());

fn park_guard(pid: u32, port: u16, guard: Guard) {
    if own_listeners(pid).contains(&port) || own_listener_sockets(pid).iter().any(|l| l.port == port) {
        tracing::warn!(pid, port, "the inspector is still open: its guard stays until it closes");
        PARKED.lock().unwrap_or_else(|e| e.into_inner()).push((pid, port, guard));
    }
}

/// Drops the parked guards whose inspector is gone.
fn sweep_parked() {
    let gone: Vec<Guard> = {
        let mut parked = PARKED.lock().unwrap_or_else(|e| e.into_inner());
        let (keep, gone) = std::mem::take(&mut *parked)
            .into_iter()
            .partition(|(pid, port, _)| own_listener_sockets(*pid).iter().any(|l| l.port == *port));
        *parked = keep;
        gone.into_iter().map(|(_, _, g)| g).collect()
    };
    drop(gone);
}

/// Closes an inspector that opened where it was not expected (`l`), under a guard of its own.
/// False if `l` is not an inspector (the app's own listener).
fn close_stray(process: &Arc<Process>, l: Listener, purpose: &str) -> bool {
    let pid = process.pid();
    let cleanup = Budget::new(CLEANUP_BUDGET);
    let Ok(cookie) = netns_cookie(pid) else { return false };
    let Ok(mut guard) = Guard::install(cookie, l.port) else { return false };
    let Ok(path) = websocket_path(pid, l.connect_addr(), &mut guard, &cleanup) else { return false };
    match Inspector::handshake(process, l.connect_addr(), &path, &mut guard, purpose, cleanup) {
        Ok(mut s) => {
            s.guard = Some(guard);
            let _ = s.close();
        }
        Err(_) => park_guard(pid, l.port, guard),
    }
    true
}

fn audit_refusal(pid: u32, purpose: &str, e: &V8Error) {
    info!(target: "audit", pid, purpose, result = "refused", reason = %e, "v8 inspector session");
}

impl Inspector {
    /// Opens a session with Node.js process `process` (see the module doc for what is checked
    /// and refused), within `budget` (the whole exchange, later calls included). `purpose` (who
    /// asked and what for) goes to the audit log.
    pub fn open(process: Arc<Process>, purpose: &str, budget: Budget) -> Result<Inspector, V8Error> {
        let pid = process.pid();
        // Before anything: the process attached still runs as `pid`.
        if !process.alive() {
            let e = V8Error::Gone(pid);
            audit_refusal(pid, purpose, &e);
            return Err(e);
        }
        sweep_parked();
        {
            let mut open = OPEN.lock().unwrap();
            let set = open.get_or_insert_with(HashSet::new);
            if !set.insert(pid) {
                let e = V8Error::Busy(pid);
                audit_refusal(pid, purpose, &e);
                return Err(e);
            }
        }
        let result = NetnsTurn::take(&process, &budget).and_then(|turn| {
            let mut s = Self::open_inner(&process, purpose, &budget)?;
            s.turn = Some(turn);
            Ok(s)
        });
        match &result {
            Ok(s) => info!(target: "audit", pid, port = s.port, purpose, result = "opened", "v8 inspector session"),
            Err(e) => {
                OPEN.lock().unwrap().get_or_insert_with(HashSet::new).remove(&pid);
                audit_refusal(pid, purpose, e);
            }
        }
        result
    }

    fn open_inner(process: &Arc<Process>, purpose: &str, budget: &Budget) -> Result<Inspector, V8Error> {
        let pid = process.pid();
        let catches = catches_signal(pid, libc::SIGUSR1)?;
        let endpoint = expected_endpoint(pid);
        let mut before = own_listener_sockets(pid);
        let listening = listeners(pid);
        // Read, then check: what was read is the target's only if it still runs as `pid`.
        if !process.alive() {
            return Err(V8Error::Gone(pid));
        }
        if !catches {
            return Err(V8Error::NoSigusr1Handler(pid));
        }
        let port = endpoint?.port;
        let taken = listening.iter().any(|l| l.port == port);
        // Before the signal: from now on only memscope's sockets reach that port there.
        let mut guard = Guard::install(netns_cookie(pid)?, port)?;
        // Probe the inspector that may already be there: a listener of the target's that
        // answers /json/list. It may be someone else's debugging session: refused, untouched.
        for l in before.iter().take(8) {
            match websocket_path(pid, l.connect_addr(), &mut guard, budget) {
                Ok(_) => return Err(V8Error::AlreadyOpen { pid, port: l.port }),
                Err(e @ (V8Error::Cancelled(_) | V8Error::Timeout(..))) => return Err(e),
                Err(_) => {}
            }
        }
        budget.check("opening the inspector")?;
        // Through the pidfd: the signal cannot reach another process that reused the pid.
        process.signal(libc::SIGUSR1).map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) => V8Error::Gone(pid),
            _ => V8Error::Connect(format!("signalling {pid}: {e}")),
        })?;
        let deadline = Instant::now() + LISTEN_WAIT;
        let mut elsewhere_since: Option<Instant> = None;
        let found: Vec<Listener> = loop {
            let new: Vec<Listener> = own_listener_sockets(pid).into_iter().filter(|l| !before.iter().any(|b| b.inode == l.inode)).collect();
            if !process.alive() {
                return Err(V8Error::Gone(pid));
            }
            let (on_port, elsewhere): (Vec<Listener>, Vec<Listener>) = new.into_iter().partition(|l| l.port == port);
            if !on_port.is_empty() {
                // Node binds every address of its host at once: one more look gets them all.
                std::thread::sleep(Duration::from_millis(20));
                let mine = socket_inodes(pid);
                break listeners(pid).into_iter().filter(|l| l.port == port && mine.contains(&l.inode)).collect();
            }
            if let Some(other) = elsewhere.first().copied() {
                // A new listener of the target on another port: the app's own, or its inspector
                // on a port set at run time (`process.debugPort`), which the guard does not cover.
                let since = *elsewhere_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(100) {
                    if close_stray(process, other, purpose) {
                        return Err(V8Error::Unguardable {
                            pid,
                            reason: format!("its inspector opened on port {} instead of {port} (set at run time?): closed it", other.port),
                        });
                    }
                    before.extend(elsewhere);
                    elsewhere_since = None;
                }
            }
            if Instant::now() > deadline {
                return Err(if taken { V8Error::PortTaken { pid, port } } else { V8Error::NoInspector(pid) });
            }
            budget.check("waiting for the inspector to listen")?;
            std::thread::sleep(Duration::from_millis(20));
        };
        let Some(listener) = found.iter().find(|l| l.is_loopback()).copied().filter(|_| found.iter().all(Listener::is_loopback)) else {
            // Reachable from other hosts: close it at once, through the guarded port.
            let addr = found.iter().map(|l| l.addr.to_string()).collect::<Vec<_>>().join(", ");
            let l = found[0];
            let closed = match Self::connect(process, l.connect_addr(), &mut guard, purpose, Budget::new(CLEANUP_BUDGET)) {
                Ok(mut s) => {
                    s.guard = Some(guard);
                    s.close().is_ok()
                }
                Err(_) => {
                    park_guard(pid, port, guard);
                    false
                }
            };
            tracing::warn!(pid, port, %addr, closed, "the inspector listened on a non-loopback address");
            return Err(V8Error::NotLoopback { pid, addr, port });
        };
        // Exactly the target's own socket's address: never an assumed 127.0.0.1, where another
        // process may listen while Node is on [::1].
        let addr = SocketAddr::new(listener.addr, port);
        match Self::connect(process, addr, &mut guard, purpose, budget.clone()) {
            Ok(mut s) => {
                s.guard = Some(guard);
                Ok(s)
            }
            Err(e) => {
                // We started it: do not leave it listening. Without a session, only a second
                // SIGUSR1 is harmless (a no-op): close it the one way we can, by a session, on a
                // budget of its own (the request's may be what ended).
                let cleanup = Budget::new(CLEANUP_BUDGET);
                let session = if process.alive() {
                    websocket_path(pid, addr, &mut guard, &cleanup)
                        .and_then(|path| Self::handshake(process, addr, &path, &mut guard, purpose, cleanup.clone()))
                        .ok()
                } else {
                    None
                };
                match session {
                    Some(mut s) => {
                        s.guard = Some(guard);
                        drop(s);
                    }
                    // Still listening, and we could not close it: it stays guarded until it is gone.
                    None => park_guard(pid, port, guard),
                }
                Err(e)
            }
        }
    }

    fn connect(process: &Arc<Process>, addr: SocketAddr, guard: &mut Guard, purpose: &str, budget: Budget) -> Result<Inspector, V8Error> {
        let path = websocket_path(process.pid(), addr, guard, &budget)?;
        Self::handshake(process, addr, &path, guard, purpose, budget)
    }

    fn handshake(
        process: &Arc<Process>,
        addr: SocketAddr,
        path: &str,
        guard: &mut Guard,
        purpose: &str,
        budget: Budget,
    ) -> Result<Inspector, V8Error> {
        let pid = process.pid();
        let port = addr.port();
        let left = budget.check("the WebSocket handshake")?;
        let stream = connect_in_netns(pid, addr, guard, left.min(Duration::from_secs(3)))?;
        // Connected in the namespace read from /proc/PID: the target's only if it still runs.
        if !process.alive() {
            return Err(V8Error::Gone(pid));
        }
        stream.set_read_timeout(Some(budget.slice())).ok();
        stream.set_write_timeout(Some(left.min(Duration::from_secs(10)))).ok();
        let config = WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE_BYTES)).max_frame_size(Some(MAX_MESSAGE_BYTES));
        let url = format!("ws://{addr}{path}");
        let mut attempt = tungstenite::client::client_with_config(url.as_str(), stream, Some(config));
        let ws = loop {
            match attempt {
                Ok((ws, _)) => break ws,
                // A read slice ended: the handshake goes on, within the one deadline.
                Err(tungstenite::HandshakeError::Interrupted(mid)) => {
                    budget.check("the WebSocket handshake")?;
                    attempt = mid.handshake();
                }
                Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) if r.status() == 400 || r.status() == 403 => {
                    return Err(V8Error::DebuggerAttached(pid))
                }
                Err(e) => return Err(V8Error::Protocol(format!("WebSocket handshake with the inspector of {pid}: {e}"))),
            }
        };
        Ok(Inspector {
            account: Account::for_pid(pid),
            pid,
            process: process.clone(),
            budget,
            port,
            ws,
            next_id: 1,
            purpose: purpose.to_string(),
            closed: false,
            broken: None,
            opened_at: Instant::now(),
            turn: None,
            guard: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the session can no longer be read (a read failed, or a message was refused
    /// half read): every later call fails.
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// The process this session acts on.
    pub fn process(&self) -> &Arc<Process> {
        &self.process
    }

    /// The exchange's deadline and cancellation.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Calls `method` and waits (up to `timeout`, and within the session's [`Budget`]) for its
    /// result; events that arrive meanwhile go to `on_event(method, params)`, which may stop
    /// the call by returning an error.
    pub fn call_with_events(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        on_event: impl FnMut(&str, &Value) -> Result<(), V8Error>,
    ) -> Result<Value, V8Error> {
        self.call_raw(method, params, timeout, MAX_MESSAGE_BYTES, on_event)?.result_value()
    }

    /// Like [`Self::call_with_events`], accepting an answer of up to `max_bytes` (at most
    /// [`MAX_PROFILE_MESSAGE_BYTES`]) and returning it unparsed: the caller parses its result
    /// into typed structs ([`RawReply::result`]). Events stay capped at [`MAX_MESSAGE_BYTES`]
    /// each in spirit: they are parsed as they come, one at a time.
    pub fn call_raw(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        max_bytes: usize,
        mut on_event: impl FnMut(&str, &Value) -> Result<(), V8Error>,
    ) -> Result<RawReply, V8Error> {
        self.call_raw_events(method, params, timeout, max_bytes, |m, p| on_event(m, &event_params(p)?))
    }

    /// Like [`Self::call_raw`], with the events' params unparsed too (`None` when absent): for
    /// events that carry a large payload the caller parses into typed structs (a worker's
    /// nested answers, see [`super::workers`]).
    pub fn call_raw_events(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        max_bytes: usize,
        mut on_event: impl FnMut(&str, Option<&RawValue>) -> Result<(), V8Error>,
    ) -> Result<RawReply, V8Error> {
        let id = self.next_id;
        self.next_id += 1;
        let max_bytes = max_bytes.clamp(MAX_MESSAGE_BYTES, MAX_PROFILE_MESSAGE_BYTES);
        self.set_message_cap(max_bytes);
        let result = self.call_raw_inner(id, method, params, timeout, max_bytes, &mut on_event);
        self.set_message_cap(MAX_MESSAGE_BYTES);
        result
    }

    fn set_message_cap(&mut self, bytes: usize) {
        self.ws.set_config(|c| {
            c.max_message_size = Some(bytes);
            c.max_frame_size = Some(bytes);
        });
    }

    /// Reads the next text message within `deadline` (the caller's `timeout`) and the session's
    /// budget; `None` when a read slice ended without one (or the message was not text).
    fn read_text(&mut self, what: &str, deadline: Instant, timeout: Duration, max_bytes: usize) -> Result<Option<tungstenite::Utf8Bytes>, V8Error> {
        if let Some(why) = &self.broken {
            return Err(V8Error::Protocol(format!("the inspector session cannot be used for {what}: {why}")));
        }
        if Instant::now() >= deadline {
            return Err(V8Error::Timeout(what.to_string(), timeout));
        }
        self.budget.check(what)?;
        self.ws.get_ref().set_read_timeout(Some(self.budget.slice().min(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))).ok();
        let m = match self.ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) => return Ok(None),
            Err(tungstenite::Error::Capacity(e)) => {
                let why = format!("the inspector of process {} sent a message larger than the {} MiB accepted during {what} ({e})", self.pid, max_bytes >> 20);
                self.broken = Some(why.clone());
                return Err(V8Error::TooLarge(why));
            }
            Err(e) => {
                let why = format!("reading the answer to {what}: {e}");
                self.broken = Some(why.clone());
                return Err(V8Error::Protocol(why));
            }
        };
        match m {
            Message::Text(t) => Ok(Some(t)),
            Message::Close(_) => Err(V8Error::Protocol(format!("the inspector closed the session during {what}"))),
            _ => Ok(None),
        }
    }

    fn call_raw_inner(
        &mut self,
        id: u64,
        method: &str,
        params: Value,
        timeout: Duration,
        max_bytes: usize,
        on_event: &mut RawEventFn<'_>,
    ) -> Result<RawReply, V8Error> {
        if let Some(why) = &self.broken {
            return Err(V8Error::Protocol(format!("the inspector session cannot be used for {method}: {why}")));
        }
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.budget.check(method)?;
        self.ws.get_ref().set_write_timeout(Some(self.budget.left().min(Duration::from_secs(10)))).ok();
        self.ws.send(Message::text(msg)).map_err(|e| V8Error::Protocol(format!("sending {method}: {e}")))?;
        let deadline = Instant::now() + timeout;
        loop {
            let Some(text) = self.read_text(method, deadline, timeout, max_bytes)? else { continue };
            let held = charge_message(&self.account, self.pid, text.len(), method)?;
            let env: Envelope = serde_json::from_str(text.as_str()).map_err(|_| V8Error::Protocol("the inspector sent something that is not a protocol message".into()))?;
            if env.id == Some(id) {
                if let Some(err) = &env.error {
                    let msg = err.message.as_deref().unwrap_or("error");
                    return Err(V8Error::Remote(method.to_string(), msg.chars().take(200).collect()));
                }
                drop(env);
                return Ok(RawReply(text, Some(held)));
            }
            if let Some(ev) = env.method {
                on_event(ev.as_ref(), env.params)?;
            }
        }
    }

    /// Reads events (no call) until `on_event` returns `true` (done) or `timeout` passes (then
    /// `V8Error::Timeout` naming `what`), within the session's budget and messages of at most
    /// `max_bytes` (clamped as in [`Self::call_raw`]). For answers that come as events, e.g.
    /// those of a worker's nested session (see [`super::workers`]). Events' params stay raw.
    pub fn read_events_raw(
        &mut self,
        what: &str,
        timeout: Duration,
        max_bytes: usize,
        mut on_event: impl FnMut(&str, Option<&RawValue>) -> Result<bool, V8Error>,
    ) -> Result<(), V8Error> {
        let max_bytes = max_bytes.clamp(MAX_MESSAGE_BYTES, MAX_PROFILE_MESSAGE_BYTES);
        self.set_message_cap(max_bytes);
        let deadline = Instant::now() + timeout;
        let result = (|| loop {
            let Some(text) = self.read_text(what, deadline, timeout, max_bytes)? else { continue };
            let env: Envelope = serde_json::from_str(text.as_str()).map_err(|_| V8Error::Protocol("the inspector sent something that is not a protocol message".into()))?;
            if let Some(ev) = env.method {
                if on_event(ev.as_ref(), env.params)? {
                    return Ok(());
                }
            }
        })();
        self.set_message_cap(MAX_MESSAGE_BYTES);
        result
    }

    /// Calls `method` and returns its result, ignoring events.
    pub fn call(&mut self, method: &str, params: Value, timeout: Duration) -> Result<Value, V8Error> {
        self.call_with_events(method, params, timeout, |_, _| Ok(()))
    }

    /// A full garbage collection (`HeapProfiler.collectGarbage`).
    pub fn collect_garbage(&mut self) -> Result<(), V8Error> {
        self.call("HeapProfiler.collectGarbage", json!({}), DEFAULT_CALL_TIMEOUT).map(|_| ())
    }

    /// Evaluates `expression` in the target's main context; returns the result object
    /// (`Runtime.evaluate`'s `result`, by value).
    pub fn evaluate(&mut self, expression: &str, timeout: Duration) -> Result<Value, V8Error> {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "timeout": timeout.as_millis() as u64 }),
            timeout + Duration::from_secs(1),
        )?;
        if let Some(ex) = r.get("exceptionDetails") {
            let text = ex.get("exception").and_then(|e| e.get("description")).and_then(Value::as_str)
                .or_else(|| ex.get("text").and_then(Value::as_str)).unwrap_or("exception");
            return Err(V8Error::Remote("Runtime.evaluate".into(), text.chars().take(200).collect()));
        }
        Ok(r.get("result").cloned().unwrap_or(Value::Null))
    }

    /// Closes the inspector (`process._debugEnd()`) and waits until its port no longer listens.
    pub fn close(mut self) -> Result<(), V8Error> {
        self.close_inner()
    }

    fn close_inner(&mut self) -> Result<(), V8Error> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        // Closing happens whatever the request's budget says (a cancelled request must not
        // leave the port open), bounded by CLOSE_WAIT, reading nothing more of what the
        // target sends.
        self.ws.get_ref().set_write_timeout(Some(Duration::from_secs(1))).ok();
        // The answer may never come: the server closes under the call.
        let sent = self.ws.send(Message::text(
            json!({ "id": self.next_id, "method": "Runtime.evaluate", "params": { "expression": "process._debugEnd()" } }).to_string(),
        ));
        let _ = self.ws.flush();
        let deadline = Instant::now() + CLOSE_WAIT;
        let mut still = true;
        while Instant::now() < deadline {
            let listening = own_listener_sockets(self.pid).iter().any(|l| l.port == self.port);
            // Read, then check: a port seen after the target died is not its own.
            if !listening || !self.process.alive() {
                still = false;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
        if let Some(guard) = self.guard.take() {
            if still {
                park_guard(self.pid, self.port, guard);
            }
        }
        self.turn.take();
        OPEN.lock().unwrap().get_or_insert_with(HashSet::new).remove(&self.pid);
        let ms = self.opened_at.elapsed().as_millis() as u64;
        if still || sent.is_err() {
            info!(target: "audit", pid = self.pid, port = self.port, purpose = %self.purpose, result = "close_failed", ms, "v8 inspector session");
            return Err(V8Error::StillListening { pid: self.pid, port: self.port });
        }
        info!(target: "audit", pid = self.pid, port = self.port, purpose = %self.purpose, result = "closed", ms, "v8 inspector session");
        Ok(())
    }
}

/// What receives the events of a call whose events' params stay raw.
type RawEventFn<'a> = dyn FnMut(&str, Option<&RawValue>) -> Result<(), V8Error> + 'a;

/// The envelope of a protocol message: the rest stays raw text.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default, borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    params: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<RemoteError>,
}

#[derive(Deserialize)]
struct RemoteError {
    #[serde(default)]
    message: Option<String>,
}

/// An event's params as a JSON tree (`Null` when absent), for callers of events of a bounded
/// size.
fn event_params(p: Option<&RawValue>) -> Result<Value, V8Error> {
    match p {
        Some(p) => serde_json::from_str(p.get()).map_err(|_| V8Error::Protocol("the inspector sent an event that is not JSON".into())),
        None => Ok(Value::Null),
    }
}

/// The envelope of one protocol message, `text` (an inner message of a worker's session
/// included): its id, method, params (raw) and error message.
pub struct ParsedEnvelope<'a> {
    pub id: Option<u64>,
    pub method: Option<Cow<'a, str>>,
    pub params: Option<&'a RawValue>,
    /// The error's message (when the message is an error answer).
    pub error: Option<String>,
}

/// Parses the envelope of `text` (the rest stays raw text).
pub fn envelope(text: &str) -> Result<ParsedEnvelope<'_>, V8Error> {
    let env: Envelope = serde_json::from_str(text).map_err(|_| V8Error::Protocol("the inspector sent something that is not a protocol message".into()))?;
    Ok(ParsedEnvelope {
        id: env.id,
        method: env.method,
        params: env.params,
        error: env.error.map(|e| e.message.unwrap_or_else(|| "error".into()).chars().take(200).collect()),
    })
}

/// Charges a message of `len` bytes, read from the inspector of `pid` during `method`, to the
/// target's `account` while it is held.
fn charge_message(account: &Arc<Account>, pid: u32, len: usize, method: &str) -> Result<Reservation, V8Error> {
    account.reserve(Use::V8, len as u64).map_err(|e| {
        V8Error::TooLarge(format!("the inspector of process {pid} sent a {len}-byte message during {method}: {e}"))
    })
}

/// The answer to one call, unparsed (at most the call's message cap), charged to the target's
/// memory budget while it is kept (a worker's nested answer: by the event that carried it).
pub struct RawReply(tungstenite::Utf8Bytes, #[allow(dead_code, reason = "held for its Drop")] Option<Reservation>);

impl RawReply {
    /// An answer that came as text of its own (a worker's, nested in an event).
    pub fn from_text(text: String) -> RawReply {
        RawReply(text.into(), None)
    }

    /// The whole message's text.
    pub fn text(&self) -> &str {
        self.0.as_str()
    }

    /// Its `result`, raw (`None` when absent).
    pub fn result(&self) -> Result<Option<&RawValue>, V8Error> {
        #[derive(Deserialize)]
        struct R<'a> {
            #[serde(default, borrow)]
            result: Option<&'a RawValue>,
        }
        serde_json::from_str::<R>(self.text()).map(|r| r.result).map_err(|_| V8Error::Protocol("the inspector's answer is not JSON".into()))
    }

    /// Its `result` as a JSON tree (`Null` when absent), for answers of a bounded size.
    pub fn result_value(&self) -> Result<Value, V8Error> {
        self.result()?
            .map(|r| serde_json::from_str(r.get()))
            .transpose()
            .map_err(|_| V8Error::Protocol("the inspector sent something that is not JSON".into()))
            .map(|v| v.unwrap_or(Value::Null))
    }
}

impl Drop for Inspector {
    fn drop(&mut self) {
        if let Err(e) = self.close_inner() {
            tracing::warn!(pid = self.pid, error = %e, "closing the inspector");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own process: SigCgt is read (the test harness does not catch SIGUSR1).
    #[test]
    fn reads_sigcgt() {
        assert!(!catches_signal(std::process::id(), libc::SIGUSR1).unwrap());
        assert!(matches!(catches_signal(u32::MAX - 1, libc::SIGUSR1), Err(V8Error::NoSuchProcess(_))));
    }

    fn ep(node_options: &str, argv: &[&str]) -> (Option<String>, u16) {
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        let e = parse_endpoint(node_options.split_whitespace(), &argv);
        (e.host, e.port)
    }

    /// Node's inspector flags, in NODE_OPTIONS and on the command line (the last wins; the
    /// script's own arguments are not Node's).
    #[test]
    fn inspector_endpoint_from_flags() {
        assert_eq!(ep("", &["node", "app.js"]), (None, 9229));
        assert_eq!(ep("", &["node", "--inspect-port=1234", "app.js"]), (None, 1234));
        assert_eq!(ep("", &["node", "--inspect-port", "1234", "app.js"]), (None, 1234));
        assert_eq!(ep("", &["node", "--inspect-port=[::1]:9230", "app.js"]), (Some("::1".into()), 9230));
        assert_eq!(ep("", &["node", "--inspect=0.0.0.0:9229", "app.js"]), (Some("0.0.0.0".into()), 9229));
        assert_eq!(ep("", &["node", "--inspect=localhost", "app.js"]), (Some("localhost".into()), 9229));
        assert_eq!(ep("", &["node", "--debug-port=0", "app.js"]), (None, 0));
        assert_eq!(ep("--inspect-port=4000", &["node", "app.js"]), (None, 4000));
        assert_eq!(ep("--inspect-port=4000", &["node", "--inspect-port=5000", "app.js"]), (None, 5000));
        assert_eq!(ep("", &["node", "-r", "--inspect-port=1", "app.js", "--inspect-port=7"]), (None, 9229));
        assert_eq!(ep("", &["node", "app.js", "--inspect-port=7"]), (None, 9229));
    }

    /// `/proc/net/tcp{,6}` addresses, as the kernel prints them on x86-64.
    #[test]
    fn proc_net_addresses() {
        assert_eq!(proc_net_addr("0100007F"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(proc_net_addr("00000000"), Some("0.0.0.0".parse().unwrap()));
        assert_eq!(proc_net_addr("00000000000000000000000001000000"), Some("::1".parse().unwrap()));
        assert_eq!(proc_net_addr("0000000000000000FFFF00000100007F"), Some("::ffff:127.0.0.1".parse().unwrap()));
        assert_eq!(proc_net_addr("xyz"), None);
        let l = Listener { addr: "::ffff:127.0.0.1".parse().unwrap(), port: 9229, inode: 1 };
        assert!(l.is_loopback());
        let any = Listener { addr: "::".parse().unwrap(), port: 9229, inode: 1 };
        assert!(!any.is_loopback());
        assert_eq!(any.connect_addr(), "[::1]:9229".parse().unwrap());
    }

    /// A message past the target's memory budget is refused as TooLarge (counted, reported);
    /// one within it is charged while held and given back on drop.
    #[test]
    fn messages_are_charged_to_the_target_budget() {
        static POOL: crate::budget::Pool = crate::budget::Pool::new(1 << 20);
        let account = Account::in_pool(7, 1000, &POOL);
        let held = charge_message(&account, 7, 600, "HeapProfiler.stopSampling").unwrap();
        assert_eq!(account.report().by_use["v8"], 600);
        let e = charge_message(&account, 7, 600, "HeapProfiler.stopSampling").unwrap_err();
        assert!(matches!(e, V8Error::TooLarge(ref m) if m.contains("budget") && m.contains("600-byte")), "{e}");
        assert_eq!(e.http().0, 502);
        drop(held);
        let report = account.report();
        assert_eq!((report.used_bytes, POOL.usage().0), (0, 0), "bytes come back on drop");
        assert_eq!(report.refused["v8"].times, 1);
        assert_eq!(report.refused["v8"].limit, "target");
    }
}
