//! Checks of the objects inside one source database: publication privilege,
//! extensions, replica identity, and what logical replication does not carry
//! (unlogged tables, large objects, materialized views).

use std::cmp::Ordering;

use tokio_postgres::Client;

use super::database::Available;
use super::server::{PRELOAD_EXTENSIONS, Server, preload_action, query_failed, unreadable_preload};
use super::{Check, TableFilter};
use crate::config::MigrationMode;
use crate::db::{quote_ident, quote_literal};

/// At most this many statements are spelled out in one action; the rest are counted.
const MAX_LISTED: usize = 50;

pub(crate) struct DbContext<'a> {
    pub db: &'a str,
    pub client: &'a Client,
    pub source: &'a Server,
    pub target: Option<&'a Server>,
    pub available: Option<&'a Available>,
    pub filter: &'a TableFilter,
    pub mode: MigrationMode,
}

/// A relation of the source database, with what the checks need to know.
#[derive(Debug)]
struct Relation {
    /// `schema.table`, quoted for SQL.
    qualified: String,
    /// relkind: `r` table, `m` materialized view.
    kind: String,
    unlogged: bool,
    replident: String,
    has_pk: bool,
    has_ident_index: bool,
    /// A unique, non-partial index on NOT NULL columns that could serve as identity.
    candidate_index: Option<String>,
    owned: bool,
}

impl Relation {
    /// Can UPDATE and DELETE on it be replicated?
    fn identity_usable(&self) -> bool {
        match self.replident.as_str() {
            "f" => true,
            "d" => self.has_pk,
            "i" => self.has_ident_index,
            _ => false,
        }
    }

    /// The statement that gives it a usable replica identity.
    fn identity_fix(&self) -> String {
        match (&self.candidate_index, self.replident.as_str()) {
            (_, "n") if self.has_pk => {
                format!("ALTER TABLE {} REPLICA IDENTITY DEFAULT;", self.qualified)
            }
            (Some(idx), _) => format!(
                "ALTER TABLE {} REPLICA IDENTITY USING INDEX {};",
                self.qualified,
                quote_ident(idx)
            ),
            (None, _) => format!("ALTER TABLE {} REPLICA IDENTITY FULL;", self.qualified),
        }
    }
}

pub(crate) async fn check_objects(ctx: &DbContext<'_>) -> Vec<Check> {
    let mut out = Vec::new();
    match load_relations(ctx).await {
        Ok(rels) => {
            out.push(publication_check(ctx, &rels).await);
            out.extend(extension_checks(ctx).await);
            out.push(replica_identity_check(ctx, &rels));
            out.push(unlogged_check(ctx, &rels));
            out.push(large_objects_check(ctx).await);
            out.push(matview_check(ctx, &rels));
            out.push(super::types::column_types_check(ctx).await);
        }
        Err(e) => {
            out.push(query_failed("tables", ctx.db, e));
            out.extend(extension_checks(ctx).await);
        }
    }
    out
}

/// Tables and materialized views the migration carries (filters applied;
/// a partition follows its partitioned table's name).
async fn load_relations(ctx: &DbContext<'_>) -> Result<Vec<Relation>, tokio_postgres::Error> {
    let rows = ctx
        .client
        .query(
            &crate::pg::catalog::relations_sql(crate::pg::Version(ctx.source.version_num)),
            &[],
        )
        .await?;
    let mut out = Vec::new();
    for r in rows {
        let (schema, name): (String, String) = (r.get(0), r.get(1));
        let root: (Option<String>, Option<String>) = (r.get(9), r.get(10));
        let included = match root {
            (Some(rs), Some(rt)) => ctx.filter.includes(&rs, &rt),
            _ => ctx.filter.includes(&schema, &name),
        };
        if !included {
            continue;
        }
        out.push(Relation {
            qualified: format!("{}.{}", quote_ident(&schema), quote_ident(&name)),
            kind: r.get(2),
            unlogged: r.get(3),
            replident: r.get(4),
            has_pk: r.get(5),
            has_ident_index: r.get(6),
            candidate_index: r.get(7),
            owned: r.get(8),
        });
    }
    Ok(out)
}

