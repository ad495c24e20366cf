//! Just enough SQL lexing to cut one statement out of a simple-query string:
//! `pg_prepared_statements.statement` holds the whole string a SQL `PREPARE`
//! came in (`DEALLOCATE a; PREPARE b AS …`), and a session move must
//! re-create `b` without running the rest. The lexing is `crate::sqltext`'s.

pub(crate) use crate::sqltext::statements;
use crate::sqltext::{first_words, is_ident_byte, skip_quoted, skip_space};

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

#[cfg(test)]
mod tests {
    use super::*;

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
