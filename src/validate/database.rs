//! Per-database checks: existence on both sides against `overwrite`, encoding
//! and locale availability on the target, then (over one source connection)
//! the checks of the objects inside the database.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use super::objects;
use super::server::{Server, connect_error_text, open, query_failed};
use super::{Check, TableFilter};
use crate::config::MigrationConfig;
use crate::db::{quote_ident, quote_literal};

/// A database as listed in `pg_database`.
#[derive(Clone, Debug)]
pub(crate) struct DbInfo {
    pub allow_conn: bool,
    pub encoding: String,
    pub collate: String,
    pub ctype: String,
    /// `c` libc, `i` ICU, `b` builtin.
    pub provider: String,
    /// The ICU / builtin locale, if the provider is not libc.
    pub locale: Option<String>,
    /// The configured user owns it (or is a member of its owner).
    pub owned: bool,
}

/// What the target server can install: extension name → available versions.
pub(crate) type Available = HashMap<String, Vec<String>>;

/// Server-wide facts loaded once, shared by the per-database checks.
pub(crate) struct Environment<'a> {
    pub m: &'a MigrationConfig,
    pub source: Option<&'a Server>,
    pub target: Option<&'a Server>,
    pub source_dbs: Option<HashMap<String, DbInfo>>,
    pub target_dbs: Option<HashMap<String, DbInfo>>,
    pub available: Option<Available>,
    pub filter: TableFilter,
    /// Target databases that hold this migration's own (possibly partial)
    /// copy, from its persisted state: a resumed migration recreates or
    /// keeps them, so they are not "somebody else's data".
    pub own_copies: HashSet<String>,
    /// Locale probes run a transaction on the shared target connection: one at a time.
    probe_lock: tokio::sync::Mutex<()>,
    /// Failed rows from loading the facts above.
    pub checks: Vec<Check>,
}

