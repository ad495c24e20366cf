//! The CLI side of the admin API: `pgshift status`, `cutover`, `cancel` talk
//! to a running pgshift over HTTP. A minimal HTTP/1.0 client is enough for a
//! loopback or in-cluster admin port and keeps dependencies few.

use std::time::Duration;

use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("admin URL `{0}` is not valid: {1}")]
    BadUrl(String, String),
    #[error(
        "cannot reach pgshift's admin API at {url}: {source} (is `pgshift run` running? see --admin)"
    )]
    Connect { url: String, source: std::io::Error },
    #[error("admin API at {0} did not answer in time")]
    Timeout(String),
    #[error("admin API answered something that is not HTTP: {0}")]
    BadResponse(String),
    #[error("admin API refused: HTTP {status}: {message}")]
    Refused { status: u16, message: String },
}

/// Where the admin API is and how to authenticate.
#[derive(Clone, Debug)]
pub struct AdminClient {
    host: String,
    port: u16,
    base: String,
    token: Option<String>,
}

impl AdminClient {
    pub fn new(url: &str, token: Option<String>) -> Result<AdminClient, ClientError> {
        let with_scheme = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let u = url::Url::parse(&with_scheme)
            .map_err(|e| ClientError::BadUrl(url.into(), e.to_string()))?;
        if u.scheme() != "http" {
            return Err(ClientError::BadUrl(
                url.into(),
                "only http:// is supported".into(),
            ));
        }
        let host = u
            .host_str()
            .ok_or_else(|| ClientError::BadUrl(url.into(), "no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(AdminClient {
            port: u.port().unwrap_or(80),
            host,
            base: with_scheme.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// `GET path` → JSON.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request("GET", path).await
    }

    /// `POST path` → JSON.
    pub async fn post(&self, path: &str) -> Result<Value, ClientError> {
        self.request("POST", path).await
    }

    async fn request(&self, method: &str, path: &str) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let fut = async {
            let mut s = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|source| ClientError::Connect {
                    url: url.clone(),
                    source,
                })?;
            let auth = self
                .token
                .as_ref()
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            // HTTP/1.0: the server closes after the body, no chunked encoding.
            let req = format!(
                "{method} {path} HTTP/1.0\r\nHost: {}:{}\r\n{auth}Content-Length: 0\r\nAccept: application/json\r\n\r\n",
                self.host, self.port
            );
            let io = |source| ClientError::Connect {
                url: url.clone(),
                source,
            };
            s.write_all(req.as_bytes()).await.map_err(io)?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.map_err(io)?;
            parse_response(&buf)
        };
        // Cutover requests may take as long as the cutover's own timeouts.
        tokio::time::timeout(Duration::from_secs(120), fut)
            .await
            .map_err(|_| ClientError::Timeout(url.clone()))?
    }
}

fn parse_response(buf: &[u8]) -> Result<Value, ClientError> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::BadResponse("no header end".into()))?;
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::BadResponse(head.lines().next().unwrap_or("").to_string()))?;
    let value: Value =
        serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.trim().to_string()));
    if (200..300).contains(&status) {
        Ok(value)
    } else {
        let message = value
            .get("error")
            .and_then(|e| e.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        Err(ClientError::Refused { status, message })
    }
}

