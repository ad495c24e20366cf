//! `${VAR}` expansion. In a connection string a value is made to mean
//! itself: a reference in a URL's user or password part is percent-encoded
//! (so `@`, `:`, `/`, `?`, `#` in a password stay in the password), a
//! reference in its host part may not hold URL delimiters, and a reference
//! that is a whole `key=value` value is quoted.

use super::ConfigError;

/// A piece of a value as written.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(String),
    Var(&'a str),
}

/// Splits `s` into text and `${NAME}` references; `$$` is a literal `$`.
fn pieces<'a>(key: &str, s: &'a str) -> Result<Vec<Piece<'a>>, ConfigError> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        text.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(r) = after.strip_prefix('$') {
            text.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| {
                ConfigError::invalid(key, "unterminated `${` (expected `${NAME}`)")
            })?;
            let name = &r[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ConfigError::invalid(
                    key,
                    format!("`${{{name}}}` is not a valid variable name"),
                ));
            }
            out.push(Piece::Text(std::mem::take(&mut text)));
            out.push(Piece::Var(name));
            rest = &r[end + 1..];
        } else {
            text.push('$');
            rest = after;
        }
    }
    text.push_str(rest);
    out.push(Piece::Text(text));
    Ok(out)
}

fn lookup(
    key: &str,
    name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    env(name).ok_or_else(|| {
        ConfigError::invalid(key, format!("environment variable `{name}` is not set"))
    })
}

/// Expands `${VAR}` references as they are; `$$` is a literal `$`.
pub(crate) fn expand(
    key: &str,
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    for p in pieces(key, s)? {
        match p {
            Piece::Text(t) => out.push_str(&t),
            Piece::Var(name) => out.push_str(&lookup(key, name, env)?),
        }
    }
    Ok(out)
}

/// Where a reference sits in a connection string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// Taken as written: a whole URL, or after the URL's authority.
    Raw,
    /// In the authority before any `@` seen so far: user/password if an `@`
    /// follows, else the host.
    BeforeAt,
    /// In the authority after the `@`: host and port.
    Host,
    /// The whole value of a `key=value` parameter.
    KeywordValue,
}

/// Expands a connection string (`[source].url`, `[target].url`) so every
/// value substituted means itself; see the module comment.
pub(crate) fn expand_conn(
    key: &str,
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let pieces = pieces(key, s)?;
    let (places, has_userinfo) = places(&pieces);
    let mut out = String::with_capacity(s.len());
    for (p, place) in pieces.iter().zip(places) {
        let name = match p {
            Piece::Text(t) => {
                out.push_str(t);
                continue;
            }
            Piece::Var(name) => *name,
        };
        let v = lookup(key, name, env)?;
        match place {
            Place::BeforeAt if has_userinfo => out.push_str(&percent_encode(&v)),
            Place::BeforeAt | Place::Host => {
                if v.contains(['@', '/', '?', '#']) {
                    return Err(ConfigError::invalid(
                        key,
                        format!(
                            "`${{{name}}}` is in the URL's host part and its value contains `@`, `/`, `?` or `#`, \
                             which a host cannot (is it a password? write postgres://user:${{PASSWORD}}@host/db)"
                        ),
                    ));
                }
                out.push_str(&v);
            }
            Place::KeywordValue => out.push_str(&quote_keyword_value(&v)),
            Place::Raw => out.push_str(&v),
        }
    }
    Ok(out)
}

/// The place of each piece (text pieces get one too, unused), and whether
/// the URL's authority has an `@` (then what precedes it is user:password).
fn places(pieces: &[Piece]) -> (Vec<Place>, bool) {
    let first = match pieces.first() {
        Some(Piece::Text(t)) => t.as_str(),
        _ => "",
    };
    let is_url = first.starts_with("postgres://") || first.starts_with("postgresql://");
    if !is_url {
        return (keyword_places(pieces), false);
    }
    let mut place = Place::BeforeAt;
    let mut seen_at = false;
    let mut out = Vec::with_capacity(pieces.len());
    for (i, p) in pieces.iter().enumerate() {
        match p {
            Piece::Var(_) => out.push(place),
            Piece::Text(t) => {
                out.push(Place::Raw);
                let t = if i == 0 {
                    t.split_once("://").map_or("", |(_, r)| r)
                } else {
                    t.as_str()
                };
                for c in t.chars() {
                    match (place, c) {
                        (Place::BeforeAt, '@') => {
                            place = Place::Host;
                            seen_at = true;
                        }
                        // Path and query follow: taken as written.
                        (Place::BeforeAt | Place::Host, '/' | '?' | '#') => place = Place::Raw,
                        _ => {}
                    }
                }
            }
        }
    }
    (out, seen_at)
}