impl<'a> Environment<'a> {
    pub async fn load(
        m: &'a MigrationConfig,
        source: Option<&'a Server>,
        target: Option<&'a Server>,
    ) -> Environment<'a> {
        let mut checks = Vec::new();
        let source_dbs = match source {
            Some(s) => match list_databases(s).await {
                Ok(d) => Some(d),
                Err(e) => {
                    checks.push(query_failed("databases", "source", e));
                    None
                }
            },
            None => None,
        };
        let target_dbs = match target {
            Some(t) => match list_databases(t).await {
                Ok(d) => Some(d),
                Err(e) => {
                    checks.push(query_failed("databases", "target", e));
                    None
                }
            },
            None => None,
        };
        let available = match target {
            Some(t) => match available_extensions(&t.client).await {
                Ok(a) => Some(a),
                Err(e) => {
                    checks.push(query_failed("extensions", "target", e));
                    None
                }
            },
            None => None,
        };
        Environment {
            m,
            source,
            target,
            source_dbs,
            target_dbs,
            available,
            filter: TableFilter::from_migration(m),
            own_copies: HashSet::new(),
            probe_lock: tokio::sync::Mutex::new(()),
            checks,
        }
    }

    /// Every check for database `db`, in a stable order.
    pub(crate) async fn check_database(&self, db: &str) -> Vec<Check> {
        let mut out = Vec::new();
        let src = self.source_dbs.as_ref().map(|d| d.get(db));
        match src {
            None => {} // source unreachable or unlisted: already reported
            Some(None) => {
                out.push(Check::failed(
                    "database_on_source",
                    db,
                    format!("database {db} does not exist on the source"),
                    format!("remove \"{db}\" from [migration] databases, or fix its spelling"),
                ));
            }
            Some(Some(info)) if !info.allow_conn => {
                out.push(Check::failed(
                    "database_on_source",
                    db,
                    format!("database {db} does not allow connections (datallowconn = false)"),
                    format!(
                        "on the source: ALTER DATABASE {} ALLOW_CONNECTIONS true;",
                        quote_ident(db)
                    ),
                ));
            }
            Some(Some(info)) => {
                out.push(Check::succeeded(
                    "database_on_source",
                    db,
                    format!(
                        "exists (encoding {}, collate {}, ctype {})",
                        info.encoding, info.collate, info.ctype
                    ),
                ));
            }
        }
        // Nothing more to say about a database the source cannot provide;
        // with the source unreachable, the target side is still worth checking.
        let Some(info) = src.flatten().filter(|i| i.allow_conn) else {
            if src.is_none() {
                out.extend(self.target_database_check(db, None).await);
            }
            return out;
        };
        out.extend(self.target_database_check(db, Some(info)).await);
        out.extend(self.locale_check(db, info).await);
        out.extend(self.source_objects(db).await);
        out
    }

    /// Existence on the target against `overwrite`.
    async fn target_database_check(&self, db: &str, src: Option<&DbInfo>) -> Vec<Check> {
        const NAME: &str = "database_on_target";
        let (Some(t), Some(dbs)) = (self.target, self.target_dbs.as_ref()) else {
            return vec![];
        };
        let Some(existing) = dbs.get(db) else {
            return vec![Check::succeeded(
                NAME,
                db,
                "does not exist on the target; it will be created",
            )];
        };
        if self.own_copies.contains(db) {
            return vec![Check::succeeded(
                NAME,
                db,
                "holds this migration's own copy from before a restart; an interrupted copy is recreated, a finished one kept",
            )];
        }
        if self.m.overwrite {
            if !(t.superuser || existing.owned) {
                return vec![Check::failed(
                    NAME,
                    db,
                    format!(
                        "exists on the target and overwrite = true, but user {} does not own it and cannot drop it",
                        t.user
                    ),
                    format!(
                        "on the target: ALTER DATABASE {} OWNER TO {};",
                        quote_ident(db),
                        quote_ident(&t.user)
                    ),
                )];
            }
            return vec![Check::warning(
                NAME,
                db,
                "exists on the target; overwrite = true, so it will be dropped and recreated (its current contents are lost)",
                format!(
                    "keep overwrite = true only if the target's {db} may be discarded; otherwise set overwrite = false"
                ),
            )];
        }
        let mut out = vec![self.target_contents_check(t, db, existing).await];
        if let Some(s) = src {
            out.push(existing_locale_mismatch(db, s, existing));
        }
        out
    }

    /// overwrite = false: an existing database is only usable when empty.
    async fn target_contents_check(&self, t: &Server, db: &str, existing: &DbInfo) -> Check {
        const NAME: &str = "database_on_target";
        let fix = format!(
            "set overwrite = true in [migration] to drop and recreate it, or on the target: DROP DATABASE {};",
            quote_ident(db)
        );
        if !existing.allow_conn {
            return Check::failed(
                NAME,
                db,
                "exists on the target and does not allow connections",
                fix,
            );
        }
        let client = match open(
            &t.endpoint.with_dbname(db),
            &format!("target database {db}"),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                return Check::failed(
                    NAME,
                    db,
                    format!(
                        "exists on the target, but its contents cannot be inspected: {}",
                        connect_error_text(&e)
                    ),
                    fix,
                );
            }
        };
        match target_contents(&client).await {
            Ok(c) if c.is_empty() => Check::succeeded(
                NAME,
                db,
                "exists on the target and is empty; it will be used as is",
            ),
            Ok(c) => Check::failed(
                NAME,
                db,
                format!(
                    "exists on the target and is not empty ({}); overwrite = false",
                    c.describe()
                ),
                fix,
            ),
            Err(e) => query_failed(NAME, db, e),
        }
    }

    /// The source database's encoding and locale can be used on the target.
    async fn locale_check(&self, db: &str, info: &DbInfo) -> Vec<Check> {
        const NAME: &str = "encoding_locale";
        let Some(t) = self.target else {
            return vec![];
        };
        let desc = describe_locale(info);
        let mut missing = Vec::new();
        let _one_at_a_time = self.probe_lock.lock().await;
        for (provider, locale) in locales_to_probe(info) {
            match probe_locale(&t.client, provider, &locale).await {
                Ok(()) => {}
                Err(msg) => missing.push(format!("{locale} ({provider}): {msg}")),
            }
        }
        if missing.is_empty() {
            return vec![Check::succeeded(
                NAME,
                db,
                format!("{desc}; available on the target"),
            )];
        }
        vec![Check::failed(
            NAME,
            db,
            format!(
                "{desc}; not available on the target: {}",
                missing.join("; ")
            ),
            format!(
                "install the locale on the target host (Debian: add it to /etc/locale.gen, run locale-gen) and restart the target server, \
                 or on the source change the database's locale; the target database is created with ENCODING {} LC_COLLATE {} LC_CTYPE {}",
                quote_literal(&info.encoding),
                quote_literal(&info.collate),
                quote_literal(&info.ctype)
            ),
        )]
    }

    /// Checks that look inside the source database, over one connection.
    async fn source_objects(&self, db: &str) -> Vec<Check> {
        let Some(s) = self.source else {
            return vec![];
        };
        let client = match open(
            &s.endpoint.with_dbname(db),
            &format!("source database {db}"),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                return vec![Check::failed(
                    "database_connection",
                    db,
                    format!(
                        "{}; the checks inside this database were skipped",
                        connect_error_text(&e)
                    ),
                    format!(
                        "allow user {} to connect to {db} on the source (GRANT CONNECT ON DATABASE {} TO {}; and pg_hba.conf)",
                        s.user,
                        quote_ident(db),
                        quote_ident(&s.user)
                    ),
                )];
            }
        };
        let ctx = objects::DbContext {
            db,
            client: &client,
            source: s,
            target: self.target,
            available: self.available.as_ref(),
            filter: &self.filter,
            mode: self.m.mode,
        };
        objects::check_objects(&ctx).await
    }
}

