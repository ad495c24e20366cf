//! Just enough SQL lexing to cut statements out of a query string: quotes,
//! dollar quotes, comments, parentheses and the `BEGIN ATOMIC … END` bodies
//! of SQL-standard functions, as psql's scanner (src/fe_utils/psqlscan.l)
//! sees them; and which DDL command tag a statement has.
//!
//! Used by the proxy (re-creating prepared statements on a session move)
//! and by DDL replication, which receives the whole `current_query()` of
//! the transaction that ran a DDL command, its tag and how many earlier
//! firings of that tag the string had, and must replay that command alone.

/// A token of SQL text, as far as splitting and tagging need one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tok<'a> {
    /// An unquoted identifier or keyword, as written.
    Word(&'a str),
    Open,
    Close,
    Semi,
    /// Anything else: a string, quoted identifier, number, operator, …
    Other,
}

/// Calls `f` with each token of `text` and the offset it starts at; white
/// space and comments are skipped. Unclosed quotes and comments run to the
/// end of the text.
pub(crate) fn lex<'a>(text: &'a str, mut f: impl FnMut(Tok<'a>, usize)) {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let (tok, next) = match c {
            b';' => (Some(Tok::Semi), i + 1),
            b'(' => (Some(Tok::Open), i + 1),
            b')' => (Some(Tok::Close), i + 1),
            b'\'' => (Some(Tok::Other), skip_quoted(b, i, b'\'', false)),
            b'"' => (Some(Tok::Other), skip_quoted(b, i, b'"', false)),
            b'-' if b.get(i + 1) == Some(&b'-') => (None, skip_line(b, i)),
            b'/' if b.get(i + 1) == Some(&b'*') => (None, skip_block_comment(b, i)),
            // Words take in the `$` of an identifier such as `a$1`, so a
            // `$` here starts a dollar quote or a parameter.
            b'$' => (Some(Tok::Other), skip_dollar_quoted(b, i)),
            c if c.is_ascii_whitespace() => (None, i + 1),
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let len = b[i..].iter().take_while(|&&c| is_ident_byte(c)).count();
                if len == 1 && matches!(c, b'e' | b'E') && b.get(i + 1) == Some(&b'\'') {
                    // E'…' strings take backslash escapes.
                    (Some(Tok::Other), skip_quoted(b, i + 1, b'\'', true))
                } else {
                    (Some(Tok::Word(&text[i..i + len])), i + len)
                }
            }
            c if c.is_ascii_digit() => {
                let len = b[i..].iter().take_while(|&&c| is_ident_byte(c)).count();
                (Some(Tok::Other), i + len)
            }
            _ => (Some(Tok::Other), i + 1),
        };
        if let Some(tok) = tok {
            f(tok, i);
        }
        i = next;
    }
}

/// The statements of a query string, split at the semicolons outside
/// quotes, dollar quotes, comments, parentheses and the `BEGIN … END`
/// body of a `CREATE [OR REPLACE] FUNCTION|PROCEDURE` (as psql splits);
/// trimmed, empty ones left out.
pub(crate) fn statements(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut split = Split::default();
    lex(text, |tok, at| match tok {
        Tok::Semi if split.paren == 0 && split.begin == 0 => {
            push_trimmed(&mut out, &text[start..at]);
            start = at + 1;
            split = Split::default();
        }
        Tok::Open => split.paren += 1,
        Tok::Close => split.paren = split.paren.saturating_sub(1),
        Tok::Word(w) if split.paren == 0 => split.word(w),
        _ => {}
    });
    push_trimmed(&mut out, &text[start.min(text.len())..]);
    out
}

/// psql's state for one statement (psqlscan_track_identifier): the first
/// keywords tell whether it is `CREATE [OR REPLACE] FUNCTION|PROCEDURE`
/// (or such an element of `CREATE SCHEMA`), and only then do BEGIN, CASE
/// (inside a BEGIN) and END nest. Words inside parentheses are not seen.
#[derive(Default)]
struct Split {
    paren: usize,
    begin: usize,
    init: [u8; 4],
    init_count: usize,
    sub: [u8; 4],
    sub_count: usize,
}

