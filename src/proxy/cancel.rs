//! CancelRequest: the client names the proxy-issued key; the proxy forwards a
//! cancel for the real backend the session talks to right now.

use std::sync::Arc;

use super::Shared;
use super::backend::connect_options;

pub(crate) async fn forward(shared: Arc<Shared>, pid: i32, secret: i32) {
    let Some(session) = shared.sessions.lookup_cancel(pid, secret) else {
        // As PostgreSQL does: no answer, just a log line.
        tracing::debug!(pid, "cancel request for an unknown session key");
        shared.metrics.error("cancel");
        return;
    };
    let b = session.backend();
    let opts = connect_options(&shared, &b.route);
    if let Err(e) = crate::wire::connect::send_cancel(&opts, b.pid, b.secret).await {
        tracing::warn!(session = session.id, "cannot forward cancel request: {e}");
        shared.metrics.error("cancel");
    }
}
