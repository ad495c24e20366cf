//! TOML errors as the operator needs them: line, column, key and reason,
//! never the text of the line (a literal password may be on it), and
//! without the value serde quotes in its reason.

/// A TOML error as position, key and reason, never the line's text (a
/// literal password may be on it); quoted values in the reason are elided.
pub(super) fn message(text: &str, e: &toml::de::Error) -> String {
    let reason = elide_quoted(e.message().trim_end());
    let Some(span) = e.span() else {
        return reason;
    };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or("");
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    match key_at(text, line_start) {
        Some(k) => format!("line {line_no}, column {column} (key `{k}`): {reason}"),
        None => format!("line {line_no}, column {column}: {reason}"),
    }
}

/// The dotted key written on the line starting at `line_start`, prefixed
/// with the table it is in; None when the line is no plain `key = value`.
fn key_at(text: &str, line_start: usize) -> Option<String> {
    let is_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
    };
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    if let Some(h) = line.strip_prefix('[') {
        let h = h.trim_start_matches('[');
        let h = h.split(']').next().unwrap_or("").trim();
        return is_key(h).then(|| h.to_string());
    }
    let k = line.split_once('=')?.0.trim();
    if !is_key(k) {
        return None;
    }
    let table = text[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.starts_with('[')
            .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    });
    Some(match table {
        Some(t) if is_key(&t) => format!("{t}.{k}"),
        _ => k.to_string(),
    })
}

/// Replaces every `"…"` in `s` with `"…"`, and in serde's "invalid type" /
/// "invalid value" messages the first `` `…` `` too: they quote the
/// offending value (a misplaced password, maybe).
fn elide_quoted(s: &str) -> String {
    let s = match s.split_once(": ") {
        Some((head @ ("invalid type" | "invalid value"), rest)) => match rest.split_once('`') {
            Some((before, after)) => match after.split_once('`') {
                Some((_, tail)) => format!("{head}: {before}`…`{tail}"),
                None => s.to_string(),
            },
            None => s.to_string(),
        },
        _ => s.to_string(),
    };
    elide_double_quoted(&s)
}

fn elide_double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut inside = false;
    let mut escaped = false;
    for c in s.chars() {
        if inside {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    inside = false;
                    out.push_str("…\"");
                }
                _ => {}
            }
        } else {
            out.push(c);
            inside = c == '"';
        }
    }
    if inside {
        out.push_str("…\"");
    }
    out
}
