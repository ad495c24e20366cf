//! The comparison of one table on a pair of connections, by count or by
//! checksums over key ranges, and the words that say where it differs.

use tokio_postgres::Client;

use super::progress::VerifyProgress;
use super::{MAX_RANGES, TableVerify, VerifyError, sql_err};
use crate::db::{quote_ident, quote_literal};

/// Sum of the rows' md5 (two 64-bit halves), as text.
const HASH_SUM: &str = "coalesce(sum(('x' || substr(h, 1, 16))::bit(64)::bigint::numeric), 0)::text \
     || '/' || coalesce(sum(('x' || substr(h, 17, 16))::bit(64)::bigint::numeric), 0)::text";
const ROW_HASH: &str = "md5(convert_to(x::text, 'UTF8'))";

/// Key values longer than this are shortened in a report: a range names
/// rows, it does not reproduce them.
const SHOWN_VALUE_CHARS: usize = 64;

pub(super) async fn compare_counts(
    src: &Client,
    tgt: &Client,
    table: &str,
    quoted: &str,
    progress: &VerifyProgress,
) -> Result<TableVerify, VerifyError> {
    let sql = format!("SELECT count(*) FROM ONLY {quoted}");
    let (s, t) = tokio::try_join!(
        one_i64(src, &sql, format!("counting {table} on the source")),
        one_i64(tgt, &sql, format!("counting {table} on the target"))
    )?;
    progress.add_rows(s.max(t));
    Ok(TableVerify {
        table: table.to_string(),
        source_rows: Some(s),
        target_rows: Some(t),
        matches: s == t,
        detail: (s != t).then(|| format!("row counts differ: source {s}, target {t}")),
        ranges: Vec::new(),
    })
}

async fn one_i64(c: &Client, sql: &str, what: String) -> Result<i64, VerifyError> {
    let row = c.query_one(sql, &[]).await.map_err(sql_err(what.clone()))?;
    row.try_get(0).map_err(sql_err(what))
}

/// A primary key: its column names (as stored) and types, in key order.
struct Key {
    names: Vec<String>,
    types: Vec<String>,
}

async fn primary_key(c: &Client, quoted: &str) -> Result<Key, VerifyError> {
    let what = format!("reading the primary key of {quoted}");
    let rows = c
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
             FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::text::regclass AND i.indisprimary \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&quoted],
        )
        .await
        .map_err(sql_err(what.clone()))?;
    let mut key = Key {
        names: Vec::new(),
        types: Vec::new(),
    };
    for r in rows {
        key.names.push(r.try_get(0).map_err(sql_err(what.clone()))?);
        key.types.push(r.try_get(1).map_err(sql_err(what.clone()))?);
    }
    Ok(key)
}

pub(super) async fn compare_checksums(
    src: &Client,
    tgt: &Client,
    table: &str,
    quoted: &str,
    chunk_rows: i64,
    pace: f64,
    progress: &VerifyProgress,
) -> Result<TableVerify, VerifyError> {
    let key = primary_key(src, quoted).await?;
    if key.names.is_empty() {
        let sql = format!(
            "SELECT count(*), {HASH_SUM} FROM (SELECT {ROW_HASH} AS h FROM ONLY {quoted} x) c"
        );
        let (s, t) = tokio::try_join!(
            chunk(src, &sql, format!("checksumming {table} on the source")),
            chunk(tgt, &sql, format!("checksumming {table} on the target"))
        )?;
        progress.add_rows(s.0.max(t.0));
        let ranges: Vec<String> = (s != t)
            .then(|| differs(&key_range(&[], None, None), s.0, t.0))
            .into_iter()
            .collect();
        return Ok(TableVerify {
            table: table.to_string(),
            source_rows: Some(s.0),
            target_rows: Some(t.0),
            matches: ranges.is_empty(),
            detail: summary(&ranges, 0),
            ranges,
        });
    }
    let mut scan = KeyScan::new(src, tgt, table, quoted, key, progress);
    scan.pace = pace;
    let chunks = scan.chunks(None, None, chunk_rows).await?;
    let (src_rows, tgt_rows) = chunks
        .iter()
        .fold((0, 0), |(s, t), c| (s + c.source.0, t + c.target.0));
    let mut ranges = Vec::new();
    let mut more = 0usize;
    for c in chunks.iter().filter(|c| c.differs()) {
        // A differing chunk is narrowed to the rows that differ.
        for d in scan.narrow(c, chunk_rows).await? {
            if ranges.len() < MAX_RANGES {
                let range = key_range(&scan.key.names, d.lower.as_deref(), d.upper.as_deref());
                ranges.push(differs(&range, d.source.0, d.target.0));
            } else {
                more += 1;
            }
        }
    }
    Ok(TableVerify {
        table: table.to_string(),
        source_rows: Some(src_rows),
        target_rows: Some(tgt_rows),
        matches: ranges.is_empty(),
        detail: summary(&ranges, more),
        ranges,
    })
}