/// Renders the `/status` document as a table for a terminal.
pub fn render_status(doc: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if let Some(name) = doc.get("migration") {
        out.push_str(&format!(
            "migration  {}  ({} mode)\n",
            s(name),
            s(&doc["mode"])
        ));
    }
    if doc.get("state").is_some() {
        out.push_str(&format!(
            "state      {} / {}\n",
            s(&doc["state"]),
            s(&doc["substate"])
        ));
        if let Some(r) = doc.get("reason").filter(|r| !r.is_null()) {
            out.push_str(&format!("reason     {}\n", s(r)));
        }
    }
    if let Some(dbs) = doc.get("databases").and_then(|d| d.as_object()) {
        out.push_str(&format!(
            "\n{:<20} {:<14} {:>14} {:>12} {:>10} {:>12}  {}\n",
            "DATABASE", "PHASE", "COPY TABLES", "COPY ROWS", "LAG", "LAG SECONDS", "LAST ERROR"
        ));
        for (name, d) in dbs {
            let copy = &d["copy"];
            let tables = match (copy.get("tables_copied"), copy.get("tables_total")) {
                (Some(a), Some(b)) => format!("{}/{}", s(a), s(b)),
                _ => "-".into(),
            };
            let stream = &d["stream"];
            // A streaming database shows its stream's own state (retrying,
            // apply_stopped …) and error, not only the persisted phase.
            let phase = match stream.get("state").and_then(|x| x.as_str()) {
                Some(state) if d["phase"] == "streaming" && state != "streaming" => {
                    match stream.get("retries").and_then(|r| r.as_u64()) {
                        Some(n) if n > 0 => format!("{state} ({n})"),
                        _ => state.to_string(),
                    }
                }
                _ => s(&d["phase"]),
            };
            let error = stream
                .get("last_error")
                .filter(|e| !e.is_null())
                .or_else(|| d.get("last_error"))
                .unwrap_or(&Value::Null);
            out.push_str(&format!(
                "{:<20} {:<14} {:>14} {:>12} {:>10} {:>12}  {}\n",
                name,
                phase,
                tables,
                s(copy.get("rows").unwrap_or(&Value::Null)),
                stream
                    .get("lag_bytes")
                    .map(|b| human_bytes(b.as_f64().unwrap_or(0.0)))
                    .unwrap_or("-".into()),
                s(stream.get("lag_seconds").unwrap_or(&Value::Null)),
                s(error),
            ));
        }
    }
    if let Some(ddl) = doc.get("ddl").filter(|d| !d.is_null()) {
        // Schema changes replicated (or stopped on), per database.
        if let Some(counts) = ddl.get("commands").and_then(|c| c.as_object())
            && !counts.is_empty()
        {
            out.push_str("\nddl       ");
            let parts: Vec<String> = counts
                .iter()
                .map(|(db, c)| {
                    let n: Vec<String> = c
                        .as_object()
                        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect())
                        .unwrap_or_default();
                    format!("{db}: {}", n.join(" "))
                })
                .collect();
            out.push_str(&parts.join("  "));
            out.push('\n');
        }
        for stop in ddl
            .get("stopped")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
        {
            out.push_str(&format!(
                "ddl stopped  {}: {} (pgshift ddl retry|skip|apply)\n",
                s(&stop["database"]),
                s(&stop["error"])
            ));
        }
    }
    if let Some(p) = doc.get("proxy").and_then(|p| p.as_object()) {
        out.push_str("\nproxy     ");
        let parts: Vec<String> = p
            .iter()
            .filter(|(_, v)| !v.is_object() && !v.is_array())
            .map(|(k, v)| format!("{k}={}", s(v)))
            .collect();
        out.push_str(&parts.join("  "));
        out.push('\n');
    }
    if let Some(f) = doc.get("fleet").filter(|f| f.is_object()) {
        render_fleet(&mut out, f, &s);
    }
    if doc.get("redacted") == Some(&Value::Bool(true)) {
        out.push_str(
            "\n(limited view without the admin token: errors, reasons, addresses and user names are left out; \
             pass --token or --config)\n",
        );
    }
    if let Some(c) = doc.get("last_cutover").filter(|c| !c.is_null()) {
        out.push_str(&format!(
            "\nlast cutover  {}  outcome={}  pause={}\n",
            s(&c["id"]),
            s(&c["outcome"]),
            c.get("pause_seconds")
                .map(|p| format!("{:.3}s", p.as_f64().unwrap_or(0.0)))
                .unwrap_or("-".into())
        ));
        if let Some(r) = c.get("reason").filter(|r| !r.is_null()) {
            out.push_str(&format!("  reason: {}\n", s(r)));
        }
        if let Some(phases) = c.get("phases").and_then(|p| p.as_array()) {
            for ph in phases {
                out.push_str(&format!(
                    "  {:<12} {:>9}  {}\n",
                    s(&ph["phase"]),
                    ph.get("seconds")
                        .map(|x| format!("{:.3}s", x.as_f64().unwrap_or(0.0)))
                        .unwrap_or("-".into()),
                    s(ph.get("outcome").unwrap_or(&Value::Null))
                ));
            }
        }
    }
    out
}

