//! Errors a client sees name the problem and an incident id; the detail
//! (server addresses, the underlying error) goes only to pgshift's log,
//! under the same id, so an operator can find it and a client learns
//! nothing about the servers behind the proxy.

use std::fmt::Display;

/// A fresh incident id: 8 hex digits.
fn new_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Logs `what` with its `detail` under a new id (as a warning) and returns
/// the text for the client: `what` and the id.
pub(crate) fn report(session: Option<u64>, what: &str, detail: &dyn Display) -> String {
    let id = new_id();
    match session {
        Some(s) => tracing::warn!(incident = %id, session = s, "{what}: {detail}"),
        None => tracing::warn!(incident = %id, "{what}: {detail}"),
    }
    format!("{what} (pgshift incident {id}: the details are in pgshift's log)")
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_text_has_id_not_detail() {
        let t = super::report(None, "cannot connect", &"10.0.0.1:5432 refused");
        assert!(t.starts_with("cannot connect (pgshift incident "), "{t}");
        assert!(!t.contains("10.0.0.1"), "{t}");
    }
}
