//! Just enough SQL lexing to cut statements out of a query string: quotes,
//! dollar quotes, comments, parentheses and the `BEGIN ATOMIC … END` bodies
//! of SQL-standard functions, as psql's scanner (src/fe_utils/psqlscan.l)
//! sees them.
//!
//! Used by the proxy (re-creating prepared statements on a session move).

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
}