async fn list_databases(s: &Server) -> Result<HashMap<String, DbInfo>, tokio_postgres::Error> {
    let sql = crate::pg::database::list_databases_sql(crate::pg::Version(s.version_num));
    let rows = s.client.query(&sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                DbInfo {
                    allow_conn: r.get(1),
                    encoding: r.get(2),
                    collate: r.get(3),
                    ctype: r.get(4),
                    provider: r.get(5),
                    locale: r.get(6),
                    owned: r.get(8),
                },
            )
        })
        .collect())
}

async fn available_extensions(c: &Client) -> Result<Available, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT name::text, version FROM pg_available_extension_versions",
            &[],
        )
        .await?;
    let mut out: Available = HashMap::new();
    for r in rows {
        out.entry(r.get(0)).or_default().push(r.get(1));
    }
    Ok(out)
}

/// What an existing target database already holds.
struct Contents {
    relations: i64,
    functions: i64,
    extensions: i64,
    schemas: i64,
}

impl Contents {
    fn is_empty(&self) -> bool {
        self.relations + self.functions + self.extensions + self.schemas == 0
    }
    fn describe(&self) -> String {
        format!(
            "{} tables/views/sequences, {} functions, {} extensions, {} schemas besides public",
            self.relations, self.functions, self.extensions, self.schemas
        )
    }
}

async fn target_contents(c: &Client) -> Result<Contents, tokio_postgres::Error> {
    let user_ns = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";
    let row = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE c.relkind IN ('r','p','v','m','S','f') AND {user_ns}), \
                        (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {user_ns} \
                         AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')), \
                        (SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql'), \
                        (SELECT count(*) FROM pg_namespace n WHERE {user_ns} AND n.nspname <> 'public')"
            ),
            &[],
        )
        .await?;
    Ok(Contents {
        relations: row.get(0),
        functions: row.get(1),
        extensions: row.get(2),
        schemas: row.get(3),
    })
}

fn describe_locale(info: &DbInfo) -> String {
    let mut s = format!(
        "encoding {}, collate {}, ctype {}",
        info.encoding, info.collate, info.ctype
    );
    if let (Some(l), p) = (&info.locale, info.provider.as_str())
        && p != "c"
    {
        s.push_str(&format!(", {} locale {l}", provider_name(p)));
    }
    s
}

fn provider_name(p: &str) -> &'static str {
    match p {
        "i" => "icu",
        "b" => "builtin",
        _ => "libc",
    }
}

/// The (provider, locale) pairs the target must know; C and POSIX always exist.
fn locales_to_probe(info: &DbInfo) -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = Vec::new();
    for l in [&info.collate, &info.ctype] {
        if !matches!(l.as_str(), "C" | "POSIX" | "") && !out.iter().any(|(_, x)| x == l) {
            out.push(("libc", l.clone()));
        }
    }
    if let Some(l) = &info.locale
        && info.provider != "c"
    {
        out.push((provider_name(&info.provider), l.clone()));
    }
    out
}

