//! Opening a backend connection for a session on the current route: same
//! user, database and startup parameters, with the user's stored password.

use std::sync::Arc;

use super::Shared;
use super::route::Route;
use crate::wire::{ConnectOptions, ServerConnection, WireError};

/// How to reach the server of `route`.
pub(crate) fn connect_options(shared: &Shared, route: &Route) -> ConnectOptions {
    ConnectOptions {
        host: route.host.clone(),
        port: route.port,
        sslmode: route.sslmode,
        connect_timeout: shared.limits.connect_timeout,
        max_message_size: shared.limits.max_message_size,
        tls: None,
        sslrootcert: route.sslrootcert.clone(),
    }
}

/// Connects and authenticates a backend for a session.
pub(crate) async fn open(
    shared: &Shared,
    route: &Arc<Route>,
    startup: &[(String, String)],
    user: &str,
) -> Result<ServerConnection, WireError> {
    let password = shared.users.server_password(user);
    let opts = connect_options(shared, route);
    ServerConnection::connect(&opts, startup, password.as_ref().map(|p| p.expose())).await
}