/// One key range's count and checksum on each side: keys above `lower`
/// (exclusive) up to `upper` (inclusive), open where None.
struct Chunk {
    lower: Option<Vec<String>>,
    upper: Option<Vec<String>>,
    source: (i64, String),
    target: (i64, String),
}

impl Chunk {
    fn differs(&self) -> bool {
        self.source != self.target
    }
}

/// Narrowing stops at ranges of this many source rows (or fewer).
const NARROW_TO_ROWS: i64 = 1;
/// A differing range is cut into this many pieces per narrowing step.
const NARROW_PIECES: i64 = 64;
/// Narrowing gives up past this many differing pieces in one step: the
/// difference is spread out, the wider range says enough.
const NARROW_MAX_PIECES: usize = 8;

/// A keyed table compared in key ranges: the source defines each range
/// (keyset pagination over the key), the target is asked for the same one.
struct KeyScan<'a> {
    src: &'a Client,
    tgt: &'a Client,
    table: &'a str,
    quoted: &'a str,
    key: Key,
    /// `(x.k1, x.k2)` and the select list's `x.k1 AS k0, …`.
    row: String,
    keys: String,
    order: String,
    key_text: String,
    desc: String,
    progress: &'a VerifyProgress,
    /// Rest after each chunk, in multiples of the chunk's time.
    pace: f64,
}

impl<'a> KeyScan<'a> {
    fn new(
        src: &'a Client,
        tgt: &'a Client,
        table: &'a str,
        quoted: &'a str,
        key: Key,
        progress: &'a VerifyProgress,
    ) -> KeyScan<'a> {
        let cols: Vec<String> = key
            .names
            .iter()
            .map(|c| format!("x.{}", quote_ident(c)))
            .collect();
        let aliases: Vec<String> = (0..cols.len()).map(|i| format!("k{i}")).collect();
        let join = |v: Vec<String>| v.join(", ");
        KeyScan {
            row: format!("({})", cols.join(", ")),
            keys: join(
                cols.iter()
                    .zip(&aliases)
                    .map(|(c, a)| format!("{c} AS {a}"))
                    .collect(),
            ),
            order: cols.join(", "),
            key_text: join(aliases.iter().map(|a| format!("{a}::text")).collect()),
            desc: join(aliases.iter().map(|a| format!("{a} DESC")).collect()),
            pace: 0.0,
            src,
            tgt,
            table,
            quoted,
            key,
            progress,
        }
    }

    fn bound(&self, op: &str, v: &[String]) -> String {
        format!("{} {op} {}", self.row, key_literal(&self.key.types, v))
    }

    /// The range (`from`, `to`] in chunks of `rows` source rows.
    async fn chunks(
        &self,
        from: Option<Vec<String>>,
        to: Option<Vec<String>>,
        rows: i64,
    ) -> Result<Vec<Chunk>, VerifyError> {
        let (table, quoted) = (self.table, self.quoted);
        let to_cond = to
            .as_ref()
            .map(|u| format!(" AND {}", self.bound("<=", u)))
            .unwrap_or_default();
        let mut out = Vec::new();
        let mut lower = from;
        loop {
            let started = std::time::Instant::now();
            let lower_cond = lower
                .as_ref()
                .map(|v| self.bound(">", v))
                .unwrap_or_else(|| "true".into());
            // `c` is read twice, so every version computes it once (12+
            // inlines only a CTE read once; 11 has no MATERIALIZED keyword).
            let src_sql = format!(
                "WITH c AS (SELECT {ROW_HASH} AS h, {keys} FROM ONLY {quoted} x \
                   WHERE {lower_cond}{to_cond} ORDER BY {order} LIMIT {rows}) \
                 SELECT count(*), {HASH_SUM}, \
                   (SELECT ARRAY[{key_text}] FROM c ORDER BY {desc} LIMIT 1) FROM c",
                keys = self.keys,
                order = self.order,
                key_text = self.key_text,
                desc = self.desc,
            );
            let what = format!("checksumming {table} on the source");
            let r = self
                .src
                .query_one(&src_sql, &[])
                .await
                .map_err(sql_err(what.clone()))?;
            let s: (i64, String) = (
                r.try_get(0).map_err(sql_err(what.clone()))?,
                r.try_get(1).map_err(sql_err(what.clone()))?,
            );
            // A key column is never NULL; a NULL here would be a server's
            // surprise, not a reason to stop, so it reads as empty text.
            let upper: Option<Vec<String>> = r
                .try_get::<_, Option<Vec<Option<String>>>>(2)
                .map_err(sql_err(what))?
                .map(|v| v.into_iter().map(Option::unwrap_or_default).collect());
            // The last chunk reaches `to` (open upwards when None), so the
            // target's extra rows there are counted too.
            let last = s.0 < rows;
            let upper = if last { to.clone() } else { upper };
            let upper_cond = match &upper {
                Some(u) => format!(" AND {}", self.bound("<=", u)),
                None => String::new(),
            };
            let tgt_sql = format!(
                "SELECT count(*), {HASH_SUM} FROM (SELECT {ROW_HASH} AS h FROM ONLY {quoted} x \
                   WHERE {lower_cond}{upper_cond}) c"
            );
            let t = chunk(
                self.tgt,
                &tgt_sql,
                format!("checksumming {table} on the target"),
            )
            .await?;
            self.progress.add_rows(s.0.max(t.0));
            let next = upper.clone();
            out.push(Chunk {
                lower: lower.clone(),
                upper,
                source: s,
                target: t,
            });
            if last {
                return Ok(out);
            }
            if self.pace > 0.0 {
                tokio::time::sleep(started.elapsed().mul_f64(self.pace)).await;
            }
            lower = next;
        }
    }

    /// The pieces of a differing chunk that differ, cut down step by step
    /// (each step one scan of the range in [`NARROW_PIECES`] pieces) to
    /// [`NARROW_TO_ROWS`] source rows, while they are few.
    async fn narrow(&self, c: &Chunk, rows: i64) -> Result<Vec<Chunk>, VerifyError> {
        let mut size = rows;
        let mut found = vec![Chunk {
            lower: c.lower.clone(),
            upper: c.upper.clone(),
            source: c.source.clone(),
            target: c.target.clone(),
        }];
        while size > NARROW_TO_ROWS {
            size = (size / NARROW_PIECES).max(NARROW_TO_ROWS);
            let mut next = Vec::new();
            for f in &found {
                let pieces = self.chunks(f.lower.clone(), f.upper.clone(), size).await?;
                next.extend(pieces.into_iter().filter(Chunk::differs));
            }
            if next.is_empty() || next.len() > NARROW_MAX_PIECES {
                break;
            }
            found = next;
        }
        Ok(found)
    }
}

