//! Per-address connection cap: one client address (an IPv4 address, or an IPv6 /64, what one
//! host usually gets) holds at most [`super::limits::Limits::max_connections_per_address`]
//! connections at once, TLS handshakes included. A connection past it is closed at accept,
//! before any byte is read, and counted ([`refused`], `memscope_http_refused_total{limit="connections_per_address"}`).
//!
//! Without it, 1,000 slow connections from one address (slowloris: headers sent a byte at a
//! time) fill the global connection cap and nobody else gets in until each hits the header
//! deadline; with it, they take a few slots and the rest of the cap stays free for others.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Connections closed at accept because their address had its share.
pub fn refused() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// Open connections per address. The map only holds addresses with an open connection, so it
/// is bounded by the global connection cap.
pub struct PerAddress {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's share of its address; released when dropped.
pub struct AddressSlot {
    owner: Arc<PerAddress>,
    key: IpAddr,
}

impl PerAddress {
    pub fn new(max: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress { max: max.max(1), open: Mutex::new(HashMap::new()) })
    }

    /// A slot for a connection from `peer`, or `None` (counted) when its address is full.
    pub fn try_take(self: &Arc<Self>, peer: IpAddr) -> Option<AddressSlot> {
        let key = key(peer);
        let mut open = self.open.lock().unwrap();
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        Some(AddressSlot { owner: self.clone(), key })
    }

    #[cfg(test)]
    fn open(&self, peer: IpAddr) -> usize {
        self.open.lock().unwrap().get(&key(peer)).copied().unwrap_or(0)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The address a limit applies to: IPv4 as is (also when mapped into IPv6), IPv6 by /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address gets `max` slots, others are unaffected, a dropped slot is reusable, and
    /// IPv6 addresses of one /64 share theirs.
    #[test]
    fn caps_each_address() {
        let cap = PerAddress::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let (s1, _s2) = (cap.try_take(a).unwrap(), cap.try_take(a).unwrap());
        let before = refused();
        assert!(cap.try_take(a).is_none());
        assert!(refused() > before);
        assert!(cap.try_take(b).is_some());
        drop(s1);
        assert_eq!(cap.open(a), 1);
        assert!(cap.try_take(a).is_some());
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let _x = cap.try_take(v6("2001:db8::1")).unwrap();
        let _y = cap.try_take(v6("2001:db8::ffff:2")).unwrap();
        assert!(cap.try_take(v6("2001:db8::3")).is_none(), "one /64 shares a cap");
        assert!(cap.try_take(v6("2001:db8:0:1::1")).is_some());
        assert_eq!(key(v6("::ffff:10.0.0.1")), v6("10.0.0.1").to_canonical());
    }
}
