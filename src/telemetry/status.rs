//! The status board behind `GET /status`: each part registers a provider that
//! renders its current state as JSON when asked, so /status always shows live
//! numbers without parts pushing updates.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};

/// Something that can describe its current state.
pub trait Report: Send + Sync {
    fn report(&self) -> Value;
}

impl<F: Fn() -> Value + Send + Sync> Report for F {
    fn report(&self) -> Value {
        self()
    }
}

#[derive(Default)]
pub struct StatusBoard {
    /// Merged into the top level of the document (keys of their object).
    top: RwLock<BTreeMap<String, Arc<dyn Report>>>,
    /// Shown under their own key.
    sections: RwLock<BTreeMap<String, Arc<dyn Report>>>,
}

impl StatusBoard {
    /// Registers (or replaces) a provider whose object's keys appear at
    /// the top level; `key` names it for replacing (e.g. the migration's
    /// own view while this member leads, the fleet's copy while it follows).
    pub(crate) fn register_top(&self, key: &str, r: Arc<dyn Report>) {
        self.top
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), r);
    }

    /// Registers (or replaces) the provider shown under `key`.
    pub fn register(&self, key: &str, r: Arc<dyn Report>) {
        self.sections
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), r);
    }

    /// The whole document.
    pub fn render(&self) -> Value {
        let mut doc = Map::new();
        for r in self.top.read().unwrap_or_else(|e| e.into_inner()).values() {
            if let Value::Object(m) = r.report() {
                doc.extend(m);
            }
        }
        for (k, r) in self
            .sections
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            doc.insert(k.clone(), r.report());
        }
        Value::Object(doc)
    }
}

/// Keys whose text values `/status` shows without the admin token: names
/// of states and phases, ids and LSNs. Any other text (errors and reasons,
/// which may name hosts and users; fence records; table lists) is left out.
const PUBLIC_TEXT: &[&str] = &[
    "migration",
    "mode",
    "option",
    "state",
    "substate",
    "phase",
    "outcome",
    "route",
    "error_kind",
    "next_attempt_at",
    "id",
    "kind",
    "received_lsn",
    "applied_lsn",
    "source_lsn",
    "consistent_point",
    "role",
    "version",
    "started_at",
];

/// The document without addresses, user names or free text: numbers,
/// flags and the states above stay, so state and lag remain visible.
pub(crate) fn redact(doc: &Value) -> Value {
    let mut v = redact_value(doc);
    if let Value::Object(m) = &mut v {
        m.insert("redacted".into(), Value::Bool(true));
    }
    v
}

fn redact_value(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, x)| !x.is_string() || PUBLIC_TEXT.contains(&k.as_str()))
                .map(|(k, x)| (k.clone(), redact_value(x)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|x| !x.is_string())
                .map(redact_value)
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merges_top_and_sections() {
        let b = StatusBoard::default();
        b.register_top(
            "m",
            Arc::new(|| json!({"state": "InProgress", "substate": "MigratingData"})),
        );
        b.register("proxy", Arc::new(|| json!({"sessions": 3})));
        let d = b.render();
        assert_eq!(d["state"], "InProgress");
        assert_eq!(d["proxy"]["sessions"], 3);
    }

    #[test]
    fn redact_keeps_state_and_lag_only() {
        let doc = json!({"state": "InProgress", "reason": "cannot connect to 10.0.0.5:5432 as admin",
            "databases": {"app": {"phase": "streaming", "last_error": "user \"admin\" at 10.0.0.5",
                                  "stream": {"lag_bytes": 10, "state": "streaming", "last_error": "10.0.0.5"}}},
            "last_cutover": {"id": "c1", "outcome": "aborted", "reason": "x", "fence": {"roles": ["admin"]},
                             "phases": [{"phase": "fence", "seconds": 0.1, "outcome": "ok", "detail": "admin"}]}});
        let r = redact(&doc);
        let text = r.to_string();
        assert!(
            !text.contains("10.0.0.5") && !text.contains("admin"),
            "{text}"
        );
        assert_eq!(r["state"], "InProgress");
        assert_eq!(r["databases"]["app"]["stream"]["lag_bytes"], 10);
        assert_eq!(r["last_cutover"]["phases"][0]["phase"], "fence");
        assert_eq!(r["redacted"], true);
    }
}
