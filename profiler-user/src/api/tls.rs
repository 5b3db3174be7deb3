//! The listener: TLS (rustls with ring, from PEM certificate and key files) or plain TCP, a
//! cap on concurrent connections (and per client address, see [`super::conn_limits`]), and a
//! timeout on each TLS handshake.
//!
//! Connections are accepted here, not by warp, so that: handshakes run in their own tasks (a
//! slow client cannot stall the accept loop) and are bounded in time; a connection holds a
//! permit of the connection cap until it closes; past the cap, the oldest connection that has
//! not shown a valid token yet is closed for the newcomer (see [`super::conn_limits`]), and
//! only when every connection has do new ones wait in the kernel's backlog; and each
//! connection keeps its peer address for the per-IP limits.
//! Only HTTP/1.1 is offered (ALPN `http/1.1`). A write stalled for 60 s (a client that stopped
//! reading) ends its connection.
use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::Stream;
use std::future::Future as _;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
};
use tokio_rustls::{rustls, server::TlsStream, TlsAcceptor};
use tracing::{debug, warn};

use super::conn_limits::{Admission, Prover, Ticket};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("{0} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey(PathBuf),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Builds the server configuration from PEM files: the certificate chain (leaf first) and
/// its private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Io { what, path: path.to_owned(), source })
    };
    let cert_pem = read("certificate", cert)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Io { what: "certificate", path: cert.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let key_pem = read("private key", key)?;
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| TlsError::Io { what: "private key", path: key.to_owned(), source })?
        .ok_or_else(|| TlsError::NoKey(key.to_owned()))?;
    if let Ok(meta) = std::fs::metadata(key) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            warn!(path = %key.display(), "the TLS private key may be read by group or others (chmod 600 it)");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A write that makes no progress for this long (the client stopped reading) ends the
/// connection, so a stalled client cannot hold a slot of the connection cap forever.
const WRITE_STALL: Duration = Duration::from_secs(60);

/// One accepted connection, plain or TLS, with its peer address, its slot of the cap and its
/// admission ticket (closed with an error when it is evicted before proving itself).
pub struct Conn {
    io: ConnIo,
    pub peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    ticket: Ticket,
    /// Running while a write is blocked.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

fn evicted_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "closed to make room: no valid token shown yet")
}

impl Conn {
    fn new(io: ConnIo, peer: SocketAddr, permit: OwnedSemaphorePermit, ticket: Ticket) -> Conn {
        Conn { io, peer, _permit: permit, ticket, stall: None }
    }

    /// Marks the connection as showing a valid token (or a health check), see
    /// [`super::conn_limits`].
    pub fn prover(&self) -> Prover {
        self.ticket.prover()
    }

    /// Passes a write-side result through, timing how long it stays pending.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(r) => {
                self.stall = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timer = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped reading the answer",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

enum ConnIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ticket.poll_evicted(cx).is_ready() {
            return Poll::Ready(Err(evicted_error()));
        }
        match &mut this.io {
            ConnIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.ticket.poll_evicted(cx).is_ready() {
            return Poll::Ready(Err(evicted_error()));
        }
        let poll = match &mut this.io {
            ConnIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        this.watch(cx, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = match &mut this.io {
            ConnIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        };
        this.watch(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The stream of ready connections (after the TLS handshake when TLS is on). Dropping it
/// stops the accept loop.
pub struct Incoming {
    rx: mpsc::Receiver<Conn>,
    accept_loop: JoinHandle<()>,
}

impl Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// Starts accepting on `listener`. At most `max_connections` connections (including those
/// still in their TLS handshake) exist at once; unproven ones give way to newcomers, at most
/// `per_address` unproven from one address (see [`super::conn_limits`]).
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    max_connections: usize,
    per_address: usize,
    handshake_timeout: Duration,
) -> Incoming {
    let (tx, rx) = mpsc::channel::<Conn>(64);
    let cap = Arc::new(Semaphore::new(max_connections.max(1)));
    let admission = Admission::new(per_address);
    let accept_loop = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Its address's share first: past it, the address's oldest unproven connection goes.
            let ticket = admission.admit(peer.ip());
            let permit = match cap.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    // The cap is full: close the oldest unproven connection and take its slot
                    // when its task has let go of it. With every connection proven, wait.
                    let mut got = None;
                    while got.is_none() && !ticket.is_evicted() {
                        admission.evict_oldest();
                        match tokio::time::timeout(Duration::from_millis(200), cap.clone().acquire_owned()).await {
                            Ok(Ok(p)) => got = Some(p),
                            Ok(Err(_)) => return,
                            Err(_) => {}
                        }
                    }
                    match got {
                        Some(p) if !ticket.is_evicted() => p,
                        _ => {
                            debug!(%peer, "connection closed at accept: no room");
                            continue;
                        }
                    }
                }
            };
            if ticket.is_evicted() {
                debug!(%peer, "connection closed: its address holds its share of unproven connections");
                continue;
            }
            let _ = tcp.set_nodelay(true);
            match &tls {
                None => {
                    if tx.send(Conn::new(ConnIo::Plain(tcp), peer, permit, ticket)).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let outcome = {
                            let evicted = std::future::poll_fn(|cx| ticket.poll_evicted(cx));
                            let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp));
                            tokio::select! {
                                r = handshake => r,
                                () = evicted => {
                                    debug!(%peer, "TLS handshake closed to make room");
                                    return;
                                }
                            }
                        };
                        match outcome {
                            Ok(Ok(stream)) => {
                                let conn = Conn::new(ConnIo::Tls(Box::new(stream)), peer, permit, ticket);
                                let _ = tx.send(conn).await;
                            }
                            Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    Incoming { rx, accept_loop }
}
