//! Connection admission: who may hold a connection of the cap, and who is closed to make room.
//!
//! A connection is *unproven* from its accept until hyper has read its first request head and
//! that head carries a valid token or asks for `/healthz` or `/readyz` ([`Ticket::prove`]);
//! then it is *proven* and is never closed to make room (keep-alive is off: it serves that one
//! request and ends). Before that, nothing tells an admin's connection from a slowloris one, so
//! unproven connections are the ones that give way:
//!
//! - one address (IPv4; all of 127.0.0.0/8 as one, since every loopback address is this host;
//!   an IPv6 /64, what one host usually gets) holds at most
//!   [`super::limits::Limits::max_connections_per_address`] unproven connections: a new one
//!   past it closes the address's oldest unproven one ([`refused`],
//!   `memscope_http_refused_total{limit="connections_per_address"}`);
//! - when the agent-wide cap is reached, the oldest unproven connection is closed for the
//!   newcomer ([`evicted`], `{limit="connections"}`); only when every connection is proven do
//!   new ones wait in the kernel's backlog.
//!
//! So slow connections from any number of loopback addresses hold a few slots for a short
//! while, and an admin's (or a health check's) connection, which sends its head at once, gets
//! in and is served: an attacker would have to open connections faster than the admin's head
//! arrives. Closing is done by waking the connection's task ([`Ticket::poll_evicted`]), which
//! ends with an error and gives its slot back.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use futures_util::task::AtomicWaker;

static REFUSED: AtomicU64 = AtomicU64::new(0);
static EVICTED: AtomicU64 = AtomicU64::new(0);

/// Unproven connections closed because their address had its share.
pub fn refused() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// Unproven connections closed to make room under the agent-wide cap.
pub fn evicted() -> u64 {
    EVICTED.load(Ordering::Relaxed)
}

const UNPROVEN: u8 = 0;
const PROVEN: u8 = 1;
const EVICTED_STATE: u8 = 2;

/// One connection's admission state, shared by its I/O and the registry.
struct ConnCtl {
    key: IpAddr,
    state: AtomicU8,
    waker: AtomicWaker,
}

/// The unproven connections, oldest first.
pub struct Admission {
    max_per_address: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    next: u64,
    unproven: BTreeMap<u64, Arc<ConnCtl>>,
}

/// A connection's place in [`Admission`]; gives it back when dropped.
pub struct Ticket {
    owner: Arc<Admission>,
    id: u64,
    ctl: Arc<ConnCtl>,
}

