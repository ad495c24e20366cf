//! The route: which server new backend connections go to. Sessions read it
//! only at a transaction boundary, so swapping it (cutover) never splits a
//! transaction between two servers.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::sessions::Registry;
use crate::config::{Endpoint, SslMode};

/// A server sessions connect to (the database is the one each client asked for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// "source" or "target": for logs, the registry and metrics.
    pub name: String,
    pub host: String,
    pub port: u16,
    pub sslmode: SslMode,
    /// Root certificate for sslmode=verify-ca / verify-full.
    pub sslrootcert: Option<std::path::PathBuf>,
}

impl Route {
    pub fn from_endpoint(name: &str, ep: &Endpoint) -> Route {
        Route {
            name: name.to_string(),
            host: ep.host.clone(),
            port: ep.port,
            sslmode: ep.sslmode,
            sslrootcert: ep.sslrootcert.clone(),
        }
    }
}

/// Holds the current route; every swap wakes idle sessions so they move.
pub struct Router {
    current: ArcSwap<Route>,
    sessions: Arc<Registry>,
}

impl Router {
    pub(crate) fn new(initial: Route, sessions: Arc<Registry>) -> Router {
        Router {
            current: ArcSwap::from_pointee(initial),
            sessions,
        }
    }

    /// The route new backends use now.
    pub fn current(&self) -> Arc<Route> {
        self.current.load_full()
    }

    /// Is `r` the current route (the very same swap generation)?
    pub(crate) fn is_current(&self, r: &Arc<Route>) -> bool {
        Arc::ptr_eq(&self.current.load(), r)
    }

    /// Points new backends at `route`; idle sessions move at their next chance
    /// (immediately when the gate is open, else when it opens). Returns the old route.
    pub fn swap(&self, route: Route) -> Arc<Route> {
        tracing::info!(route = %route.name, host = %route.host, port = route.port, "proxy route swapped");
        let old = self.current.swap(Arc::new(route));
        self.sessions.wake_all();
        old
    }
}