impl Split {
    fn word(&mut self, w: &str) {
        record_keyword(&mut self.init, &mut self.init_count, w);
        let create_schema = self.init[0] == b'c' && self.init[1] == b's';
        if create_schema && self.begin == 0 {
            if w.eq_ignore_ascii_case("create") {
                self.sub = [0; 4];
                self.sub_count = 0;
            }
            record_keyword(&mut self.sub, &mut self.sub_count, w);
        }
        if is_create_routine(&self.init) || (create_schema && is_create_routine(&self.sub)) {
            if w.eq_ignore_ascii_case("begin") {
                self.begin += 1;
            } else if w.eq_ignore_ascii_case("case") {
                if self.begin >= 1 {
                    self.begin += 1;
                }
            } else if w.eq_ignore_ascii_case("end") {
                self.begin = self.begin.saturating_sub(1);
            }
        }
    }
}

/// Records the first letter of the first few words that matter to
/// [`is_create_routine`] (0 for any other word).
fn record_keyword(idents: &mut [u8; 4], count: &mut usize, w: &str) {
    if *count < idents.len() {
        const KEYS: [&str; 6] = ["create", "function", "procedure", "or", "replace", "schema"];
        if KEYS.iter().any(|k| w.eq_ignore_ascii_case(k)) {
            idents[*count] = w.as_bytes()[0].to_ascii_lowercase();
        }
        *count += 1;
    }
}

/// `CREATE [OR REPLACE] {FUNCTION|PROCEDURE}`.
fn is_create_routine(i: &[u8; 4]) -> bool {
    i[0] == b'c'
        && (i[1] == b'f'
            || i[1] == b'p'
            || (i[1] == b'o' && i[2] == b'r' && matches!(i[3], b'f' | b'p')))
}