/// A publication needs CREATE on the database and ownership of every table;
/// FOR ALL TABLES needs a superuser.
async fn publication_check(ctx: &DbContext<'_>, rels: &[Relation]) -> Check {
    const NAME: &str = "publication_privilege";
    let s = ctx.source;
    if ctx.mode == MigrationMode::Offline {
        return Check::succeeded(NAME, ctx.db, "offline mode creates no publication");
    }
    if s.superuser {
        return Check::succeeded(
            NAME,
            ctx.db,
            format!("user {} is a superuser and may create publications", s.user),
        );
    }
    let create: bool = match ctx
        .client
        .query_one(
            "SELECT has_database_privilege(current_database(), 'CREATE')",
            &[],
        )
        .await
    {
        Ok(r) => r.get(0),
        Err(e) => return query_failed(NAME, ctx.db, e),
    };
    let user = quote_ident(&s.user);
    let not_owned: Vec<&Relation> = rels.iter().filter(|r| r.kind == "r" && !r.owned).collect();
    let mut fixes = Vec::new();
    if !create {
        fixes.push(format!(
            "GRANT CREATE ON DATABASE {} TO {user};",
            quote_ident(ctx.db)
        ));
    }
    fixes.extend(
        not_owned
            .iter()
            .take(MAX_LISTED)
            .map(|r| format!("ALTER TABLE {} OWNER TO {user};", r.qualified)),
    );
    if fixes.is_empty() {
        return Check::succeeded(
            NAME,
            ctx.db,
            format!(
                "user {} owns all tables and may create a publication listing them (FOR ALL TABLES would need a superuser)",
                s.user
            ),
        );
    }
    let mut found = format!("user {} is not a superuser", s.user);
    if !create {
        found.push_str(&format!(" and has no CREATE on database {}", ctx.db));
    }
    if !not_owned.is_empty() {
        found.push_str(&format!(
            "; it does not own {} table(s): {}",
            not_owned.len(),
            list_names(not_owned.iter().map(|r| r.qualified.as_str()))
        ));
    }
    Check::failed(
        NAME,
        ctx.db,
        found,
        format!(
            "connect to the source as a superuser, or on the source database {}:\n{}{}",
            ctx.db,
            fixes.join("\n"),
            more(not_owned.len())
        ),
    )
}

/// Installed extensions must be installable on the target, and those that
/// need a preloaded library must find it there.
async fn extension_checks(ctx: &DbContext<'_>) -> Vec<Check> {
    let rows = match ctx
        .client
        .query(
            "SELECT extname::text, extversion FROM pg_extension ORDER BY 1",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => return vec![query_failed("extensions", ctx.db, e)],
    };
    let installed: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut out = Vec::new();
    if let Some(avail) = ctx.available {
        out.push(availability_check(ctx.db, &installed, avail));
    }
    if let Some(t) = ctx.target {
        out.push(preload_check(ctx.db, &installed, t));
    }
    out
}

