//! Just enough SQL lexing to cut one statement out of a simple-query string:
//! `pg_prepared_statements.statement` holds the whole string a SQL `PREPARE`
//! came in (`DEALLOCATE a; PREPARE b AS …`), and a session move must
//! re-create `b` without running the rest.

/// The statements of a query string, split at the semicolons outside
/// quotes, dollar quotes and comments; trimmed, empty ones left out.
pub fn statements(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        i = match b[i] {
            b';' => {
                push_trimmed(&mut out, &text[start..i]);
                start = i + 1;
                i + 1
            }
            b'\'' => {
                // E'…' strings take backslash escapes.
                let escapes =
                    i > 0 && matches!(b[i - 1], b'e' | b'E') && (i < 2 || !is_ident_byte(b[i - 2]));
                skip_quoted(b, i, b'\'', escapes)
            }
            b'"' => skip_quoted(b, i, b'"', false),
            b'-' if b.get(i + 1) == Some(&b'-') => b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |n| i + n + 1),
            b'/' if b.get(i + 1) == Some(&b'*') => skip_block_comment(b, i),
            b'$' if i == 0 || !is_ident_byte(b[i - 1]) => skip_dollar_quoted(b, i),
            _ => i + 1,
        };
    }
    push_trimmed(&mut out, &text[start.min(text.len())..]);
    out
}

/// What re-creates the statement `name` that `text` prepared: its last
/// `PREPARE name …` (a string may prepare, deallocate and prepare a name
/// again), after the `SET`/`RESET` statements before it in `text` (they
/// may decide how it is parsed, e.g. `search_path`). Nothing else in
/// `text` runs again: not the other PREPAREs or DEALLOCATEs, which would
/// change other statements, nor writes or transaction control. `None` if
/// `text` has no such PREPARE.
pub(crate) fn prepare_replay(text: &str, name: &str) -> Option<String> {
    let stmts = statements(text);
    let at = stmts
        .iter()
        .rposition(|s| prepared_name(s).as_deref() == Some(name))?;
    let mut keep: Vec<&str> = stmts[..at]
        .iter()
        .filter(|s| is_setting(s))
        .copied()
        .collect();
    keep.push(stmts[at]);
    Some(keep.join(";\n"))
}

/// `SET …` or `RESET …`, but not `SET TRANSACTION …`, which fails once the
/// replay's transaction has run a statement.
fn is_setting(stmt: &str) -> bool {
    match first_words(stmt, 2).as_slice() {
        [set, next, ..] if set == "set" => next != "transaction",
        [w, ..] => w == "set" || w == "reset",
        [] => false,
    }
}

/// The first word of a statement, lower case.
fn first_word(stmt: &str) -> Option<String> {
    first_words(stmt, 1).pop()
}

/// Up to `n` leading words of a statement, lower case.
fn first_words(stmt: &str, n: usize) -> Vec<String> {
    let b = stmt.as_bytes();
    let mut words = Vec::new();
    let mut at = skip_space(b, 0);
    while words.len() < n {
        let len = b[at..]
            .iter()
            .take_while(|c| c.is_ascii_alphabetic())
            .count();
        if len == 0 {
            break;
        }
        words.push(stmt[at..at + len].to_ascii_lowercase());
        at = skip_space(b, at + len);
    }
    words
}

/// The name a `PREPARE` statement gives, as the server stores it (unquoted
/// names folded to lower case).
fn prepared_name(stmt: &str) -> Option<String> {
    if first_word(stmt)?.as_str() != "prepare" {
        return None;
    }
    let b = stmt.as_bytes();
    let at = skip_space(b, skip_space(b, 0) + "prepare".len());
    match b.get(at)? {
        b'"' => {
            let end = skip_quoted(b, at, b'"', false);
            let inner = stmt.get(at + 1..end.checked_sub(1)?)?;
            Some(inner.replace("\"\"", "\""))
        }
        &c if is_ident_byte(c) && !c.is_ascii_digit() && c != b'$' => {
            let len = b[at..].iter().take_while(|&&c| is_ident_byte(c)).count();
            Some(stmt[at..at + len].to_ascii_lowercase())
        }
        _ => None,
    }
}

fn push_trimmed<'a>(out: &mut Vec<&'a str>, s: &'a str) {
    let s = s.trim();
    if !s.is_empty() {
        out.push(s);
    }
}

/// Letters, digits, `_`, `$` and every non-ASCII byte (UTF-8 never puts an
/// ASCII byte inside a multi-byte character).
fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// Past the closing `quote` of the quoted text starting at `i` (a doubled
/// quote is part of the text); the end of `b` if it is not closed.
fn skip_quoted(b: &[u8], i: usize, quote: u8, escapes: bool) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' if escapes => j += 2,
            c if c == quote => {
                if b.get(j + 1) == Some(&quote) {
                    j += 2;
                } else {
                    return j + 1;
                }
            }
            _ => j += 1,
        }
    }
    b.len()
}