/// `(v1::type1, v2::type2)` from key values as text.
fn key_literal(types: &[String], values: &[String]) -> String {
    let parts: Vec<String> = types
        .iter()
        .zip(values)
        .map(|(ty, v)| format!("{}::{ty}", quote_literal(v)))
        .collect();
    format!("({})", parts.join(", "))
}

async fn chunk(c: &Client, sql: &str, what: String) -> Result<(i64, String), VerifyError> {
    let r = c.query_one(sql, &[]).await.map_err(sql_err(what.clone()))?;
    Ok((
        r.try_get(0).map_err(sql_err(what.clone()))?,
        r.try_get(1).map_err(sql_err(what))?,
    ))
}

/// The rows of a chunk in words: keys above `lower` (exclusive) up to
/// `upper` (inclusive), either side open when None; no key or both open
/// is the whole table.
pub(super) fn key_range(
    names: &[String],
    lower: Option<&[String]>,
    upper: Option<&[String]>,
) -> String {
    if names.is_empty() || (lower.is_none() && upper.is_none()) {
        return "the whole table".into();
    }
    let tuple = |items: Vec<String>| format!("({})", items.join(", "));
    let mut s = format!(
        "rows with {}",
        tuple(names.iter().map(|n| shown_name(n)).collect())
    );
    if let Some(l) = lower {
        s.push_str(" above ");
        s.push_str(&tuple(l.iter().map(|v| shown_value(v)).collect()));
    }
    if let Some(u) = upper {
        s.push_str(" up to ");
        s.push_str(&tuple(u.iter().map(|v| shown_value(v)).collect()));
    }
    s
}

/// `1 row`, `N rows`.
fn rows(n: i64) -> String {
    if n == 1 {
        "1 row".into()
    } else {
        format!("{n} rows")
    }
}

/// `<range> differ: source N rows, target M` (or the same count, other content).
pub(super) fn differs(range: &str, s: i64, t: i64) -> String {
    let verb = if range == "the whole table" {
        "differs"
    } else {
        "differ"
    };
    if s == t {
        format!("{range} {verb} in content ({} on each side)", rows(s))
    } else {
        format!("{range} {verb}: source {}, target {t}", rows(s))
    }
}