/// Up to `n` leading words of a statement, lower case.
pub(crate) fn first_words(stmt: &str, n: usize) -> Vec<String> {
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

/// The words of `stmt` outside parentheses, upper case.
fn top_words(stmt: &str) -> Vec<String> {
    let mut depth = 0usize;
    let mut words = Vec::new();
    lex(stmt, |tok, _| match tok {
        Tok::Open => depth += 1,
        Tok::Close => depth = depth.saturating_sub(1),
        Tok::Word(w) if depth == 0 => words.push(w.to_ascii_uppercase()),
        _ => {}
    });
    words
}

/// Objects named by more than one word, after CREATE/ALTER/DROP.
const PHRASES: &[&[&str]] = &[
    &["MATERIALIZED", "VIEW"],
    &["FOREIGN", "TABLE"],
    &["FOREIGN", "DATA", "WRAPPER"],
    &["TEXT", "SEARCH", "CONFIGURATION"],
    &["TEXT", "SEARCH", "DICTIONARY"],
    &["TEXT", "SEARCH", "PARSER"],
    &["TEXT", "SEARCH", "TEMPLATE"],
    &["OPERATOR", "CLASS"],
    &["OPERATOR", "FAMILY"],
    &["USER", "MAPPING"],
    &["ACCESS", "METHOD"],
    &["EVENT", "TRIGGER"],
    &["DEFAULT", "PRIVILEGES"],
    &["LARGE", "OBJECT"],
];

/// Words between CREATE and the object that do not change the tag.
const CREATE_MODIFIERS: &[&str] = &[
    "OR",
    "REPLACE",
    "UNIQUE",
    "TEMP",
    "TEMPORARY",
    "UNLOGGED",
    "GLOBAL",
    "LOCAL",
    "RECURSIVE",
    "CONSTRAINT",
    "TRUSTED",
    "PROCEDURAL",
    "DEFAULT",
];

/// Objects whose commands never fire event triggers: shared objects, event
/// triggers themselves, and ALTER SYSTEM.
const NOT_FIRING: &[&str] = &[
    "DATABASE",
    "ROLE",
    "USER",
    "GROUP",
    "TABLESPACE",
    "EVENT TRIGGER",
    "SYSTEM",
];

/// The object phrase of `words` (upper case), and how many words it takes.
fn object_phrase(words: &[String]) -> Option<(String, usize)> {
    for p in PHRASES {
        if words.len() >= p.len() && words.iter().zip(p.iter()).all(|(w, p)| w == p) {
            return Some((p.join(" "), p.len()));
        }
    }
    words.first().map(|w| (w.clone(), 1))
}

/// The command tag PostgreSQL gives `stmt` when running it fires a
/// `ddl_command_end` event trigger (`TG_TAG`); None when it fires none.
pub(crate) fn ddl_command_tag(stmt: &str) -> Option<String> {
    let words = top_words(stmt);
    let verb = words.first()?.as_str();
    match verb {
        "CREATE" => {
            let mut rest = &words[1..];
            while rest.len() > 1 && CREATE_MODIFIERS.contains(&rest[0].as_str()) {
                rest = &rest[1..];
            }
            let (object, _) = object_phrase(rest)?;
            if NOT_FIRING.contains(&object.as_str()) {
                return None;
            }
            if object == "TABLE" && rest.iter().any(|w| w == "AS") {
                return Some("CREATE TABLE AS".into());
            }
            Some(format!("CREATE {object}"))
        }
        "ALTER" | "DROP" => {
            let mut rest = &words[1..];
            if rest.len() > 1 && rest[0] == "PROCEDURAL" {
                rest = &rest[1..];
            }
            let (object, _) = object_phrase(rest)?;
            if NOT_FIRING.contains(&object.as_str()) {
                return None;
            }
            Some(format!("{verb} {object}"))
        }
        "IMPORT" if words.get(1..3) == Some(&["FOREIGN".into(), "SCHEMA".into()]) => {
            Some("IMPORT FOREIGN SCHEMA".into())
        }
        "REFRESH" if words.get(1..3) == Some(&["MATERIALIZED".into(), "VIEW".into()]) => {
            Some("REFRESH MATERIALIZED VIEW".into())
        }
        "COMMENT" | "SECURITY" => {
            // COMMENT ON x …, SECURITY LABEL [FOR provider] ON x …
            let on = words.iter().position(|w| w == "ON")?;
            let (object, _) = object_phrase(&words[on + 1..])?;
            if NOT_FIRING.contains(&object.as_str()) {
                return None;
            }
            Some(
                if verb == "COMMENT" {
                    "COMMENT"
                } else {
                    "SECURITY LABEL"
                }
                .into(),
            )
        }
        "GRANT" | "REVOKE" => {
            // Object privileges only (GRANT … ON …), not role membership,
            // and not on shared objects nor on parameters (15+).
            let on = words.iter().position(|w| w == "ON")?;
            let object = words.get(on + 1)?;
            if NOT_FIRING.contains(&object.as_str()) || object == "PARAMETER" {
                return None;
            }
            Some(verb.into())
        }
        "SELECT" | "WITH" => {
            // SELECT … INTO t …, possibly after a WITH: the first verb at
            // the top level is the main statement's.
            const VERBS: [&str; 7] = [
                "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "TABLE",
            ];
            let main = words.iter().position(|w| VERBS.contains(&w.as_str()))?;
            (words[main] == "SELECT" && words[main..].iter().any(|w| w == "INTO"))
                .then(|| "SELECT INTO".into())
        }
        "REINDEX" => Some("REINDEX".into()),
        _ => None,
    }
}

/// Whether running `stmt` makes PostgreSQL fire a `ddl_command_end` event
/// trigger with `TG_TAG = tag`.
pub(crate) fn command_tag_matches(stmt: &str, tag: &str) -> bool {
    ddl_command_tag(stmt).is_some_and(|t| t.eq_ignore_ascii_case(tag.trim()))
}

/// The `nth` (0-based) statement of `query` whose command tag is `tag`:
/// the statement that fired the `nth` firing of `tag` in `query`. None when
/// there is none, e.g. when the command ran inside a DO block or function.
///
/// Commands run inside a statement (a DO block, a function call) count
/// towards `nth` but cannot be picked: after such a firing of `tag`, a
/// later top-level statement with `tag` comes with an `nth` one too high,
/// and the earlier firing gets that statement instead (tests/ddl_tags.rs
/// shows it). A string with DO or a function call before a DDL of the same
/// tag needs another way to tell.
pub(crate) fn pick_statement<'a>(query: &'a str, tag: &str, nth: usize) -> Option<&'a str> {
    statements(query)
        .into_iter()
        .filter(|s| command_tag_matches(s, tag))
        .nth(nth)
}