/// The fleet's members: one line each.
fn render_fleet(out: &mut String, f: &Value, s: &dyn Fn(&Value) -> String) {
    let me = f["member"].as_str().unwrap_or("");
    out.push_str(&format!(
        "\nfleet     this member {} ({}, role {})\n",
        if me.is_empty() { "-" } else { me },
        if f["leader"] == Value::Bool(true) {
            "leader"
        } else {
            "follower"
        },
        s(&f["role"])
    ));
    if let Some(h) = f.get("holding").filter(|h| !h.is_null()) {
        out.push_str(&format!(
            "          holding its clients for cutover {} ({:.1}s)\n",
            s(&h["attempt"]),
            h["seconds"].as_f64().unwrap_or(0.0)
        ));
    }
    let members = f["members"].as_array().cloned().unwrap_or_default();
    if members.is_empty() {
        return;
    }
    out.push_str(&format!(
        "{:<28} {:<12} {:<9} {:>8} {:>6} {:>10} {:<7} STATE\n",
        "MEMBER", "ROLE", "LEADS", "SESSIONS", "IN TX", "HEARTBEAT", "ROUTE"
    ));
    for m in members {
        let state = match (m["alive"].as_bool(), m["paused"].as_bool()) {
            (Some(false), _) => "gone",
            (_, Some(true)) => "paused",
            _ => "alive",
        };
        let line = format!(
            "{:<28} {:<12} {:<9} {:>8} {:>6} {:>9.1}s {:<7} {:<7}",
            s(&m["id"]),
            s(&m["role"]),
            if m["leader"] == Value::Bool(true) {
                "yes"
            } else {
                "-"
            },
            s(&m["sessions"]),
            s(&m["in_transaction"]),
            m["heartbeat_age_seconds"].as_f64().unwrap_or(0.0),
            s(&m["route"]),
            state
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// 1536 → "1.5 kB".
pub(crate) fn human_bytes(b: f64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", units[i])
    } else {
        format!("{v:.1} {}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_responses() {
        let ok =
            parse_response(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"a\":1}")
                .unwrap();
        assert_eq!(ok["a"], 1);
        let e =
            parse_response(b"HTTP/1.0 409 Conflict\r\n\r\n{\"error\":\"not now\"}").unwrap_err();
        assert!(
            matches!(e, ClientError::Refused { status: 409, ref message } if message == "not now")
        );
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn urls() {
        let c = AdminClient::new("127.0.0.1:9432", None).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 9432));
        assert!(AdminClient::new("https://x:1", None).is_err());
    }

    #[test]
    fn renders_status() {
        let doc = json!({"migration": "m", "mode": "online", "state": "WaitingForUserAction", "substate": "WaitingForCutoverTrigger",
            "databases": {"app": {"phase": "streaming", "copy": {"tables_copied": 3, "tables_total": 3, "rows": 1000},
                                   "stream": {"lag_bytes": 2048, "lag_seconds": 0.0}, "last_error": null}}});
        let t = render_status(&doc);
        assert!(
            t.contains("WaitingForUserAction / WaitingForCutoverTrigger"),
            "{t}"
        );
        assert!(t.contains("3/3") && t.contains("2.0 kB"), "{t}");
        assert_eq!(human_bytes(100.0), "100 B");
    }

    #[test]
    fn renders_the_fleet() {
        let doc = json!({"fleet": {"member": "b", "role": "auto", "leader": false,
            "holding": {"attempt": "c1", "seconds": 0.2},
            "members": [
                {"id": "a", "role": "auto", "leader": true, "sessions": 4, "in_transaction": 1,
                 "heartbeat_age_seconds": 0.3, "route": "source", "paused": false, "alive": true},
                {"id": "b", "role": "proxy", "leader": false, "sessions": 2, "in_transaction": 0,
                 "heartbeat_age_seconds": 0.1, "route": "source", "paused": true, "alive": true},
                {"id": "c", "role": "auto", "leader": false, "sessions": 0, "in_transaction": 0,
                 "heartbeat_age_seconds": 9.0, "route": "source", "paused": false, "alive": false}]}});
        let t = render_status(&doc);
        assert!(t.contains("this member b (follower, role auto)"), "{t}");
        assert!(t.contains("holding its clients for cutover c1"), "{t}");
        let line = |id: &str| {
            t.lines()
                .find(|l| l.starts_with(&format!("{id} ")))
                .unwrap_or_default()
                .to_string()
        };
        assert!(
            line("a").contains("yes") && line("a").ends_with("alive"),
            "{t}"
        );
        assert!(line("b").trim_end().ends_with("paused"), "{t}");
        assert!(line("c").trim_end().ends_with("gone"), "{t}");
    }

    #[test]
    fn renders_a_retrying_stream_with_its_error() {
        let doc = json!({"state": "InProgress", "substate": "MigratingData",
            "databases": {"app": {"phase": "streaming", "last_error": null,
                "stream": {"state": "apply_stopped", "retries": 3, "lag_bytes": 10, "lag_seconds": 4.0,
                           "last_error": "table t no longer matches the target"}}}});
        let t = render_status(&doc);
        assert!(t.contains("apply_stopped (3)"), "{t}");
        assert!(t.contains("table t no longer matches the target"), "{t}");
    }

    #[test]
    fn renders_ddl_counts_and_a_stop() {
        let doc = json!({"state": "WaitingForUserAction", "substate": "WaitingForCutoverTrigger",
            "ddl": {"commands": {"app": {"applied": 4, "failed": 1}},
                    "stopped": [{"database": "app", "id": "7.1", "error": "the target refused DDL 7.1"}]}});
        let t = render_status(&doc);
        assert!(t.contains("app: applied=4 failed=1"), "{t}");
        assert!(
            t.contains("ddl stopped  app: the target refused DDL 7.1"),
            "{t}"
        );
    }
}