/// The detail of a mismatch: its first ranges, and how many more there are.
fn summary(ranges: &[String], more: usize) -> Option<String> {
    const SHOWN: usize = 3;
    let (first, rest) = ranges.split_at(ranges.len().min(SHOWN));
    if first.is_empty() {
        return None;
    }
    let mut s = first.join("; ");
    let others = rest.len() + more;
    if others > 0 {
        s.push_str(&format!("; and {others} more range(s)"));
    }
    Some(s)
}

/// A column name as written in SQL, quoted only when it must be.
fn shown_name(n: &str) -> String {
    let plain = n
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        n.to_string()
    } else {
        escape_controls(&quote_ident(&shorten(n)))
    }
}

/// A key value's text: a number bare, anything else as an SQL literal with
/// control characters escaped (so a report stays one line), long values cut.
fn shown_value(v: &str) -> String {
    let digits = v.strip_prefix('-').unwrap_or(v);
    let numeric = !digits.is_empty()
        && digits.len() <= SHOWN_VALUE_CHARS
        && digits.split_once('.').map_or_else(
            || digits.chars().all(|c| c.is_ascii_digit()),
            |(i, f)| {
                !i.is_empty()
                    && !f.is_empty()
                    && (i.chars().chain(f.chars())).all(|c| c.is_ascii_digit())
            },
        );
    if numeric {
        v.to_string()
    } else {
        escape_controls(&quote_literal(&shorten(v)))
    }
}

fn shorten(v: &str) -> String {
    match v.char_indices().nth(SHOWN_VALUE_CHARS) {
        Some((at, _)) => format!("{}…", &v[..at]),
        None => v.to_string(),
    }
}

fn escape_controls(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_range_names_its_key_and_bounds() {
        let id = v(&["id"]);
        assert_eq!(
            key_range(&id, Some(&v(&["1000"])), Some(&v(&["2000"]))),
            "rows with (id) above (1000) up to (2000)"
        );
        assert_eq!(
            key_range(&id, None, Some(&v(&["1000"]))),
            "rows with (id) up to (1000)"
        );
        assert_eq!(
            key_range(&id, Some(&v(&["-2.5"])), None),
            "rows with (id) above (-2.5)"
        );
        assert_eq!(key_range(&id, None, None), "the whole table");
        assert_eq!(key_range(&[], None, None), "the whole table");
        assert_eq!(
            key_range(
                &v(&["tenant", "Order No"]),
                Some(&v(&["7", "a'b"])),
                Some(&v(&["7", "2024-01-01 00:00:00+00"]))
            ),
            r#"rows with (tenant, "Order No") above (7, 'a''b') up to (7, '2024-01-01 00:00:00+00')"#
        );
    }

    #[test]
    fn key_values_are_rendered_safely() {
        assert_eq!(shown_value("12"), "12");
        assert_eq!(shown_value("-12.50"), "-12.50");
        // Not numbers: quoted.
        for (raw, shown) in [
            ("1e5", "'1e5'"),
            ("1.", "'1.'"),
            (".5", "'.5'"),
            ("-", "'-'"),
            ("", "''"),
            ("NaN", "'NaN'"),
            ("1; DROP TABLE t", "'1; DROP TABLE t'"),
            ("line\nbreak\t\u{1b}", "'line\\nbreak\\t\\u{1b}'"),
        ] {
            assert_eq!(shown_value(raw), shown, "{raw:?}");
        }
        let long = "é".repeat(100);
        let shown = shown_value(&long);
        assert_eq!(shown, format!("'{}…'", "é".repeat(SHOWN_VALUE_CHARS)));
        assert_eq!(shown_name("Weird\"col\n"), "\"Weird\"\"col\\n\"");
        assert_eq!(shown_name("plain_1"), "plain_1");
        assert_eq!(shown_name("1st"), "\"1st\"");
    }

    #[test]
    fn a_difference_says_counts_or_content() {
        assert_eq!(
            differs("rows with (id) up to (10)", 10, 9),
            "rows with (id) up to (10) differ: source 10 rows, target 9"
        );
        assert_eq!(
            differs("the whole table", 3, 3),
            "the whole table differs in content (3 rows on each side)"
        );
        assert_eq!(
            differs("the whole table", 1, 0),
            "the whole table differs: source 1 row, target 0"
        );
        let r = v(&["a", "b", "c", "d"]);
        assert_eq!(summary(&r, 2).unwrap(), "a; b; c; and 3 more range(s)");
        assert_eq!(summary(&r[..1], 0).unwrap(), "a");
        assert_eq!(summary(&[], 0), None);
    }
}