/// In `key=value` form: a reference right after `=` that ends the value is a
/// whole value (and is quoted); any other is taken as written.
fn keyword_places(pieces: &[Piece]) -> Vec<Place> {
    let mut out = Vec::with_capacity(pieces.len());
    for (i, p) in pieces.iter().enumerate() {
        let Piece::Var(_) = p else {
            out.push(Place::Raw);
            continue;
        };
        let before_ok = match i.checked_sub(1).map(|j| &pieces[j]) {
            Some(Piece::Text(t)) => t.trim_end().ends_with('='),
            _ => false,
        };
        let after_ok = match pieces.get(i + 1) {
            Some(Piece::Text(t)) => t.is_empty() || t.starts_with(char::is_whitespace),
            _ => false,
        };
        out.push(if before_ok && after_ok {
            Place::KeywordValue
        } else {
            Place::Raw
        });
    }
    out
}

/// RFC 3986 userinfo: everything but unreserved characters is encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A libpq `key=value` value in single quotes, `\` and `'` escaped.
fn quote_keyword_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "PW" => Some("p@ss:w/rd?x#y %".into()),
            "USER" => Some("app user".into()),
            "HOST" => Some("db.example".into()),
            "BAD_HOST" => Some("pw@evil".into()),
            "URL" => Some("postgres://u:p@h/db".into()),
            _ => None,
        }
    }

    #[test]
    fn plain_rules() {
        assert_eq!(expand("k", "a$$b", &env).unwrap(), "a$b");
        assert_eq!(expand("k", "x${HOST}y", &env).unwrap(), "xdb.exampley");
        assert!(expand("k", "${HOST", &env).is_err());
        assert!(expand("k", "${NOPE}", &env).is_err());
        assert!(expand("k", "${a-b}", &env).is_err());
    }

    #[test]
    fn url_credentials_are_percent_encoded() {
        let u = expand_conn("k", "postgres://${USER}:${PW}@${HOST}:5432/db", &env).unwrap();
        assert_eq!(
            u,
            "postgres://app%20user:p%40ss%3Aw%2Frd%3Fx%23y%20%25@db.example:5432/db"
        );
        let cfg: tokio_postgres::Config = u.parse().unwrap();
        assert_eq!(cfg.get_password().unwrap(), b"p@ss:w/rd?x#y %");
        assert_eq!(cfg.get_user().unwrap(), "app user");
    }

    #[test]
    fn url_host_variable_may_not_hold_delimiters() {
        let e = expand_conn("source.url", "postgres://u@${BAD_HOST}/db", &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("source.url") && e.contains("BAD_HOST"), "{e}");
        assert!(!e.contains("pw@evil"), "{e}");
        // Without an @, the authority is the host.
        assert!(expand_conn("k", "postgres://${BAD_HOST}/db", &env).is_err());
        assert_eq!(
            expand_conn("k", "postgres://${HOST}/db", &env).unwrap(),
            "postgres://db.example/db"
        );
    }

    #[test]
    fn whole_url_and_path_are_raw() {
        assert_eq!(
            expand_conn("k", "${URL}", &env).unwrap(),
            "postgres://u:p@h/db"
        );
        assert_eq!(
            expand_conn("k", "postgres://u@h/${HOST}", &env).unwrap(),
            "postgres://u@h/db.example"
        );
    }

    #[test]
    fn keyword_values_are_quoted() {
        let s = expand_conn("k", "host=h user=${USER} password=${PW} dbname=x", &env).unwrap();
        let cfg: tokio_postgres::Config = s.parse().unwrap();
        assert_eq!(cfg.get_password().unwrap(), b"p@ss:w/rd?x#y %");
        assert_eq!(cfg.get_user().unwrap(), "app user");
    }
}