/// Why the target cannot use a locale.
#[derive(Debug, thiserror::Error)]
enum LocaleError {
    /// The server refused the probe collation (its message says why).
    #[error("{0}")]
    Refused(String),
    /// Neither the probe nor the target's imported collations know it.
    #[error("no collation for it in the target's pg_collation")]
    NotImported,
    #[error("{}", crate::db::describe(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// Asks the target to load a locale by creating (and rolling back) a
/// temporary collation: the server itself reports whether the locale exists.
async fn probe_locale(c: &Client, provider: &str, locale: &str) -> Result<(), LocaleError> {
    let sql = format!(
        "CREATE COLLATION pg_temp.pgshift_locale_probe (provider = {provider}, locale = {})",
        quote_literal(locale)
    );
    c.batch_execute("BEGIN").await?;
    let result = c.batch_execute(&sql).await;
    let _ = c.batch_execute("ROLLBACK").await;
    match result {
        Ok(()) => Ok(()),
        Err(e) => match e.as_db_error() {
            // No TEMP privilege: fall back to the collations the target imported.
            Some(d) if d.code().code() == "42501" => lookup_collation(c, locale).await,
            Some(d) => Err(LocaleError::Refused(d.message().to_string())),
            None => Err(e.into()),
        },
    }
}

async fn lookup_collation(c: &Client, locale: &str) -> Result<(), LocaleError> {
    let found = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_collation WHERE lower(replace(collcollate, '-', '')) = lower(replace($1, '-', '')))",
            &[&locale],
        )
        .await?;
    if found.get::<_, bool>(0) {
        Ok(())
    } else {
        Err(LocaleError::NotImported)
    }
}

/// An existing target database (kept because overwrite = false) must match.
fn existing_locale_mismatch(db: &str, src: &DbInfo, tgt: &DbInfo) -> Check {
    const NAME: &str = "target_database_locale";
    if src.encoding != tgt.encoding {
        return Check::failed(
            NAME,
            db,
            format!(
                "the existing target database has encoding {}, the source {}",
                tgt.encoding, src.encoding
            ),
            format!(
                "on the target: DROP DATABASE {q}; CREATE DATABASE {q} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}; (or set overwrite = true)",
                quote_literal(&src.encoding),
                quote_literal(&src.collate),
                quote_literal(&src.ctype),
                q = quote_ident(db)
            ),
        );
    }
    if src.collate != tgt.collate || src.ctype != tgt.ctype || src.locale != tgt.locale {
        return Check::warning(
            NAME,
            db,
            format!(
                "the existing target database sorts differently: collate {} / ctype {} on the target, {} / {} on the source",
                tgt.collate, tgt.ctype, src.collate, src.ctype
            ),
            "set overwrite = true so the database is recreated with the source's locale, or accept different text ordering",
        );
    }
    Check::succeeded(
        NAME,
        db,
        format!(
            "the existing target database matches: {}",
            describe_locale(tgt)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(enc: &str, collate: &str, ctype: &str) -> DbInfo {
        DbInfo {
            allow_conn: true,
            encoding: enc.into(),
            collate: collate.into(),
            ctype: ctype.into(),
            provider: "c".into(),
            locale: None,
            owned: true,
        }
    }

    #[test]
    fn probes_skip_c_and_dedupe() {
        assert!(locales_to_probe(&info("SQL_ASCII", "C", "POSIX")).is_empty());
        let p = locales_to_probe(&info("UTF8", "en_US.UTF-8", "en_US.UTF-8"));
        assert_eq!(p, vec![("libc", "en_US.UTF-8".to_string())]);
        let mut icu = info("UTF8", "C", "C");
        icu.provider = "i".into();
        icu.locale = Some("de-DE".into());
        assert_eq!(locales_to_probe(&icu), vec![("icu", "de-DE".to_string())]);
    }

    #[test]
    fn existing_database_must_match_encoding() {
        let c = existing_locale_mismatch("app", &info("UTF8", "C", "C"), &info("LATIN1", "C", "C"));
        assert_eq!(c.status, super::super::Status::Failed);
        assert!(c.action.unwrap().contains("ENCODING 'UTF8'"));
        let c = existing_locale_mismatch(
            "app",
            &info("UTF8", "C", "C"),
            &info("UTF8", "C.UTF-8", "C"),
        );
        assert_eq!(c.status, super::super::Status::Warning);
    }
}
