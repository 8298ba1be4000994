//! Connections by client. One client may hold only so many of a server's connections (the
//! gateway's, the API's), so one slow or hostile client cannot take all of them from everyone
//! else, as nginx's `limit_conn` by address does. A client is an IPv4 address, or an IPv6
//! prefix: a /64 for the public (what one host is usually given, so it cannot step around
//! its share through its own addresses), a /128 where a subnet's machines are all known.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A server's connections now and those refused so far, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Served now.
    pub open: u64,
    /// Closed as they arrived: their client held its most already.
    pub refused: u64,
}

/// What each client holds, against its cap.
pub struct Clients {
    /// The most connections one client holds at once; 0: no cap.
    limit: usize,
    /// How many leading bits of an IPv6 address name its client.
    ipv6_prefix: u8,
    held: Mutex<HashMap<IpAddr, Held>>,
    open: AtomicU64,
    refused: AtomicU64,
}

#[derive(Default)]
struct Held {
    connections: usize,
    /// A refusal was reported since the client last held no connection: a client churning
    /// at its cap is reported once, not once per connection it closes.
    reported: bool,
}

/// A connection refused: its client holds its most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The first refusal since the client last held no connection: the one worth a log line.
    pub first: bool,
}

/// One connection of a client, given back when dropped.
pub struct Slot {
    clients: Arc<Clients>,
    /// `None` once [`Slot::exempt`]: open, but no longer its client's.
    client: Option<IpAddr>,
}

impl Clients {
    /// At most `limit` connections per client (0: no cap), IPv6 clients told apart by their
    /// first `ipv6_prefix` bits (at most 128).
    pub fn new(limit: usize, ipv6_prefix: u8) -> Arc<Clients> {
        Arc::new(Clients {
            limit,
            ipv6_prefix: ipv6_prefix.min(128),
            held: Mutex::new(HashMap::new()),
            open: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// A slot for one more connection from `peer`, unless its client holds its most.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refused> {
        let client = client_of(peer, self.ipv6_prefix);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let entry = held.entry(client).or_default();
        if self.limit > 0 && entry.connections >= self.limit {
            self.refused.fetch_add(1, Ordering::Relaxed);
            let first = !std::mem::replace(&mut entry.reported, true);
            return Err(Refused { first });
        }
        entry.connections += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            clients: self.clone(),
            client: Some(client),
        })
    }

    /// Connections open now and refused so far.
    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            open: self.open.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

impl Slot {
    /// Takes the connection off its client's count, still open: its peer proved to be no
    /// client to cap (a node of the cluster), whose connections may share an address with
    /// each other and with the public.
    pub fn exempt(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        // Not `expect`: this runs in a drop too, where a panic while unwinding would abort.
        let mut held = self.clients.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = held.get_mut(&client) {
            entry.connections -= 1;
            if entry.connections == 0 {
                held.remove(&client);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.exempt();
        self.clients.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client an address belongs to: IPv4 as itself (an IPv4-mapped IPv6 address too), IPv6
/// by its first `prefix` bits.
fn client_of(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
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
        let clients = Clients::new(2, 64);
        let a = clients.admit(ip("192.0.2.1")).unwrap();
        let b = clients.admit(ip("::ffff:192.0.2.1")).unwrap();
        assert_eq!(
            clients.admit(ip("192.0.2.1")).err(),
            Some(Refused { first: true }),
            "a mapped address is the same client"
        );
        assert_eq!(
            clients.admit(ip("192.0.2.1")).err(),
            Some(Refused { first: false }),
            "one refusal worth reporting while the client stays at its most"
        );
        let other = clients.admit(ip("192.0.2.2"));
        assert!(other.is_ok(), "another client has its own share");
        assert_eq!(
            clients.stats(),
            ConnectionStats {
                open: 3,
                refused: 2
            }
        );
        drop(a);
        let c = clients.admit(ip("192.0.2.1"));
        assert!(c.is_ok(), "a connection that ended gives its slot back");
        assert_eq!(
            clients.admit(ip("192.0.2.1")).err(),
            Some(Refused { first: false }),
            "churning at its cap: not reported again"
        );
        drop((b, c));
        let d = clients.admit(ip("192.0.2.1")).unwrap();
        let e = clients.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(
            clients.admit(ip("192.0.2.1")).err(),
            Some(Refused { first: true }),
            "back after holding nothing: reported again"
        );
        drop((d, e, other));
        assert_eq!(clients.stats().open, 0);
        assert!(clients.held.lock().unwrap().is_empty(), "nothing kept");
    }

    #[test]
    fn an_exempt_connection_stays_open_but_leaves_its_clients_share() {
        let clients = Clients::new(1, 64);
        let mut node = clients.admit(ip("192.0.2.1")).unwrap();
        assert!(clients.admit(ip("192.0.2.1")).is_err());
        node.exempt();
        let operator = clients.admit(ip("192.0.2.1"));
        assert!(operator.is_ok(), "the exempt one no longer fills the share");
        assert_eq!(clients.stats().open, 2, "both are open");
        node.exempt();
        drop((node, operator));
        assert_eq!(clients.stats().open, 0);
        assert!(clients.held.lock().unwrap().is_empty(), "nothing kept");
    }

    #[test]
    fn ipv6_clients_are_their_prefix_and_no_cap_means_none() {
        let by_64 = Clients::new(1, 64);
        let _one = by_64.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(by_64.admit(ip("2001:db8:1:2:ffff::9")).is_err());
        assert!(by_64.admit(ip("2001:db8:1:3::1")).is_ok());
        let by_address = Clients::new(1, 128);
        let _one = by_address.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(by_address.admit(ip("2001:db8:1:2::1")).is_err());
        assert!(by_address.admit(ip("2001:db8:1:2::2")).is_ok());
        let open = Clients::new(0, 64);
        let kept: Vec<Slot> = (0..100)
            .map(|_| open.admit(ip("192.0.2.1")).unwrap())
            .collect();
        assert_eq!(open.stats().open, 100);
        drop(kept);
    }
}
