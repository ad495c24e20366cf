//! `sslmode` and `sslrootcert`, taken out of a connection string before
//! tokio-postgres parses the rest: its parser refuses `verify-ca` and
//! `verify-full` and does not know `sslrootcert`, and pgshift checks
//! certificates itself (`wire::tls`).

use std::path::PathBuf;

use super::{ConfigError, SslMode};

/// The TLS parameters as written (decoded, not yet checked).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct TlsParams {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
}

/// Splits a connection string (URL or `key=value` form) into the string
/// without `sslmode`/`sslrootcert` and those two parameters. A string this
/// cannot tokenize is returned whole, for tokio-postgres to report.
pub(super) fn take(conn: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let rest = if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        take_from_url(conn, &mut params)
    } else {
        match take_from_keywords(conn, &mut params) {
            Some(rest) => rest,
            None => return (conn.to_string(), TlsParams::default()),
        }
    };
    (rest, params)
}

impl TlsParams {
    /// Checks the values; `key` names the config key in errors. A root
    /// certificate file must be readable and hold at least one certificate.
    pub(super) fn resolve(&self, key: &str) -> Result<(SslMode, Option<PathBuf>), ConfigError> {
        let mode = match &self.sslmode {
            None => SslMode::Prefer,
            Some(m) => SslMode::parse(m).ok_or_else(|| {
                ConfigError::invalid(
                    key,
                    format!(
                        "sslmode `{m}` is not supported (use disable, prefer, require, verify-ca or verify-full)"
                    ),
                )
            })?,
        };
        let root = match self.sslrootcert.as_deref() {
            None | Some("") => None,
            Some("system") => {
                return Err(ConfigError::invalid(
                    key,
                    "sslrootcert=system is not supported; name a PEM file with the CA certificate(s)",
                ));
            }
            Some(p) => Some(PathBuf::from(p)),
        };
        match &root {
            None if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "sslmode={} needs sslrootcert=<PEM file with the CA certificate(s)>",
                        mode.as_str()
                    ),
                ));
            }
            Some(path) if mode != SslMode::Disable => {
                crate::wire::tls::root_store(path).map_err(|e| {
                    let message = match e {
                        crate::wire::WireError::Tls(m) => m,
                        other => other.to_string(),
                    };
                    ConfigError::invalid(key, format!("sslrootcert: {message}"))
                })?;
            }
            _ => {}
        }
        Ok((mode, root))
    }
}

fn take_from_url(url: &str, params: &mut TlsParams) -> String {
    // tokio-postgres ends the credentials at the first '@', so a '?' before it
    // belongs to the password.
    let query_from = url.find('@').unwrap_or(0);
    let Some(q) = url[query_from..].find('?').map(|q| q + query_from) else {
        return url.to_string();
    };
    let (base, query) = (&url[..q], &url[q + 1..]);
    let mut kept = Vec::new();
    for piece in query.split('&') {
        let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
        match percent_decode(k).as_str() {
            "sslmode" => params.sslmode = Some(percent_decode(v)),
            "sslrootcert" => params.sslrootcert = Some(percent_decode(v)),
            _ => kept.push(piece),
        }
    }
    if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

/// libpq's `key = value` syntax: values may be single-quoted, `\` escapes.
fn take_from_keywords(s: &str, params: &mut TlsParams) -> Option<String> {
    let b = s.as_bytes();
    let ws = |c: u8| c.is_ascii_whitespace();
    let mut kept = Vec::new();
    let mut i = 0;
    loop {
        while i < b.len() && ws(b[i]) {
            i += 1;
        }
        if i == b.len() {
            return Some(kept.join(" "));
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !ws(b[i]) {
            i += 1;
        }
        let key = &s[start..i];
        while i < b.len() && ws(b[i]) {
            i += 1;
        }
        if i == b.len() || b[i] != b'=' {
            return None;
        }
        i += 1;
        while i < b.len() && ws(b[i]) {
            i += 1;
        }
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            loop {
                match b.get(i) {
                    None => return None,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < b.len() => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !ws(b[i]) {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        let value = String::from_utf8_lossy(&value).into_owned();
        match key {
            "sslmode" => params.sslmode = Some(value),
            "sslrootcert" => params.sslrootcert = Some(value),
            _ => kept.push(&s[start..i]),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(mode: Option<&str>, root: Option<&str>) -> TlsParams {
        TlsParams {
            sslmode: mode.map(Into::into),
            sslrootcert: root.map(Into::into),
        }
    }

    #[test]
    fn url_params_are_taken_out_and_others_kept() {
        let (rest, p) = take(
            "postgres://u:p%3F@h:5/db?application_name=x&sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&connect_timeout=3",
        );
        assert_eq!(
            rest,
            "postgres://u:p%3F@h:5/db?application_name=x&connect_timeout=3"
        );
        assert_eq!(p, tls(Some("verify-full"), Some("/tmp/ca.pem")));
        let (rest, p) = take("postgresql://u@h/db?sslmode=require");
        assert_eq!(rest, "postgresql://u@h/db");
        assert_eq!(p, tls(Some("require"), None));
        let (rest, p) = take("postgres://u:a?b@h/db");
        assert_eq!(rest, "postgres://u:a?b@h/db");
        assert_eq!(p, TlsParams::default());
    }

    #[test]
    fn keyword_params_are_taken_out_and_others_kept() {
        let (rest, p) = take(
            "host=h user = u sslmode=verify-ca password='a b\\'c' sslrootcert='/tmp/my ca.pem' dbname=d",
        );
        assert_eq!(rest, "host=h user = u password='a b\\'c' dbname=d");
        assert_eq!(p, tls(Some("verify-ca"), Some("/tmp/my ca.pem")));
        // Malformed: left whole for tokio-postgres to report.
        let (rest, p) = take("host=h sslmode");
        assert_eq!(rest, "host=h sslmode");
        assert_eq!(p, TlsParams::default());
    }

    #[test]
    fn resolve_checks_values_and_names_the_key() {
        assert_eq!(
            tls(None, None).resolve("k").unwrap(),
            (SslMode::Prefer, None)
        );
        assert_eq!(
            tls(Some("require"), None).resolve("k").unwrap().0,
            SslMode::Require
        );
        let err = |p: TlsParams| p.resolve("source.url").unwrap_err().to_string();
        let e = err(tls(Some("allow"), None));
        assert!(
            e.contains("source.url") && e.contains("sslmode `allow`"),
            "{e}"
        );
        let e = err(tls(Some("verify-full"), None));
        assert!(e.contains("needs sslrootcert"), "{e}");
        let e = err(tls(Some("verify-ca"), Some("/nonexistent/ca.pem")));
        assert!(
            e.contains("sslrootcert") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let e = err(tls(Some("require"), Some("system")));
        assert!(e.contains("sslrootcert=system"), "{e}");
    }
}
