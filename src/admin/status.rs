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
    top: RwLock<Vec<Arc<dyn Report>>>,
    /// Shown under their own key.
    sections: RwLock<BTreeMap<String, Arc<dyn Report>>>,
}

impl StatusBoard {
    /// Registers a provider whose object's keys appear at the top level.
    pub fn register_top(&self, r: Arc<dyn Report>) {
        self.top.write().unwrap_or_else(|e| e.into_inner()).push(r);
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
        for r in self.top.read().unwrap_or_else(|e| e.into_inner()).iter() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merges_top_and_sections() {
        let b = StatusBoard::default();
        b.register_top(Arc::new(
            || json!({"state": "InProgress", "substate": "MigratingData"}),
        ));
        b.register("proxy", Arc::new(|| json!({"sessions": 3})));
        let d = b.render();
        assert_eq!(d["state"], "InProgress");
        assert_eq!(d["proxy"]["sessions"], 3);
    }
}
