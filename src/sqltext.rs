//! Just enough SQL lexing to cut statements out of a query string: quotes,
//! dollar quotes and comments. Used by the proxy (re-creating prepared
//! statements on a session move).

/// The statements of a query string, split at the semicolons outside
/// quotes, dollar quotes and comments; trimmed, empty ones left out.
pub(crate) fn statements(text: &str) -> Vec<&str> {
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
}