impl Admission {
    pub fn new(max_per_address: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_per_address: max_per_address.max(1),
            inner: Mutex::new(Inner { next: 0, unproven: BTreeMap::new() }),
        })
    }

    /// Registers a new connection from `peer` as unproven. When its address already holds its
    /// share of unproven connections, the address's oldest is closed (counted).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Ticket {
        let key = key(peer);
        let mut inner = self.inner.lock().unwrap();
        let same: Vec<u64> = inner.unproven.iter().filter(|(_, c)| c.key == key).map(|(&id, _)| id).collect();
        if same.len() >= self.max_per_address {
            for id in &same[..=same.len() - self.max_per_address] {
                if let Some(c) = inner.unproven.remove(id) {
                    close(&c);
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let id = inner.next;
        inner.next += 1;
        let ctl = Arc::new(ConnCtl { key, state: AtomicU8::new(UNPROVEN), waker: AtomicWaker::new() });
        inner.unproven.insert(id, ctl.clone());
        Ticket { owner: self.clone(), id, ctl }
    }

    /// Closes the oldest unproven connection (counted); false when there is none.
    pub fn evict_oldest(&self) -> bool {
        let Some((_, c)) = self.inner.lock().unwrap().unproven.pop_first() else { return false };
        close(&c);
        EVICTED.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Unproven connections now.
    pub fn unproven(&self) -> usize {
        self.inner.lock().unwrap().unproven.len()
    }
}

fn close(c: &ConnCtl) {
    c.state.store(EVICTED_STATE, Ordering::SeqCst);
    c.waker.wake();
}

impl Ticket {
    /// The connection showed a valid token (or asked for a health check): it keeps its slot.
    /// False when it had already been closed.
    pub fn prove(&self) -> bool {
        self.prover().prove()
    }

    pub fn is_evicted(&self) -> bool {
        self.ctl.state.load(Ordering::SeqCst) == EVICTED_STATE
    }

    /// Ready when the connection has been closed to make room; registers the task to be woken
    /// then.
    pub fn poll_evicted(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.ctl.waker.register(cx.waker());
        if self.is_evicted() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// A handle to prove this connection from the request handler.
    pub fn prover(&self) -> Prover {
        Prover { owner: self.owner.clone(), id: self.id, ctl: self.ctl.clone() }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.owner.inner.lock().unwrap().unproven.remove(&self.id);
    }
}

/// Proves a connection from its request handler (see [`Ticket::prove`]); cloned per request.
#[derive(Clone)]
pub struct Prover {
    owner: Arc<Admission>,
    id: u64,
    ctl: Arc<ConnCtl>,
}

impl Prover {
    pub fn prove(&self) -> bool {
        let mut inner = self.owner.inner.lock().unwrap();
        match self.ctl.state.load(Ordering::SeqCst) {
            UNPROVEN => {
                self.ctl.state.store(PROVEN, Ordering::SeqCst);
                inner.unproven.remove(&self.id);
                true
            }
            s => s == PROVEN,
        }
    }
}

/// The address a cap applies to: IPv4 as is (also when mapped into IPv6) but all of
/// 127.0.0.0/8 as one; IPv6 by /64.
fn key(ip: IpAddr) -> IpAddr {
    match super::limits::address_key(ip) {
        IpAddr::V4(v4) if v4.is_loopback() => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
        k => k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An address holds `max` unproven connections: a new one closes its oldest; loopback
    /// addresses share one share, other addresses are unaffected; a proven connection leaves
    /// the share and is never closed.
    #[test]
    fn unproven_share_per_address() {
        let adm = Admission::new(2);
        let a1 = adm.admit(ip("127.0.0.1"));
        let a2 = adm.admit(ip("127.0.0.2"));
        let other = adm.admit(ip("10.0.0.1"));
        let before = refused();
        let a3 = adm.admit(ip("127.0.0.3"));
        assert!(a1.is_evicted(), "the oldest loopback connection gives way");
        assert!(!a2.is_evicted() && !a3.is_evicted() && !other.is_evicted());
        assert!(refused() > before);
        assert!(a2.prover().prove());
        let _a4 = adm.admit(ip("127.0.0.1"));
        assert!(!a2.is_evicted(), "a proven connection is never closed");
        assert!(!a3.is_evicted(), "a2 left the share, so a3 and a4 fit");
        assert!(!a1.prove(), "a closed connection cannot be proven");
        let v6a = adm.admit(ip("2001:db8::1"));
        let _v6b = adm.admit(ip("2001:db8::ffff:2"));
        let _v6c = adm.admit(ip("2001:db8::3"));
        assert!(v6a.is_evicted(), "one /64 shares a share");
        assert_eq!(key(ip("::ffff:127.0.0.9")), ip("127.0.0.0"));
    }

    /// Under the agent-wide cap the oldest unproven connection is closed, proven ones never,
    /// and a closed connection's task is woken.
    #[test]
    fn evicts_oldest_unproven_and_wakes_it() {
        let adm = Admission::new(100);
        let first = adm.admit(ip("10.0.0.1"));
        let second = adm.admit(ip("10.0.0.2"));
        assert!(first.prove());
        let woken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let waker = std::task::Waker::from(Arc::new(Flag(woken.clone())));
        assert!(second.poll_evicted(&mut Context::from_waker(&waker)).is_pending());
        let before = evicted();
        assert!(adm.evict_oldest());
        assert!(woken.load(Ordering::SeqCst));
        assert!(second.is_evicted() && !first.is_evicted());
        assert!(evicted() > before);
        assert!(!adm.evict_oldest(), "nothing unproven is left");
        drop(second);
        assert_eq!(adm.unproven(), 0);
    }
}