/// Statements that cannot run inside a transaction block: `CREATE [UNIQUE]
/// INDEX CONCURRENTLY`, `DROP INDEX CONCURRENTLY`, `REINDEX … CONCURRENTLY`
/// and `ALTER TABLE … DETACH PARTITION … CONCURRENTLY`.
pub(crate) fn runs_outside_transaction(stmt: &str) -> bool {
    let w = top_words(stmt);
    let at = |i: usize, s: &str| w.get(i).is_some_and(|x| x == s);
    match w.first().map(String::as_str) {
        Some("CREATE") => {
            let i = if at(1, "UNIQUE") { 2 } else { 1 };
            at(i, "INDEX") && at(i + 1, "CONCURRENTLY")
        }
        Some("DROP") => at(1, "INDEX") && at(2, "CONCURRENTLY"),
        // REINDEX [(options)] {INDEX|TABLE|SCHEMA|DATABASE|SYSTEM} CONCURRENTLY
        Some("REINDEX") => at(2, "CONCURRENTLY"),
        Some("ALTER") => {
            at(1, "TABLE")
                && w.windows(2)
                    .any(|p| p[0] == "DETACH" && p[1] == "PARTITION")
                && w.last().is_some_and(|x| x == "CONCURRENTLY")
        }
        _ => false,
    }
}

/// `ALTER TYPE x ADD VALUE …` (a new enum label).
pub(crate) fn is_enum_add_value(stmt: &str) -> bool {
    let w = top_words(stmt);
    w.len() >= 4
        && w[0] == "ALTER"
        && w[1] == "TYPE"
        && w[2..].windows(2).any(|p| p[0] == "ADD" && p[1] == "VALUE")
}

fn push_trimmed<'a>(out: &mut Vec<&'a str>, s: &'a str) {
    let s = s.trim();
    if !s.is_empty() {
        out.push(s);
    }
}

/// Letters, digits, `_`, `$` and every non-ASCII byte (UTF-8 never puts an
/// ASCII byte inside a multi-byte character).
pub(crate) fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// Past the closing `quote` of the quoted text starting at `i` (a doubled
/// quote is part of the text); the end of `b` if it is not closed.
pub(crate) fn skip_quoted(b: &[u8], i: usize, quote: u8, escapes: bool) -> usize {
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

/// Past the end of the line of the `--` comment starting at `i`.
fn skip_line(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |n| i + n + 1)
}

