//! Who may enter, before authentication: connections still in startup or
//! authentication hold a startup slot, bounded in total
//! (`proxy.max_startup_connections`) and per client address
//! (`proxy.max_startup_connections_per_address`), never a place under
//! `max_client_connections`; so clients that never finish cannot lock out
//! real ones. And the startup packet's user and database must be names a
//! server could have; replication connections are not proxied.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

/// Where a client connects from: a TCP address, or the Unix-domain socket
/// (`proxy.unix_socket_dir`), which has no address worth naming — logs and
/// `/status` say "unix", and all its clients count as one address for the
/// per-address startup limit (they are processes on this host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    Tcp(SocketAddr),
    Unix,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

impl Peer {
    /// The key of the per-address startup limit: the IP address (None:
    /// the Unix socket).
    fn address(self) -> Option<IpAddr> {
        match self {
            // An IPv4 client on a dual-stack socket is one address, however written.
            Peer::Tcp(a) => Some(a.ip().to_canonical()),
            Peer::Unix => None,
        }
    }
}

/// PostgreSQL's NAMEDATALEN - 1: the longest user or database name.
pub(crate) const MAX_NAME_BYTES: usize = 63;

/// Why a connection got no startup slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    Total(usize),
    PerAddress(usize),
}

impl Full {
    /// The message for the client (53300).
    pub(crate) fn message(self) -> String {
        match self {
            Full::Total(n) => format!(
                "sorry, too many connections are still authenticating (proxy.max_startup_connections = {n})"
            ),
            Full::PerAddress(n) => format!(
                "sorry, too many connections from your address are still authenticating \
                 (proxy.max_startup_connections_per_address = {n})"
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_address: HashMap<Option<IpAddr>, usize>,
}

/// The startup slots.
#[derive(Debug)]
pub(crate) struct StartupSlots {
    max_total: usize,
    max_per_address: usize,
    counts: Mutex<Counts>,
}

impl StartupSlots {
    pub(crate) fn new(max_total: usize, max_per_address: usize) -> Arc<StartupSlots> {
        Arc::new(StartupSlots {
            max_total,
            max_per_address,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// A slot for a connection from `peer`, released when dropped.
    pub(crate) fn acquire(self: &Arc<Self>, peer: Peer) -> Result<StartupSlot, Full> {
        let ip = peer.address();
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.max_total {
            return Err(Full::Total(self.max_total));
        }
        let n = c.by_address.entry(ip).or_insert(0);
        if *n >= self.max_per_address {
            return Err(Full::PerAddress(self.max_per_address));
        }
        *n += 1;
        c.total += 1;
        Ok(StartupSlot {
            slots: self.clone(),
            ip,
        })
    }

    /// Connections in startup now.
    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// One connection in startup or authentication.
#[derive(Debug)]
pub(crate) struct StartupSlot {
    slots: Arc<StartupSlots>,
    ip: Option<IpAddr>,
}

impl Drop for StartupSlot {
    fn drop(&mut self) {
        let mut c = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(n) = c.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.by_address.remove(&self.ip);
            }
        }
    }
}

/// A startup packet the proxy refuses: SQLSTATE and message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub code: &'static str,
    pub message: String,
}

fn refuse(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

/// Checks a user or database name: `what` is "user" or "database".
fn check_name(what: &str, code: &'static str, name: &str) -> Result<(), Refusal> {
    if name.chars().any(char::is_control) {
        return Err(refuse(
            code,
            format!("invalid {what} name in startup packet: it contains a control character"),
        ));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(refuse(
            code,
            format!(
                "invalid {what} name in startup packet: it is {} bytes long, the limit is {MAX_NAME_BYTES}",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// The user and database a startup packet asks for, or why it is refused.
pub(crate) fn check_startup(params: &[(String, String)]) -> Result<(String, String), Refusal> {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if let Some(r) = get("replication")
        && !matches!(
            r.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        )
    {
        return Err(refuse(
            "28000",
            "pgshift's proxy does not accept replication connections; connect to the server directly",
        ));
    }
    let user = get("user").filter(|u| !u.is_empty()).ok_or_else(|| {
        refuse(
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
    })?;
    check_name("user", "28000", user)?;
    let database = get("database").filter(|d| !d.is_empty()).unwrap_or(user);
    check_name("database", "08P01", database)?;
    Ok((user.to_string(), database.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn startup_names() {
        assert_eq!(
            check_startup(&params(&[("user", "app")])).unwrap(),
            ("app".into(), "app".into())
        );
        assert_eq!(
            check_startup(&params(&[("user", "app"), ("database", "d")])).unwrap(),
            ("app".into(), "d".into())
        );
        assert_eq!(check_startup(&params(&[])).unwrap_err().code, "28000");
        let e = check_startup(&params(&[("user", "a\nb")])).unwrap_err();
        assert_eq!(e.code, "28000");
        assert!(!e.message.contains('\n'));
        let long = "x".repeat(64);
        assert_eq!(
            check_startup(&params(&[("user", &long)])).unwrap_err().code,
            "28000"
        );
        assert!(check_startup(&params(&[("user", &long[..63])])).is_ok());
        let e = check_startup(&params(&[("user", "a"), ("database", "d\r")])).unwrap_err();
        assert_eq!(e.code, "08P01");
    }

    #[test]
    fn replication_is_refused() {
        for v in ["database", "true", "on", "1", "yes", "TRUE"] {
            let e = check_startup(&params(&[("user", "a"), ("replication", v)])).unwrap_err();
            assert!(e.message.contains("replication"), "{v}");
        }
        for v in ["false", "off", "0", "no"] {
            assert!(check_startup(&params(&[("user", "a"), ("replication", v)])).is_ok());
        }
    }

    #[test]
    fn slots_per_address_and_total() {
        let s = StartupSlots::new(3, 2);
        let a = Peer::Tcp("127.0.0.2:5000".parse().unwrap());
        let b = Peer::Tcp("127.0.0.3:5000".parse().unwrap());
        let a1 = s.acquire(a).unwrap();
        let _a2 = s.acquire(a).unwrap();
        assert_eq!(s.acquire(a).unwrap_err(), Full::PerAddress(2));
        let _b1 = s.acquire(b).unwrap();
        assert_eq!(s.acquire(b).unwrap_err(), Full::Total(3));
        drop(a1);
        assert!(s.acquire(b).is_ok());
        assert_eq!(s.in_use(), 2);
    }

    #[test]
    fn unix_clients_are_one_address() {
        let s = StartupSlots::new(3, 1);
        let u1 = s.acquire(Peer::Unix).unwrap();
        assert_eq!(s.acquire(Peer::Unix).unwrap_err(), Full::PerAddress(1));
        let _t = s
            .acquire(Peer::Tcp("127.0.0.1:1".parse().unwrap()))
            .unwrap();
        drop(u1);
        assert!(s.acquire(Peer::Unix).is_ok());
        assert_eq!(Peer::Unix.to_string(), "unix");
    }
}