fn availability_check(db: &str, installed: &[(String, String)], avail: &Available) -> Check {
    const NAME: &str = "extensions";
    let mut problems = Vec::new();
    let mut newer = Vec::new();
    for (name, version) in installed {
        let Some(versions) = avail.get(name) else {
            problems.push(format!("{name} {version}: not available on the target"));
            continue;
        };
        if versions.contains(version) {
            continue;
        }
        let best = versions.iter().max_by(|a, b| compare_versions(a, b));
        match best.map(|b| (b, compare_versions(b, version))) {
            Some((b, Ordering::Greater)) => newer.push(format!("{name} {version} → {b}")),
            Some((b, _)) => problems.push(format!(
                "{name} {version}: the target offers only up to {b}"
            )),
            None => problems.push(format!(
                "{name} {version}: no installable version on the target"
            )),
        }
    }
    let summary = installed
        .iter()
        .map(|(n, v)| format!("{n} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    if !problems.is_empty() {
        return Check::failed(
            NAME,
            db,
            format!(
                "installed on the source: {summary}; {}",
                problems.join("; ")
            ),
            format!(
                "install the missing extension packages on the target server (same or newer version; Debian: apt-get install postgresql-<major>-<extension>), \
                 or remove unused ones on the source: {}",
                problems
                    .iter()
                    .filter_map(|p| p.split_whitespace().next())
                    .map(|n| format!("DROP EXTENSION {};", quote_ident(n)))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
    }
    if !newer.is_empty() {
        return Check::warning(
            NAME,
            db,
            format!(
                "installed on the source: {summary}; the target only has newer versions: {}",
                newer.join(", ")
            ),
            "the target installs the newer version; check the extensions' release notes for changed behaviour",
        );
    }
    Check::succeeded(NAME, db, format!("all available on the target: {summary}"))
}

fn preload_check(db: &str, installed: &[(String, String)], t: &Server) -> Check {
    const NAME: &str = "extension_preload";
    let needing: Vec<&str> = installed
        .iter()
        .filter_map(|(n, _)| {
            PRELOAD_EXTENSIONS
                .iter()
                .find(|(e, _)| e == n)
                .map(|(_, lib)| *lib)
        })
        .collect();
    if needing.is_empty() {
        return Check::succeeded(
            NAME,
            db,
            "no installed extension needs shared_preload_libraries",
        );
    }
    let Some(preload) = &t.preload else {
        return unreadable_preload(NAME, db, t);
    };
    let missing: Vec<String> = needing
        .iter()
        .filter(|l| !preload.iter().any(|p| p == *l))
        .map(|l| l.to_string())
        .collect();
    if missing.is_empty() {
        return Check::succeeded(
            NAME,
            db,
            format!(
                "the target preloads {} as its extensions need",
                needing.join(", ")
            ),
        );
    }
    Check::failed(
        NAME,
        db,
        format!(
            "extensions need {} in shared_preload_libraries, which the target does not load (it has {})",
            missing.join(", "),
            if preload.is_empty() {
                "none".to_string()
            } else {
                preload.join(", ")
            }
        ),
        preload_action(preload, &missing, "target"),
    )
}

/// Compares dotted versions numerically where possible (`1.10` > `1.9`).
fn compare_versions(a: &str, b: &str) -> Ordering {
    let parts = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_ascii_alphanumeric())
            .map(str::to_string)
            .collect()
    };
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(m), Ok(n)) => m.cmp(&n),
            _ => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Online mode streams UPDATE and DELETE, which needs a replica identity.
fn replica_identity_check(ctx: &DbContext<'_>, rels: &[Relation]) -> Check {
    const NAME: &str = "replica_identity";
    let tables: Vec<&Relation> = rels
        .iter()
        .filter(|r| r.kind == "r" && !r.unlogged)
        .collect();
    let bad: Vec<&Relation> = tables
        .iter()
        .copied()
        .filter(|r| !r.identity_usable())
        .collect();
    if bad.is_empty() {
        return Check::succeeded(
            NAME,
            ctx.db,
            format!(
                "all {} table(s) have a primary key or a usable replica identity",
                tables.len()
            ),
        );
    }
    let names = list_names(bad.iter().map(|r| r.qualified.as_str()));
    if ctx.mode == MigrationMode::Offline {
        return Check::succeeded(
            NAME,
            ctx.db,
            format!(
                "{} table(s) without a primary key or usable replica identity ({names}); fine in offline mode, nothing is streamed",
                bad.len()
            ),
        );
    }
    let fixes: Vec<String> = bad
        .iter()
        .take(MAX_LISTED)
        .map(|r| r.identity_fix())
        .collect();
    Check::failed(
        NAME,
        ctx.db,
        format!(
            "{} table(s) without a primary key or usable replica identity: {names}; their UPDATEs and DELETEs cannot be replicated",
            bad.len()
        ),
        format!(
            "add a primary key (ALTER TABLE … ADD PRIMARY KEY (…);) or run on the source database {}:\n{}{}",
            ctx.db,
            fixes.join("\n"),
            more(bad.len())
        ),
    )
}

fn unlogged_check(ctx: &DbContext<'_>, rels: &[Relation]) -> Check {
    const NAME: &str = "unlogged_tables";
    let unlogged: Vec<&Relation> = rels
        .iter()
        .filter(|r| r.kind == "r" && r.unlogged)
        .collect();
    if unlogged.is_empty() {
        return Check::succeeded(NAME, ctx.db, "no unlogged tables");
    }
    let names = list_names(unlogged.iter().map(|r| r.qualified.as_str()));
    if ctx.mode == MigrationMode::Offline {
        return Check::succeeded(
            NAME,
            ctx.db,
            format!(
                "{} unlogged table(s) ({names}): schema and rows are copied",
                unlogged.len()
            ),
        );
    }
    Check::warning(
        NAME,
        ctx.db,
        format!(
            "{} unlogged table(s): {names}; their schema and rows are copied once, but later changes are not streamed (unlogged tables are not logically replicated)",
            unlogged.len()
        ),
        format!(
            "to carry their changes, make them logged on the source:\n{}{}",
            unlogged
                .iter()
                .take(MAX_LISTED)
                .map(|r| format!("ALTER TABLE {} SET LOGGED;", r.qualified))
                .collect::<Vec<_>>()
                .join("\n"),
            more(unlogged.len())
        ),
    )
}

async fn large_objects_check(ctx: &DbContext<'_>) -> Check {
    const NAME: &str = "large_objects";
    let n: i64 = match ctx
        .client
        .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
        .await
    {
        Ok(r) => r.get(0),
        Err(e) => return query_failed(NAME, ctx.db, e),
    };
    if n == 0 {
        return Check::succeeded(NAME, ctx.db, "no large objects");
    }
    Check::warning(
        NAME,
        ctx.db,
        format!("{n} large object(s) in pg_largeobject: they are neither copied nor streamed"),
        format!(
            "copy them separately once writes to them stop, e.g. pg_dump --large-objects --data-only -Fc -d {db} | pg_restore --data-only -d <target {db}> \
             (PostgreSQL 15 and older: --blobs), or store their contents in bytea columns",
            db = quote_literal(ctx.db)
        ),
    )
}

fn matview_check(ctx: &DbContext<'_>, rels: &[Relation]) -> Check {
    const NAME: &str = "materialized_views";
    let views: Vec<&Relation> = rels.iter().filter(|r| r.kind == "m").collect();
    if views.is_empty() {
        return Check::succeeded(NAME, ctx.db, "no materialized views");
    }
    Check::warning(
        NAME,
        ctx.db,
        format!(
            "{} materialized view(s): {}; their definitions are carried and they are populated on the target after the copy, but not streamed",
            views.len(),
            list_names(views.iter().map(|r| r.qualified.as_str()))
        ),
        format!(
            "refresh them on the target after the cutover:\n{}{}",
            views
                .iter()
                .take(MAX_LISTED)
                .map(|r| format!("REFRESH MATERIALIZED VIEW {};", r.qualified))
                .collect::<Vec<_>>()
                .join("\n"),
            more(views.len())
        ),
    )
}

/// Up to ten names, then a count.
fn list_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let all: Vec<&str> = names.collect();
    let mut s = all.iter().take(10).copied().collect::<Vec<_>>().join(", ");
    if all.len() > 10 {
        s.push_str(&format!(" and {} more", all.len() - 10));
    }
    s
}