/// Past the end of the `/* … */` comment starting at `i` (they nest).
pub(crate) fn skip_block_comment(b: &[u8], i: usize) -> usize {
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
pub(crate) fn skip_dollar_quoted(b: &[u8], i: usize) -> usize {
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
pub(crate) fn skip_space(b: &[u8], mut i: usize) -> usize {
    loop {
        match b.get(i) {
            Some(c) if c.is_ascii_whitespace() => i += 1,
            Some(b'-') if b.get(i + 1) == Some(&b'-') => i = skip_line(b, i),
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
        // `x$` is an identifier, not the start of a dollar quote.
        assert_eq!(
            statements("SELECT a$b$; SELECT 1"),
            vec!["SELECT a$b$", "SELECT 1"]
        );
        // e'…' only after a non-identifier character takes escapes.
        assert_eq!(
            statements("SELECT 'a\\'; SELECT 1'"),
            vec!["SELECT 'a\\'", "SELECT 1'"]
        );
        // A rule's actions in parentheses are one statement.
        assert_eq!(
            statements(
                "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO u VALUES (1); NOTIFY t); SELECT 1"
            ),
            vec![
                "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO u VALUES (1); NOTIFY t)",
                "SELECT 1"
            ]
        );
    }

    #[test]
    fn begin_atomic_bodies_are_one_statement() {
        let f = "CREATE OR REPLACE FUNCTION f(a int) RETURNS int LANGUAGE sql BEGIN ATOMIC \
                 INSERT INTO t VALUES (a); SELECT CASE WHEN a > 0 THEN 1 ELSE 0 END; END";
        let p = "create procedure p() begin atomic insert into t values (1); end";
        let text =
            format!("INSERT INTO t VALUES (1); {f}; {p};BEGIN; UPDATE t SET a = 1; END; SELECT 2");
        assert_eq!(
            statements(&text),
            vec![
                "INSERT INTO t VALUES (1)",
                f,
                p,
                "BEGIN",
                "UPDATE t SET a = 1",
                "END",
                "SELECT 2"
            ]
        );
        // Inside CREATE SCHEMA, only the routine elements nest.
        let s = "CREATE SCHEMA s CREATE TABLE x (a int) CREATE FUNCTION g() RETURNS int BEGIN ATOMIC SELECT 1; END";
        assert_eq!(statements(&format!("{s}; SELECT 1")), vec![s, "SELECT 1"]);
        // A plpgsql body's BEGIN is inside its dollar quote.
        let q = "CREATE FUNCTION h() RETURNS void LANGUAGE plpgsql AS $b$ BEGIN ALTER TABLE t ADD c int; END $b$";
        assert_eq!(statements(&format!("{q}; SELECT 1")), vec![q, "SELECT 1"]);
    }

    fn tag(stmt: &str) -> Option<String> {
        ddl_command_tag(stmt)
    }

    #[test]
    fn command_tags() {
        let cases: &[(&str, Option<&str>)] = &[
            ("ALTER TABLE t ADD c int", Some("ALTER TABLE")),
            ("/* x */ -- y\n alter\ttable t drop c", Some("ALTER TABLE")),
            (
                "CREATE UNIQUE INDEX CONCURRENTLY i ON t (a)",
                Some("CREATE INDEX"),
            ),
            (
                "CREATE OR REPLACE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
                Some("CREATE FUNCTION"),
            ),
            (
                "CREATE GLOBAL TEMPORARY TABLE t (a int)",
                Some("CREATE TABLE"),
            ),
            (
                "CREATE UNLOGGED TABLE t (a int GENERATED ALWAYS AS (1) STORED)",
                Some("CREATE TABLE"),
            ),
            (
                "CREATE TABLE t2 PARTITION OF t FOR VALUES IN (1)",
                Some("CREATE TABLE"),
            ),
            ("CREATE TABLE t AS SELECT 1", Some("CREATE TABLE AS")),
            (
                "CREATE TEMP TABLE IF NOT EXISTS \"x\" (a, b) AS EXECUTE p(1)",
                Some("CREATE TABLE AS"),
            ),
            ("CREATE TABLE \"as\" (\"as\" int)", Some("CREATE TABLE")),
            (
                "CREATE RECURSIVE VIEW v (n) AS SELECT 1",
                Some("CREATE VIEW"),
            ),
            (
                "CREATE MATERIALIZED VIEW m AS SELECT 1",
                Some("CREATE MATERIALIZED VIEW"),
            ),
            (
                "CREATE CONSTRAINT TRIGGER x AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
                Some("CREATE TRIGGER"),
            ),
            (
                "CREATE TRUSTED PROCEDURAL LANGUAGE l HANDLER h",
                Some("CREATE LANGUAGE"),
            ),
            (
                "CREATE DEFAULT CONVERSION c FOR 'LATIN1' TO 'UTF8' FROM f",
                Some("CREATE CONVERSION"),
            ),
            (
                "CREATE TEXT SEARCH CONFIGURATION c (COPY = english)",
                Some("CREATE TEXT SEARCH CONFIGURATION"),
            ),
            (
                "CREATE FOREIGN DATA WRAPPER w",
                Some("CREATE FOREIGN DATA WRAPPER"),
            ),
            (
                "DROP MATERIALIZED VIEW IF EXISTS m",
                Some("DROP MATERIALIZED VIEW"),
            ),
            ("DROP PROCEDURAL LANGUAGE l", Some("DROP LANGUAGE")),
            (
                "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC",
                Some("ALTER DEFAULT PRIVILEGES"),
            ),
            ("SELECT a INTO TEMP t2 FROM t", Some("SELECT INTO")),
            (
                "WITH x AS (SELECT 1 AS a) SELECT a INTO t2 FROM x",
                Some("SELECT INTO"),
            ),
            ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", None),
            ("SELECT 'INTO' FROM t", None),
            ("SELECT \"into\" FROM t", None),
            ("GRANT SELECT (a), UPDATE ON t TO u", Some("GRANT")),
            (
                "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM u",
                Some("REVOKE"),
            ),
            ("GRANT r TO u WITH ADMIN OPTION", None),
            ("REVOKE r FROM u", None),
            ("GRANT CONNECT ON DATABASE d TO u", None),
            ("GRANT CREATE ON TABLESPACE s TO u", None),
            ("GRANT SET ON PARAMETER work_mem TO u", None),
            ("COMMENT ON TABLE t IS 'x;y'", Some("COMMENT")),
            ("COMMENT ON COLUMN t.a IS NULL", Some("COMMENT")),
            ("COMMENT ON DATABASE d IS 'x'", None),
            ("COMMENT ON ROLE r IS 'x'", None),
            ("COMMENT ON TABLESPACE s IS 'x'", None),
            ("CREATE ROLE r", None),
            ("CREATE USER u", None),
            (
                "CREATE USER MAPPING FOR u SERVER s",
                Some("CREATE USER MAPPING"),
            ),
            ("ALTER DATABASE d SET work_mem = '1MB'", None),
            (
                "CREATE EVENT TRIGGER e ON ddl_command_end EXECUTE FUNCTION f()",
                None,
            ),
            ("ALTER SYSTEM SET work_mem = '1MB'", None),
            (
                "DO $$ BEGIN EXECUTE 'ALTER TABLE t ADD c int'; END $$",
                None,
            ),
            ("SELECT f()", None),
            ("INSERT INTO t VALUES (1)", None),
            ("\"ALTER\" TABLE t", None),
            ("", None),
        ];
        for (stmt, want) in cases {
            assert_eq!(tag(stmt).as_deref(), *want, "{stmt}");
        }
        assert!(command_tag_matches(
            "create table t (a int)",
            "CREATE TABLE"
        ));
        assert!(!command_tag_matches(
            "create table t as select 1",
            "CREATE TABLE"
        ));
    }

    #[test]
    fn picks_the_nth_statement_of_a_tag() {
        let f = "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $body$ BEGIN \
                 ALTER TABLE t ADD x int; END $body$";
        let a = "CREATE FUNCTION g(int) RETURNS int LANGUAGE sql BEGIN ATOMIC \
                 SELECT CASE WHEN $1 > 0 THEN 1 END; SELECT 2; END";
        let q = format!(
            "INSERT INTO t VALUES ('a;ALTER TABLE t ADD y int'); /* ALTER TABLE t; /* nested; */ */ \
             ALTER TABLE \"select;\" ADD c int; SELECT E'\\';ALTER TABLE t ADD z int;'; {f}; \
             SELECT $q$;ALTER TABLE x$q$; alter table t rename c to \"ALTER TABLE\"; {a}; \
             INSERT INTO t VALUES (2)"
        );
        assert_eq!(
            pick_statement(&q, "ALTER TABLE", 0),
            Some("/* ALTER TABLE t; /* nested; */ */ ALTER TABLE \"select;\" ADD c int")
        );
        assert_eq!(
            pick_statement(&q, "ALTER TABLE", 1),
            Some("alter table t rename c to \"ALTER TABLE\"")
        );
        assert_eq!(pick_statement(&q, "ALTER TABLE", 2), None);
        assert_eq!(pick_statement(&q, "CREATE FUNCTION", 0), Some(f));
        assert_eq!(pick_statement(&q, "CREATE FUNCTION", 1), Some(a));
        assert_eq!(pick_statement(&q, "CREATE TABLE", 0), None);
        assert_eq!(
            pick_statement(
                "DO $$ BEGIN EXECUTE 'CREATE TABLE x ()'; END $$",
                "CREATE TABLE",
                0
            ),
            None
        );
    }

    #[test]
    fn outside_transaction_and_enum_values() {
        for s in [
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "create unique index concurrently on t (a)",
            "DROP INDEX CONCURRENTLY IF EXISTS i",
            "REINDEX TABLE CONCURRENTLY t",
            "REINDEX (VERBOSE) INDEX CONCURRENTLY i",
            "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
        ] {
            assert!(runs_outside_transaction(s), "{s}");
        }
        for s in [
            "CREATE INDEX i ON t (a)",
            "CREATE INDEX \"concurrently\" ON t (a)",
            "DROP INDEX i",
            "REINDEX TABLE t",
            "ALTER TABLE p DETACH PARTITION c",
            "ALTER TABLE p DETACH PARTITION c FINALIZE",
            "SELECT 'CREATE INDEX CONCURRENTLY'",
        ] {
            assert!(!runs_outside_transaction(s), "{s}");
        }
        assert!(is_enum_add_value(
            "ALTER TYPE mood ADD VALUE 'x' BEFORE 'y'"
        ));
        assert!(is_enum_add_value(
            "alter type s.\"T\" add value if not exists 'x'"
        ));
        assert!(!is_enum_add_value(
            "ALTER TYPE mood RENAME VALUE 'a' TO 'b'"
        ));
        assert!(!is_enum_add_value("ALTER TYPE c ADD ATTRIBUTE value int"));
        assert!(!is_enum_add_value("ALTER TABLE t ADD value int"));
    }
}
