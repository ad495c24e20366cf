//! Log output: text (one line per event) or JSON (one object per line).
//! Values logged may come from the network (user names, startup
//! parameters); in text, control characters in any field or message are
//! escaped so nothing a client sends can start a forged log line or drive a
//! terminal. JSON escapes them by itself.

use std::fmt::Write as _;

use tracing_subscriber::fmt::format::{self, FormatFields};

/// `\n`, `\r`, `\t` and other control characters as escapes.
fn escape_control(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The text format's field formatter: `name=value`, the message bare,
/// every value escaped.
fn text_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    use tracing_subscriber::field::MakeExt;
    format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        let text = escape_control(&text);
        if field.name() == "message" {
            write!(w, "{text}")
        } else {
            write!(w, "{}={text}", field.name())
        }
    })
    .delimited(" ")
}

/// True at most once per `secs` seconds for the same `last` (seconds since
/// the epoch when it was last true): rate-limits warnings about floods.
pub(crate) fn once_per(last: &std::sync::atomic::AtomicU64, secs: u64) -> bool {
    use std::sync::atomic::Ordering;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let prev = last.load(Ordering::Relaxed);
    now >= prev.saturating_add(secs)
        && last
            .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Installs the global subscriber (`RUST_LOG` filters, default `info`), to stderr.
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: a file or pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.fmt_fields(text_fields()).init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(json: bool, f: impl FnOnce()) -> String {
        let buf = Buf::default();
        let b = buf.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || b.clone());
        if json {
            tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), f);
        } else {
            tracing::subscriber::with_default(builder.fmt_fields(text_fields()).finish(), f);
        }
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn once_per_interval() {
        let last = std::sync::atomic::AtomicU64::new(0);
        assert!(once_per(&last, 3600));
        assert!(!once_per(&last, 3600));
    }

    #[test]
    fn escapes() {
        assert_eq!(escape_control("plain"), "plain");
        assert_eq!(escape_control("a\nb\r\x1b[31m"), "a\\nb\\r\\u{1b}[31m");
    }

    #[test]
    fn a_forged_line_stays_one_line_in_every_format() {
        let user = "app\n2026-01-01T00:00:00Z  INFO admin logged in";
        for json in [false, true] {
            let out = capture(
                json,
                || tracing::info!(%user, peer = ?"x\ry", "client authentication failed: {user}"),
            );
            assert_eq!(out.lines().count(), 1, "{out}");
            assert!(out.contains("INFO admin logged in"), "{out}");
            assert!(!out.contains('\r'), "{out}");
        }
    }
}