fn more(n: usize) -> String {
    if n > MAX_LISTED {
        format!("\n… and {} more of the same form", n - MAX_LISTED)
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("1.10", "1.9"), Ordering::Greater);
        assert_eq!(compare_versions("1.0", "1.0"), Ordering::Equal);
        assert_eq!(compare_versions("2.0.1", "2.0"), Ordering::Greater);
        assert_eq!(compare_versions("1.4", "1.10"), Ordering::Less);
    }

    #[test]
    fn availability() {
        let mut avail = Available::new();
        avail.insert("plpgsql".into(), vec!["1.0".into()]);
        avail.insert("hstore".into(), vec!["1.7".into(), "1.8".into()]);
        let ok = availability_check("app", &[("plpgsql".into(), "1.0".into())], &avail);
        assert_eq!(ok.status, super::super::Status::Succeeded);
        let missing = availability_check("app", &[("postgis".into(), "3.4.0".into())], &avail);
        assert_eq!(missing.status, super::super::Status::Failed);
        assert!(
            missing
                .action
                .unwrap()
                .contains("DROP EXTENSION \"postgis\";")
        );
        let older = availability_check("app", &[("hstore".into(), "1.9".into())], &avail);
        assert_eq!(older.status, super::super::Status::Failed);
        let newer = availability_check("app", &[("hstore".into(), "1.6".into())], &avail);
        assert_eq!(newer.status, super::super::Status::Warning);
    }

    fn rel(replident: &str, pk: bool, ident: bool, cand: Option<&str>) -> Relation {
        Relation {
            qualified: "\"public\".\"t\"".into(),
            kind: "r".into(),
            unlogged: false,
            replident: replident.into(),
            has_pk: pk,
            has_ident_index: ident,
            candidate_index: cand.map(str::to_string),
            owned: true,
        }
    }

    #[test]
    fn identity_rules() {
        assert!(rel("d", true, false, None).identity_usable());
        assert!(!rel("d", false, false, None).identity_usable());
        assert!(rel("f", false, false, None).identity_usable());
        assert!(rel("i", false, true, None).identity_usable());
        assert!(!rel("i", false, false, None).identity_usable());
        assert!(!rel("n", true, false, None).identity_usable());
        assert_eq!(
            rel("d", false, false, None).identity_fix(),
            "ALTER TABLE \"public\".\"t\" REPLICA IDENTITY FULL;"
        );
        assert_eq!(
            rel("d", false, false, Some("t_u")).identity_fix(),
            "ALTER TABLE \"public\".\"t\" REPLICA IDENTITY USING INDEX \"t_u\";"
        );
        assert_eq!(
            rel("n", true, false, None).identity_fix(),
            "ALTER TABLE \"public\".\"t\" REPLICA IDENTITY DEFAULT;"
        );
    }
}
