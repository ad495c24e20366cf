//! The report as a checklist table for a terminal, or as a JSON document.

use std::fmt::Write;

use super::{Status, ValidationReport};
use crate::config::MigrationMode;

/// Pretty-printed JSON: `{migration, mode, source, target, summary, checks: […]}`.
pub(crate) fn render_json(report: &ValidationReport) -> String {
    // Plain data with string keys: serialization cannot fail.
    serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// An aligned table: status, check, scope, what was found; the corrective
/// action under every row that is not Succeeded. `color` adds ANSI colours
/// to the status words (only for a terminal).
pub(crate) fn render_table(report: &ValidationReport, color: bool) -> String {
    let mode = match report.mode {
        MigrationMode::Online => "online",
        MigrationMode::Offline => "offline",
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Premigration validation of migration {} ({mode}): source {}, target {}\n",
        report.migration, report.source, report.target
    );
    let w_status = "Succeeded".len();
    let w_name = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .chain(["CHECK".len()])
        .max()
        .unwrap_or(5);
    let w_scope = report
        .checks
        .iter()
        .map(|c| c.scope.chars().count())
        .chain(["SCOPE".len()])
        .max()
        .unwrap_or(5);
    let _ = writeln!(
        out,
        "{:w_status$}  {:w_name$}  {:w_scope$}  FOUND",
        "STATUS", "CHECK", "SCOPE"
    );
    let indent = " ".repeat(w_status + 2);
    for c in &report.checks {
        let status = paint(c.status, &format!("{:w_status$}", c.status.as_str()), color);
        let scope_pad = w_scope.saturating_sub(c.scope.chars().count());
        let _ = writeln!(
            out,
            "{status}  {:w_name$}  {}{}  {}",
            c.name,
            c.scope,
            " ".repeat(scope_pad),
            c.found
        );
        if c.status != Status::Succeeded
            && let Some(action) = &c.action
        {
            let mut lines = action.lines();
            if let Some(first) = lines.next() {
                let _ = writeln!(out, "{indent}action: {first}");
            }
            for l in lines {
                let _ = writeln!(out, "{indent}        {l}");
            }
        }
    }
    let s = &report.summary;
    let verdict = if s.failed > 0 {
        "the migration cannot start until the failed checks are fixed"
    } else if s.warning > 0 {
        "the migration can start; read the warnings"
    } else {
        "the migration can start"
    };
    let _ = writeln!(
        out,
        "\n{} checks: {} succeeded, {} warning(s), {} failed — {verdict}",
        s.total, s.succeeded, s.warning, s.failed
    );
    out
}

fn paint(status: Status, text: &str, color: bool) -> String {
    if !color {
        return text.to_string();
    }
    let code = match status {
        Status::Succeeded => "32",
        Status::Warning => "33",
        Status::Failed => "1;31",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

#[cfg(test)]
mod tests {
    use super::super::{Check, Summary};
    use super::*;

    fn report() -> ValidationReport {
        ValidationReport {
            migration: "m1".into(),
            mode: MigrationMode::Online,
            source: "127.0.0.1:1/postgres".into(),
            target: "127.0.0.1:2/postgres".into(),
            summary: Summary {
                succeeded: 1,
                warning: 0,
                failed: 1,
                total: 2,
            },
            checks: vec![
                Check::succeeded("connection", "source", "ok"),
                Check::failed(
                    "wal_level",
                    "source",
                    "wal_level = replica",
                    "line one\nline two",
                ),
            ],
        }
    }

    #[test]
    fn table_aligns_and_shows_actions() {
        let t = render_table(&report(), false);
        let lines: Vec<&str> = t.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("STATUS")).unwrap();
        let col = lines[header].find("FOUND").unwrap();
        assert_eq!(lines[header + 1].find("ok"), Some(col), "{t}");
        assert_eq!(
            lines[header + 2].find("wal_level = replica"),
            Some(col),
            "{t}"
        );
        assert!(
            lines[header + 3]
                .trim_start()
                .starts_with("action: line one"),
            "{t}"
        );
        assert!(lines[header + 4].ends_with("line two"), "{t}");
        assert!(t.contains("1 failed"), "{t}");
    }

    #[test]
    fn json_has_summary_and_checks() {
        let v: serde_json::Value = serde_json::from_str(&render_json(&report())).unwrap();
        assert_eq!(v["summary"]["failed"], 1);
        assert_eq!(v["checks"][1]["status"], "Failed");
        assert_eq!(v["mode"], "online");
        assert!(v["checks"][0]["action"].is_null());
    }
}
