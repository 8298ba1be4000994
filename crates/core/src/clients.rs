//! Connections by client. One client may hold only so many of a server's connections (the
//! gateway's, the API's), so one slow or hostile client cannot take all of them from everyone
//! else, as nginx's `limit_conn` by address does. A client is an IPv4 address, or an IPv6 /64: what one host
//! is usually given, so a host cannot step around its share by counting through its own
//! addresses.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A server's connections now and those refused so far, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    pub open: u64,
    /// Closed as they arrived: their client held its most already.
    pub refused: u64,
}

pub struct Clients {
    /// The most connections one client holds at once; 0: no cap.
    limit: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
    open: AtomicU64,
    refused: AtomicU64,
}

/// One connection of a client, given back when dropped.
pub struct Slot {
    clients: Arc<Clients>,
    client: IpAddr,
}

impl Clients {
    /// At most `limit` connections per client; 0: no cap.
    pub fn new(limit: usize) -> Arc<Clients> {
        Arc::new(Clients {
            limit,
            held: Mutex::new(HashMap::new()),
            open: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// A slot for one more connection from `peer`, unless its client holds its most.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let client = client_of(peer);
        let mut held = self.held.lock().expect("clients lock");
        let n = held.entry(client).or_default();
        if self.limit > 0 && *n >= self.limit {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            clients: self.clone(),
            client,
        })
    }

    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            open: self.open.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.clients.held.lock().expect("clients lock");
        if let Some(n) = held.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.client);
            }
        }
        self.clients.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client an address belongs to: IPv4 as itself (an IPv4-mapped IPv6 address too), IPv6
/// by its /64.
fn client_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_holds_at_most_its_share_and_gets_it_back_as_connections_end() {
        let clients = Clients::new(2);
        let a = clients.admit(ip("192.0.2.1")).unwrap();
        let b = clients.admit(ip("::ffff:192.0.2.1")).unwrap();
        assert!(
            clients.admit(ip("192.0.2.1")).is_none(),
            "a mapped address is the same client"
        );
        let other = clients.admit(ip("192.0.2.2"));
        assert!(other.is_some(), "another client has its own share");
        assert_eq!(
            clients.stats(),
            ConnectionStats {
                open: 3,
                refused: 1
            }
        );
        drop(a);
        let c = clients.admit(ip("192.0.2.1"));
        assert!(c.is_some(), "a connection that ended gives its slot back");
        drop((b, c, other));
        assert_eq!(clients.stats().open, 0);
        assert!(clients.held.lock().unwrap().is_empty(), "nothing kept");
    }

    #[test]
    fn an_ipv6_host_is_its_64_and_no_cap_means_none() {
        let clients = Clients::new(1);
        let _one = clients.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(clients.admit(ip("2001:db8:1:2:ffff::9")).is_none());
        assert!(clients.admit(ip("2001:db8:1:3::1")).is_some());
        let open = Clients::new(0);
        let kept: Vec<Slot> = (0..100)
            .map(|_| open.admit(ip("192.0.2.1")).unwrap())
            .collect();
        assert_eq!(open.stats().open, 100);
        drop(kept);
    }
}
