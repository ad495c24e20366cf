//! Configuration parameters: a dump from a newer pg_dump sets parameters an
//! older target lacks (pg_dump 17+ writes `SET transaction_timeout = 0;`,
//! unknown before 17), so such lines are left out when the dump is restored.

use std::collections::HashSet;

use super::{Probe, Version};

/// The parameters the server knows.
pub(crate) const KNOWN_SETTINGS_SQL: &str = "SELECT name::text FROM pg_settings";

/// The parameter a dump line sets, for the forms pg_dump writes at the top
/// level: `SET name = value;` and `SELECT pg_catalog.set_config('name', …);`.
fn set_parameter(line: &str) -> Option<&str> {
    let name = if let Some(rest) = line.strip_prefix("SET ") {
        let (name, value) = rest.split_once(" = ").or_else(|| rest.split_once(" TO "))?;
        value.ends_with(';').then_some(name)?
    } else {
        let rest = line.strip_prefix("SELECT pg_catalog.set_config('")?;
        rest.split_once('\'')?.0
    };
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    // Dotted (extension) parameters are placeholders any server accepts.
    plain.then_some(name)
}

/// `dump` without the lines that set a parameter not in `known`, and the
/// names of those parameters (in order, each once).
pub(crate) fn drop_unknown_settings(
    dump: &[u8],
    known: &HashSet<String>,
) -> (Vec<u8>, Vec<String>) {
    let mut out = Vec::with_capacity(dump.len());
    let mut dropped: Vec<String> = Vec::new();
    for line in dump.split_inclusive(|&b| b == b'\n') {
        let text = std::str::from_utf8(line).unwrap_or("");
        let unknown = set_parameter(text.trim_end_matches(['\n', '\r']))
            .filter(|name| !known.contains(*name));
        match unknown {
            Some(name) => {
                if !dropped.iter().any(|d| d == name) {
                    dropped.push(name.to_string());
                }
            }
            None => out.extend_from_slice(line),
        }
    }
    (out, dropped)
}

pub fn probes(_v: Version) -> Vec<Probe> {
    vec![Probe::new("settings.known", KNOWN_SETTINGS_SQL)]
}

/// The `extra_float_digits` under which two servers print equal float
/// values as equal text. From 12 any positive value prints the shortest
/// exact form; 11 prints exactly only with 3, as 17 digits, which 12+ cannot
/// print: a pair with an 11 compares both sides rounded to 15 digits.
pub fn comparable_float_digits(a: Version, b: Version) -> i32 {
    if a.at_least(12) && b.at_least(12) {
        3
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_settings_are_left_out() {
        let known: HashSet<String> = ["statement_timeout", "search_path", "lock_timeout"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let dump = b"SET statement_timeout = 0;\nSET transaction_timeout = 0;\n\
SELECT pg_catalog.set_config('search_path', '', false);\n\
SELECT pg_catalog.set_config('made_up', '', false);\n\
SET myext.flag = on;\nCREATE TABLE t (a int);\n  SET transaction_timeout = 0;\n\
SET transaction_timeout = 5;\n";
        let (out, dropped) = drop_unknown_settings(dump, &known);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "SET statement_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);\n\
SET myext.flag = on;\nCREATE TABLE t (a int);\n  SET transaction_timeout = 0;\n"
        );
        assert_eq!(dropped, vec!["transaction_timeout", "made_up"]);
    }

    #[test]
    fn floats_compare_exactly_only_between_12_and_newer() {
        let v = Version::major_release;
        assert_eq!(comparable_float_digits(v(12), v(18)), 3);
        assert_eq!(comparable_float_digits(v(15), v(15)), 3);
        assert_eq!(comparable_float_digits(v(11), v(18)), 0);
        assert_eq!(comparable_float_digits(v(18), v(11)), 0);
    }
}