/// Past the end of the `/* … */` comment starting at `i` (they nest).
fn skip_block_comment(b: &[u8], i: usize) -> usize {
    let (mut depth, mut j) = (0usize, i);
    while j < b.len() {
        if b[j..].starts_with(b"/*") {
            depth += 1;
            j += 2;
        } else if b[j..].starts_with(b"*/") {
            depth -= 1;
            j += 2;
            if depth == 0 {
                return j;
            }
        } else {
            j += 1;
        }
    }
    b.len()
}

/// Past the `$tag$ … $tag$` text starting at `i`; just past the `$` when it
/// starts none (a parameter such as `$1`).
fn skip_dollar_quoted(b: &[u8], i: usize) -> usize {
    let tag_len = b[i + 1..]
        .iter()
        .take_while(|&&c| is_ident_byte(c) && c != b'$')
        .count();
    let opens =
        b.get(i + 1 + tag_len) == Some(&b'$') && !b.get(i + 1).is_some_and(|c| c.is_ascii_digit());
    if !opens {
        return i + 1;
    }
    let tag = &b[i..i + tag_len + 2];
    let body = i + tag.len();
    b[body..]
        .windows(tag.len())
        .position(|w| w == tag)
        .map_or(b.len(), |n| body + n + tag.len())
}

/// Past the white space and comments starting at `i`.
fn skip_space(b: &[u8], mut i: usize) -> usize {
    loop {
        match b.get(i) {
            Some(c) if c.is_ascii_whitespace() => i += 1,
            Some(b'-') if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |n| i + n + 1)
            }
            Some(b'/') if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i),
            _ => return i,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_outside_quotes_comments_and_dollar_quotes() {
        let text = "DEALLOCATE a; PREPARE b AS SELECT 'x;y', \"c;d\", E'\\';', $$;$$, $f$ a;$$ $f$ \
                    -- c;\n /* x; /* y; */ z; */ ; ;PREPARE c(int) AS SELECT $1";
        assert_eq!(
            statements(text),
            vec![
                "DEALLOCATE a",
                "PREPARE b AS SELECT 'x;y', \"c;d\", E'\\';', $$;$$, $f$ a;$$ $f$ \
                 -- c;\n /* x; /* y; */ z; */",
                "PREPARE c(int) AS SELECT $1",
            ]
        );
        // Unclosed quotes run to the end instead of panicking.
        assert_eq!(statements("SELECT 'a; b"), vec!["SELECT 'a; b"]);
        assert_eq!(statements("SELECT $x$ a; b"), vec!["SELECT $x$ a; b"]);
        assert_eq!(statements("/* a; "), vec!["/* a;"]);
        assert!(statements(" ; ").is_empty());
    }

    #[test]
    fn replays_the_last_prepare_of_a_name_after_the_settings_before_it() {
        let text = "SET search_path = s; PREPARE a AS SELECT 1; DEALLOCATE a; INSERT INTO t VALUES (1); \
                    SET TRANSACTION READ WRITE; SET\tlocal work_mem = '1MB'; \
                    /* again */ prepare A (int) AS SELECT $1; reset ALL; \
                    PREPARE \"Mixed\"\"q\" AS SELECT 3; PREPARE a1 AS SELECT 4; SET x = 1";
        assert_eq!(
            prepare_replay(text, "a").as_deref(),
            Some(
                "SET search_path = s;\nSET\tlocal work_mem = '1MB';\n/* again */ prepare A (int) AS SELECT $1"
            )
        );
        assert_eq!(
            prepare_replay(text, "Mixed\"q").as_deref(),
            Some(
                "SET search_path = s;\nSET\tlocal work_mem = '1MB';\nreset ALL;\nPREPARE \"Mixed\"\"q\" AS SELECT 3"
            )
        );
        assert_eq!(
            prepare_replay(text, "a1").as_deref(),
            Some(
                "SET search_path = s;\nSET\tlocal work_mem = '1MB';\nreset ALL;\nPREPARE a1 AS SELECT 4"
            )
        );
        assert_eq!(prepare_replay(text, "mixed\"q"), None);
        assert_eq!(prepare_replay("PREPAREx a AS SELECT 1", "a"), None);
        assert_eq!(prepare_replay("PREPARE", "a"), None);
        assert_eq!(prepare_replay("PREPARE \"a", "a"), None);
        assert_eq!(prepare_replay("", "a"), None);
    }
}
