//! Schema copy: creating the target database, `pg_dump --schema-only`
//! pre-data before the data and post-data (indexes, constraints, triggers)
//! after it, optional roles, and sequence values.
//!
//! Dumps are taken with the migration's exported snapshot, so the schema is
//! exactly the one the data copy sees. The dump is held in memory and only
//! applied once pg_dump has succeeded: a pg_dump that dies half-way must not
//! leave a half-restored schema behind (schema dumps are small).

use std::collections::HashSet;
use std::process::Stdio;

use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio_postgres::Client;

use crate::config::Endpoint;
use crate::db::{self, DbError, quote_ident};
use crate::filter::TableFilter;
use crate::pg::Version;
use crate::pgbin::{ClientTools, ToolsFit};

mod post_data;
pub(crate) use post_data::{
    PostDataArchive, PostDataProgress, can_restore_per_table, restore_during_copy,
};

#[derive(Debug, Error)]
pub enum SchemaError {
    #[error("{0}")]
    Connect(#[from] DbError),
    #[error("{what}: {}", crate::db::describe(.source))]
    Sql {
        what: String,
        source: tokio_postgres::Error,
    },
    #[error("database `{database}` does not exist on the source")]
    NoSourceDatabase { database: String },
    #[error(
        "target database `{database}` already exists and is not empty ({found}); \
         set migration.overwrite = true to drop and recreate it, or empty it first"
    )]
    TargetNotEmpty { database: String, found: String },
    #[error("{what}: {message}")]
    Unsupported { what: String, message: String },
    #[error(
        "no pg_dump fits a PostgreSQL {source_major} source and {target} target (pg_dump must be {source_major} or newer; {target} preferred); found: {found}; {hint}"
    )]
    NoClientTools {
        source_major: i32,
        target: i32,
        found: String,
        hint: String,
    },
    #[error("{program} not found: {hint}")]
    ProgramMissing { program: String, hint: String },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("restoring the post-data of {database}: {object}: {message}")]
    PostData {
        database: String,
        /// The item that failed ("name; Type: INDEX; Schema: public"), or
        /// the batch's items when psql did not say.
        object: String,
        message: String,
    },
    #[error("the schema copy was canceled")]
    Canceled,
    #[error("{step} failed ({program} {status}): {stderr}")]
    Program {
        step: String,
        program: String,
        status: String,
        stderr: String,
    },
}

fn sql_err(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SchemaError {
    let what = what.into();
    move |source| SchemaError::Sql { what, source }
}

/// What [`prepare_target_database`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum TargetPrepared {
    /// The database did not exist and was created.
    Created,
    /// It existed and was dropped and created again (overwrite = true).
    Recreated,
    /// It existed, was empty, and is used as it is (overwrite = false).
    Reused,
}

/// Encoding, locale and owner of a source database, as the target must have them.
#[derive(Clone, Debug)]
struct DbLocale {
    locale: crate::pg::database::DbLocale,
    owner: String,
}

/// The maintenance connection of a server: its configured database, unless
/// that is the database being (re)created, which cannot be dropped while connected.
fn maintenance(ep: &Endpoint, db: &str) -> Endpoint {
    match (ep.dbname == db, db == "postgres") {
        (false, _) => ep.clone(),
        (true, false) => ep.with_dbname("postgres"),
        (true, true) => ep.with_dbname("template1"),
    }
}

async fn source_locale(source: &Endpoint, db: &str) -> Result<DbLocale, SchemaError> {
    let c = db::connect(&maintenance(source, db), "source").await?;
    let version = Version::of(&c)
        .await
        .map_err(sql_err("reading the source version"))?;
    let row = c
        .query_opt(&crate::pg::database::locale_sql(version), &[&db])
        .await
        .map_err(sql_err("reading the source database's encoding"))?
        .ok_or_else(|| SchemaError::NoSourceDatabase {
            database: db.to_string(),
        })?;
    Ok(DbLocale {
        locale: crate::pg::database::DbLocale {
            encoding: row.get(0),
            collate: row.get(1),
            ctype: row.get(2),
            provider: row.get(4),
            locale: row.get(5),
            icu_rules: row.get(6),
        },
        owner: row.get(3),
    })
}

/// Creates database `db` on the target with the source's encoding and
/// locale. An existing one is dropped and recreated when `overwrite`, else
/// reused only if it holds no user objects.
pub async fn prepare_target_database(
    target: &Endpoint,
    source: &Endpoint,
    db: &str,
    overwrite: bool,
) -> Result<TargetPrepared, SchemaError> {
    let locale = source_locale(source, db).await?;
    let admin = db::connect(&maintenance(target, db), "target").await?;
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await
        .map_err(sql_err("looking for the target database"))?
        .is_some();
    if exists && !overwrite {
        let client = db::connect(&target.with_dbname(db), "target database").await?;
        if let Some(found) = user_objects(&client).await? {
            return Err(SchemaError::TargetNotEmpty {
                database: db.to_string(),
                found,
            });
        }
        let enc: String = client
            .query_one("SELECT pg_encoding_to_char(encoding)::text FROM pg_database WHERE datname = current_database()", &[])
            .await
            .map_err(sql_err("reading the target database's encoding"))?
            .get(0);
        if enc != locale.locale.encoding {
            tracing::warn!(database = db, source = %locale.locale.encoding, target = %enc,
                "reusing an empty target database whose encoding differs from the source");
        }
        return Ok(TargetPrepared::Reused);
    }
    // Read once: dropping and creating both depend on it.
    let version = Version::of(&admin)
        .await
        .map_err(sql_err("reading the target version"))?;
    if exists {
        drop_database(&admin, version, db).await?;
    }
    create_database(&admin, version, db, &locale).await?;
    Ok(if exists {
        TargetPrepared::Recreated
    } else {
        TargetPrepared::Created
    })
}

/// A short description of the user objects in the connected database, or None.
async fn user_objects(c: &Client) -> Result<Option<String>, SchemaError> {
    // Objects created by extensions (pg_depend deptype 'e') do not count:
    // CREATE EXTENSION in the restored schema brings them anyway.
    let row = c
        .query_one(
            "WITH ext AS (SELECT objid, classid FROM pg_depend WHERE deptype = 'e'),
                  user_ns AS (SELECT oid FROM pg_namespace
                              WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'pgshift')
                                AND nspname NOT LIKE 'pg_toast%' AND nspname NOT LIKE 'pg_temp%')
             SELECT
               (SELECT count(*) FROM pg_class c WHERE c.relnamespace IN (SELECT oid FROM user_ns)
                  AND c.relkind IN ('r','p','f','v','m')
                  AND NOT EXISTS (SELECT 1 FROM ext WHERE ext.classid = 'pg_class'::regclass AND ext.objid = c.oid)),
               (SELECT count(*) FROM pg_class c WHERE c.relnamespace IN (SELECT oid FROM user_ns)
                  AND c.relkind = 'S'
                  AND NOT EXISTS (SELECT 1 FROM ext WHERE ext.classid = 'pg_class'::regclass AND ext.objid = c.oid)),
               (SELECT count(*) FROM pg_type t WHERE t.typnamespace IN (SELECT oid FROM user_ns)
                  AND t.typtype IN ('e','d','r','m','b') AND t.typelem = 0
                  AND NOT EXISTS (SELECT 1 FROM ext WHERE ext.classid = 'pg_type'::regclass AND ext.objid = t.oid)),
               (SELECT count(*) FROM pg_proc p WHERE p.pronamespace IN (SELECT oid FROM user_ns)
                  AND NOT EXISTS (SELECT 1 FROM ext WHERE ext.classid = 'pg_proc'::regclass AND ext.objid = p.oid))",
            &[],
        )
        .await
        .map_err(sql_err("checking whether the target database is empty"))?;
    let names = ["tables/views", "sequences", "types", "functions"];
    let found: Vec<String> = names
        .iter()
        .enumerate()
        .filter_map(|(i, name)| {
            let n: i64 = row.get(i);
            (n > 0).then(|| format!("{n} {name}"))
        })
        .collect();
    Ok((!found.is_empty()).then(|| found.join(", ")))
}

async fn drop_database(admin: &Client, version: Version, db: &str) -> Result<(), SchemaError> {
    // Terminating first also serves servers before 13, which lack WITH (FORCE).
    admin
        .execute(crate::pg::database::TERMINATE_SESSIONS_SQL, &[&db])
        .await
        .map_err(sql_err(format!(
            "terminating connections to target database {db}"
        )))?;
    admin
        .batch_execute(&crate::pg::database::drop_database_sql(version, db))
        .await
        .map_err(sql_err(format!("dropping target database {db}")))?;
    tracing::info!(database = db, "dropped the existing target database");
    Ok(())
}

async fn create_database(
    admin: &Client,
    version: Version,
    db: &str,
    l: &DbLocale,
) -> Result<(), SchemaError> {
    // The source's owner is kept when that role exists on the target and the
    // connected user may create objects for it.
    let owner_ok: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) \
             AND pg_has_role(current_user, (SELECT oid FROM pg_roles WHERE rolname = $1), 'MEMBER')",
            &[&l.owner],
        )
        .await
        .map_err(sql_err("checking the database owner on the target"))?
        .get(0);
    let mut sql =
        crate::pg::database::create_database_sql(version, db, &l.locale).map_err(|e| {
            SchemaError::Unsupported {
                what: format!("creating target database {db}"),
                message: e.to_string(),
            }
        })?;
    if owner_ok {
        sql.push_str(&format!(" OWNER {}", quote_ident(&l.owner)));
    }
    admin
        .batch_execute(&sql)
        .await
        .map_err(sql_err(format!("creating target database {db}")))?;
    tracing::info!(database = db, encoding = %l.locale.encoding, collate = %l.locale.collate, "created the target database");
    Ok(())
}

/// How the schema dump treats ownership and privileges.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DumpPlan {
    /// Owners and GRANTs are restored as on the source.
    pub keep_owners: bool,
    /// Roles the source's objects reference that the target lacks (or the
    /// target user cannot act as); when any, `--no-owner --no-privileges`.
    pub missing_roles: Vec<String>,
    /// The pg_dump and psql used (one directory); empty: looked up by name.
    pub tools: ClientTools,
    /// With a pg_dump newer than the target: the parameters the target
    /// knows, so the dump's SET lines for others are left out.
    #[serde(skip)]
    pub target_settings: Option<HashSet<String>>,
    /// Tables the migration leaves out (`tables` / `exclude_tables`), as
    /// `"schema"."table"`: pg_dump does not create them on the target.
    pub excluded_tables: Vec<String>,
}

impl DumpPlan {
    /// SQL from this plan's pg_dump or pg_restore as the target can run it:
    /// with a pg_dump newer than the target, without the SET lines for
    /// parameters the target does not have.
    /// Returns the SQL and the parameters left out.
    fn for_target(&self, sql: Vec<u8>) -> (Vec<u8>, Vec<String>) {
        let sql = without_ddl_capture(sql);
        match &self.target_settings {
            Some(known) => crate::pg::settings::drop_unknown_settings(&sql, known),
            None => (sql, Vec::new()),
        }
    }

    /// The path of client program `name` to run.
    fn program(&self, name: &str) -> String {
        if self.tools.dir.as_os_str().is_empty() {
            name.to_string()
        } else {
            self.tools.program(name).to_string_lossy().into_owned()
        }
    }
}

/// The client programs for a `source` → `target` migration: `configured`
/// (`[migration] pg_bin`) when set, else the best fit found
/// ([`crate::pgbin::choose_client_tools`]).
pub fn client_tools(
    source: Version,
    target: Version,
    configured: Option<&std::path::Path>,
) -> Result<(ClientTools, ToolsFit), SchemaError> {
    let found = match configured {
        Some(dir) => crate::pgbin::client_tool_dirs(None)
            .into_iter()
            .filter(|c| c.dir == dir)
            .chain(
                // Not among the searched places: look at it alone.
                crate::pgbin::program_version(&dir.join("pg_dump")).map(|version| ClientTools {
                    dir: dir.to_path_buf(),
                    version,
                    origin: "[migration] pg_bin".into(),
                }),
            )
            .take(1)
            .collect(),
        None => crate::pgbin::client_tool_dirs(None),
    };
    crate::pgbin::choose_client_tools(&found, source.major(), target.major()).ok_or_else(|| {
        SchemaError::NoClientTools {
            source_major: source.major(),
            target: target.major(),
            found: describe_found(&found),
            hint: crate::pgbin::client_tools_hint(target.major()),
        }
    })
}

/// "pg_dump 15 (…), pg_dump 16 (…)" or "none".
fn describe_found(found: &[ClientTools]) -> String {
    if found.is_empty() {
        "none (PG_BIN, [migration] pg_bin, PATH, /usr/lib/postgresql/*/bin, the fetch cache)".into()
    } else {
        found
            .iter()
            .map(ClientTools::describe)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The source's and the target's versions, which choose the client
/// programs (read in this one place for the dump and the roles copy).
async fn server_versions(src: &Client, tgt: &Client) -> Result<(Version, Version), SchemaError> {
    let sv = Version::of(src)
        .await
        .map_err(sql_err("reading the source version"))?;
    let tv = Version::of(tgt)
        .await
        .map_err(sql_err("reading the target version"))?;
    Ok((sv, tv))
}

/// Decides whether owners and privileges can be kept: only when every role
/// that owns or is granted something in `db` exists on the target.
pub async fn plan_dump(
    source: &Endpoint,
    target: &Endpoint,
    db: &str,
) -> Result<DumpPlan, SchemaError> {
    plan_dump_with(source, target, db, None, &TableFilter::default()).await
}

/// [`plan_dump`] with the configured client programs' directory (`[migration]
/// pg_bin`) and the migration's table selection.
pub async fn plan_dump_with(
    source: &Endpoint,
    target: &Endpoint,
    db: &str,
    pg_bin: Option<&std::path::Path>,
    filter: &TableFilter,
) -> Result<DumpPlan, SchemaError> {
    let src = db::connect(&source.with_dbname(db), "source database").await?;
    let excluded_tables = excluded_tables(&src, filter).await?;
    // pg_shdepend records owners and grantees, except the bootstrap superuser.
    let roles: Vec<String> = src
        .query(
            "SELECT DISTINCT r.rolname::text FROM pg_shdepend d JOIN pg_roles r ON r.oid = d.refobjid \
             WHERE d.refclassid = 'pg_authid'::regclass \
               AND d.dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             UNION SELECT rolname::text FROM pg_roles WHERE oid = 10",
            &[],
        )
        .await
        .map_err(sql_err("listing the roles the source objects use"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let tgt = db::connect(&maintenance(target, db), "target").await?;
    let missing: Vec<String> = tgt
        .query(
            "SELECT r FROM unnest($1::text[]) r \
             WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \
                OR NOT pg_has_role(current_user, (SELECT oid FROM pg_roles WHERE rolname = r), 'MEMBER') \
             ORDER BY 1",
            &[&roles],
        )
        .await
        .map_err(sql_err("checking the roles on the target"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (sv, tv) = server_versions(&src, &tgt).await?;
    let (tools, fit) = client_tools(sv, tv, pg_bin)?;
    tracing::info!(database = db, tools = %tools.describe(), source = sv.major(), target = tv.major(), "schema copy programs");
    let target_settings = if fit == ToolsFit::Newer {
        let known = tgt
            .query(crate::pg::settings::KNOWN_SETTINGS_SQL, &[])
            .await
            .map_err(sql_err("listing the target's parameters"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Some(known)
    } else {
        None
    };
    if !missing.is_empty() {
        tracing::warn!(database = db, roles = ?missing,
            "roles missing on the target (or not usable by the target user): objects will be owned by the target user and GRANTs are not copied; set migration.copy_roles = true to copy roles");
    }
    Ok(DumpPlan {
        keep_owners: missing.is_empty(),
        missing_roles: missing,
        tools,
        target_settings,
        excluded_tables,
    })
}

/// The tables of the source database behind `c` that `filter` leaves out,
/// as exact pg_dump patterns (quoted: no wildcards, no case folding).
async fn excluded_tables(c: &Client, filter: &TableFilter) -> Result<Vec<String>, SchemaError> {
    if !filter.is_filtered() {
        return Ok(Vec::new());
    }
    let rows = c
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgshift') \
               AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' \
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(sql_err("listing the source tables to leave out"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .filter(|(schema, table)| !filter.includes(schema, table))
        .map(|(schema, table)| format!("{}.{}", quote_ident(&schema), quote_ident(&table)))
        .collect())
}

/// A section of `pg_dump --schema-only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Section {
    /// Types, functions, tables, sequences …: restored before the data.
    PreData,
    /// Indexes, constraints, triggers, replica identities …: restored after
    /// it (building indexes once is faster than maintaining them row by row).
    PostData,
}

impl Section {
    fn as_str(self) -> &'static str {
        match self {
            Section::PreData => "pre-data",
            Section::PostData => "post-data",
        }
    }
}

/// A schema section dumped from the source, held in memory until restored.
#[derive(Clone, Debug)]
pub struct SchemaDump {
    pub database: String,
    pub section: Section,
    pub sql: Vec<u8>,
    /// The psql that restores it (of the same installation as the pg_dump:
    /// a dump may hold meta-commands of its psql version).
    pub psql: String,
}

/// Dumps one schema section of `db` as of `snapshot`. Dumping both sections
/// up front, while the exported snapshot is still valid (a replication
/// slot's snapshot ends when streaming starts), and restoring post-data
/// after the copy keeps the whole schema at the snapshot's instant.
pub async fn dump_section(
    source: &Endpoint,
    db: &str,
    snapshot: Option<&str>,
    plan: &DumpPlan,
    section: Section,
) -> Result<SchemaDump, SchemaError> {
    let args = dump_args(snapshot, plan, section);
    let sql = run_program(
        &plan.program("pg_dump"),
        &args,
        &source.with_dbname(db),
        None,
        &format!("pg_dump {} of {db}", section.as_str()),
    )
    .await?;
    let (sql, dropped) = plan.for_target(sql);
    if !dropped.is_empty() {
        tracing::info!(database = db, parameters = ?dropped, pg_dump = %plan.tools.describe(),
            "left out of the dump: parameters the target does not have");
    }
    Ok(SchemaDump {
        database: db.to_string(),
        section,
        sql,
        psql: plan.program("psql"),
    })
}

/// A dump without pgshift's DDL capture on the source: its event
/// triggers are the database's (no schema), so `--exclude-schema=pgshift`
/// leaves them in, and their functions are not on the target.
fn without_ddl_capture(sql: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&sql);
    if !text.contains("EVENT TRIGGER pgshift_ddl_") {
        return sql;
    }
    let mut out = String::with_capacity(text.len());
    let mut skipping = false;
    for line in text.split_inclusive('\n') {
        if line.starts_with("CREATE EVENT TRIGGER pgshift_ddl_")
            || line.starts_with("ALTER EVENT TRIGGER pgshift_ddl_")
            || line.starts_with("COMMENT ON EVENT TRIGGER pgshift_ddl_")
        {
            skipping = true;
        }
        if !skipping {
            out.push_str(line);
        }
        if skipping && line.trim_end().ends_with(';') {
            skipping = false;
        }
    }
    out.into_bytes()
}

/// pg_dump's arguments for one schema section of the migration.
fn dump_args(snapshot: Option<&str>, plan: &DumpPlan, section: Section) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--schema-only".into(),
        format!("--section={}", section.as_str()),
        // The migration's own publication must not reach the target, and a
        // subscription copied there would start replicating on its own.
        "--no-publications".into(),
        "--no-subscriptions".into(),
        // pgshift's own objects on the source (the cutover marker table),
        // as copy leaves their data out.
        "--exclude-schema=pgshift".into(),
        // Tablespaces are a property of the server; managed targets have none.
        "--no-tablespaces".into(),
    ];
    if let Some(s) = snapshot {
        args.push(format!("--snapshot={s}"));
    }
    args.extend(
        plan.excluded_tables
            .iter()
            .map(|t| format!("--exclude-table={t}")),
    );
    if !plan.keep_owners {
        args.push("--no-owner".into());
        args.push("--no-privileges".into());
    }
    args
}

/// Restores a dumped section into the same-named target database, in one
/// transaction (all or nothing).
pub async fn restore_section(target: &Endpoint, dump: &SchemaDump) -> Result<(), SchemaError> {
    let started = std::time::Instant::now();
    // Index builds dominate post-data: give them memory and parallel workers.
    let options = (dump.section == Section::PostData).then_some(post_data::POST_DATA_OPTIONS);
    let psql_args: Vec<String> = [
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "--single-transaction",
        "-o",
        "/dev/null",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    run_program_with_input(
        &dump.psql,
        &psql_args,
        &target.with_dbname(&dump.database),
        options,
        dump.sql.clone(),
        &format!(
            "restoring the {} schema of {}",
            dump.section.as_str(),
            dump.database
        ),
    )
    .await?;
    tracing::info!(
        database = %dump.database,
        section = dump.section.as_str(),
        seconds = started.elapsed().as_secs_f64(),
        "schema section restored"
    );
    Ok(())
}

/// Dumps and restores the pre-data section of `db`.
pub async fn dump_restore_pre_data(
    source: &Endpoint,
    target: &Endpoint,
    db: &str,
    snapshot: Option<&str>,
    plan: &DumpPlan,
) -> Result<(), SchemaError> {
    let dump = dump_section(source, db, snapshot, plan, Section::PreData).await?;
    restore_section(target, &dump).await
}

/// Dumps and restores the post-data section of `db` (run after the data copy).
pub(crate) async fn dump_restore_post_data(
    source: &Endpoint,
    target: &Endpoint,
    db: &str,
    snapshot: Option<&str>,
    plan: &DumpPlan,
) -> Result<(), SchemaError> {
    let dump = dump_section(source, db, snapshot, plan, Section::PostData).await?;
    restore_section(target, &dump).await
}

/// Populates every materialized view of the target database `db` (the
/// schema dump carries only their definitions), in creation order — a view
/// over another is restored, and so refreshed, after it. Progress is logged
/// per view; a view that cannot be refreshed is logged and left
/// unpopulated (it does not fail the migration). Returns how many were
/// refreshed. `why` says in the log when this runs (after the copy, after
/// the switch).
pub(crate) async fn refresh_materialized_views(
    target: &Endpoint,
    db: &str,
    why: &str,
) -> Result<usize, SchemaError> {
    let c = db::connect(&target.with_dbname(db), "target").await?;
    let views: Vec<String> = c
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'm' \
             AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY c.oid",
            &[],
        )
        .await
        .map_err(sql_err("listing materialized views"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut refreshed = 0;
    for (i, view) in views.iter().enumerate() {
        let started = std::time::Instant::now();
        match c
            .batch_execute(&format!("REFRESH MATERIALIZED VIEW {view}"))
            .await
        {
            Ok(()) => {
                refreshed += 1;
                tracing::info!(
                    database = %db, view = %view, "materialized view {}/{} refreshed {why} in {:?}",
                    i + 1, views.len(), started.elapsed()
                );
            }
            Err(e) => tracing::warn!(
                database = %db, view = %view, "materialized view {}/{} left unpopulated {why}: {}",
                i + 1, views.len(), db::describe(&e)
            ),
        }
    }
    Ok(refreshed)
}

/// Result of [`copy_roles`].
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RolesReport {
    /// Roles created on the target.
    pub created: Vec<String>,
    /// Roles that already existed there and were left untouched.
    pub existing: Vec<String>,
    /// Statements the target refused (logged as warnings, not fatal).
    pub errors: Vec<String>,
}

/// Copies roles (`pg_dumpall --roles-only`) to the target. Roles that
/// already exist there are not altered (their passwords and attributes stay
/// as they are); memberships are granted where possible.
pub async fn copy_roles(source: &Endpoint, target: &Endpoint) -> Result<RolesReport, SchemaError> {
    let tgt = db::connect(target, "target").await?;
    let src = db::connect(source, "source").await?;
    let (sv, tv) = server_versions(&src, &tgt).await?;
    drop(src);
    let (tools, _) = client_tools(sv, tv, None)?;
    let (pg_dumpall, psql) = (
        tools.program("pg_dumpall").to_string_lossy().into_owned(),
        tools.program("psql").to_string_lossy().into_owned(),
    );
    let dump = match run_program(
        &pg_dumpall,
        &["--roles-only".to_string()],
        source,
        None,
        "pg_dumpall --roles-only",
    )
    .await
    {
        Ok(d) => d,
        // Managed servers do not let anyone read pg_authid.
        Err(SchemaError::Program { stderr, .. }) if stderr.contains("pg_authid") => {
            run_program(
                &pg_dumpall,
                &["--roles-only".into(), "--no-role-passwords".into()],
                source,
                None,
                "pg_dumpall --roles-only --no-role-passwords",
            )
            .await?
        }
        Err(e) => return Err(e),
    };
    let existing: HashSet<String> = tgt
        .query("SELECT rolname::text FROM pg_roles", &[])
        .await
        .map_err(sql_err("listing target roles"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let text = String::from_utf8_lossy(&dump);
    let mut report = RolesReport::default();
    let mut script = String::new();
    for line in text.lines() {
        let role = line
            .strip_prefix("CREATE ROLE ")
            .or_else(|| line.strip_prefix("ALTER ROLE "))
            .map(leading_ident);
        if let Some(role) = role {
            if existing.contains(&role) {
                if line.starts_with("CREATE ROLE ") {
                    report.existing.push(role);
                }
                continue;
            }
            if line.starts_with("CREATE ROLE ") {
                report.created.push(role);
            }
        }
        script.push_str(line);
        script.push('\n');
    }
    // Without ON_ERROR_STOP: a membership or setting the target refuses must
    // not stop the other roles; each error is reported.
    let out = run_program_output(
        &psql,
        &["-X".into(), "-q".into(), "-o".into(), "/dev/null".into()],
        target,
        None,
        script.into_bytes(),
        "restoring roles",
    )
    .await?;
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        if line.contains("ERROR:") && !line.contains("already exists") {
            tracing::warn!("copying roles: {line}");
            report.errors.push(line.to_string());
        }
    }
    Ok(report)
}

/// The identifier at the start of `s` (quoted or bare), unquoted.
fn leading_ident(s: &str) -> String {
    if let Some(rest) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    out.push('"');
                } else {
                    break;
                }
            } else {
                out.push(c);
            }
        }
        out
    } else {
        s.split([' ', ';']).next().unwrap_or("").to_string()
    }
}

/// A PostgreSQL client program connected to `ep` through libpq environment
/// variables, so the password never appears on a command line.
///
/// `program` is a path (from the chosen [`ClientTools`]) or a bare name,
/// looked up as [`crate::pgbin::find`] does.
fn command(program: &str, ep: &Endpoint, options: Option<&str>) -> Result<Command, SchemaError> {
    let missing = || SchemaError::ProgramMissing {
        program: program.to_string(),
        hint: crate::pgbin::INSTALL_HINT.to_string(),
    };
    let path = if program.contains('/') {
        let p = std::path::PathBuf::from(program);
        p.is_file().then_some(p).ok_or_else(missing)?
    } else {
        crate::pgbin::find(program).ok_or_else(missing)?
    };
    let mut c = Command::new(path);
    for var in [
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGPASSFILE",
        "PGHOSTADDR",
    ] {
        c.env_remove(var);
    }
    c.env("PGHOST", &ep.host)
        .env("PGPORT", ep.port.to_string())
        .env("PGUSER", &ep.user)
        .env("PGDATABASE", &ep.dbname)
        .env("PGAPPNAME", "pgshift")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGSSLMODE", ep.sslmode.as_str());
    // pg_dump and psql verify the server exactly as pgshift's own connections do.
    match &ep.sslrootcert {
        Some(root) => c.env("PGSSLROOTCERT", root),
        None => c.env_remove("PGSSLROOTCERT"),
    };
    match &ep.password {
        Some(p) => c.env("PGPASSWORD", p.expose()),
        None => c.env_remove("PGPASSWORD"),
    };
    if let Some(o) = options {
        c.env("PGOPTIONS", o);
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    Ok(c)
}

/// Runs a program to completion and returns its stdout; a failure carries stderr.
async fn run_program(
    program: &str,
    args: &[String],
    ep: &Endpoint,
    options: Option<&str>,
    step: &str,
) -> Result<Vec<u8>, SchemaError> {
    let mut c = command(program, ep, options)?;
    c.args(args);
    let out = c.output().await.map_err(|source| SchemaError::Spawn {
        program: program.to_string(),
        source,
    })?;
    check_status(program, step, &out)?;
    Ok(out.stdout)
}

/// Runs a program feeding `input` on stdin; fails when it exits non-zero.
async fn run_program_with_input(
    program: &str,
    args: &[String],
    ep: &Endpoint,
    options: Option<&str>,
    input: Vec<u8>,
    step: &str,
) -> Result<(), SchemaError> {
    let out = run_program_output(program, args, ep, options, input, step).await?;
    check_status(program, step, &out)
}

async fn run_program_output(
    program: &str,
    args: &[String],
    ep: &Endpoint,
    options: Option<&str>,
    input: Vec<u8>,
    step: &str,
) -> Result<std::process::Output, SchemaError> {
    let mut c = command(program, ep, options)?;
    c.args(args).stdin(Stdio::piped());
    let spawn_err = |source| SchemaError::Spawn {
        program: program.to_string(),
        source,
    };
    let mut child = c.spawn().map_err(spawn_err)?;
    let mut stdin = child.stdin.take().ok_or_else(|| SchemaError::Program {
        step: step.to_string(),
        program: program.to_string(),
        status: "without stdin".into(),
        stderr: String::new(),
    })?;
    // Feed stdin while collecting the output, so neither pipe can fill up and block.
    let writer = async move {
        let r = stdin.write_all(&input).await;
        drop(stdin);
        r
    };
    let (written, out) = tokio::join!(writer, child.wait_with_output());
    let out = out.map_err(spawn_err)?;
    if let Err(e) = written {
        // A program that stops reading early has failed; its stderr says why.
        if out.status.success() {
            return Err(spawn_err(e));
        }
    }
    Ok(out)
}

fn check_status(program: &str, step: &str, out: &std::process::Output) -> Result<(), SchemaError> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The first error lines say what happened; a schema restore can be long.
    let stderr: String = stderr.lines().take(20).collect::<Vec<_>>().join("\n");
    Err(SchemaError::Program {
        step: step.to_string(),
        program: program.to_string(),
        status: out.status.to_string(),
        stderr,
    })
}

/// Result of [`copy_sequences`].
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SequencesReport {
    /// Sequences whose value was set on the target.
    pub copied: usize,
    /// Source sequences absent on the target (not set).
    pub missing_on_target: Vec<String>,
}

/// Copies `last_value` / `is_called` of every sequence (owned by a column or
/// not) from source to target: one query on each side, so the cutover can
/// afford it while writes are paused.
pub async fn copy_sequences(
    source: &Client,
    target: &Client,
) -> Result<SequencesReport, SchemaError> {
    let sync = SequenceSync::prepare(source, target).await?;
    let values = sync.read(source).await?;
    sync.write(target, &values).await
}

const WRITE_SEQUENCES_SQL: &str = "SELECT x.name FROM unnest($1::text[], $2::int8[], $3::bool[]) AS x(name, v, called) \
     WHERE CASE WHEN to_regclass(x.name) IS NULL THEN true \
                ELSE setval(to_regclass(x.name), x.v, x.called) IS NULL END";

/// Sequence values read from the source, to be set on the target.
#[derive(Clone, Debug, Default)]
pub(crate) struct SequenceValues {
    names: Vec<String>,
    values: Vec<i64>,
    called: Vec<bool>,
}

/// [`copy_sequences`] in steps with statements prepared ahead, so the
/// cutover pays one round trip per side (two on the source when a sequence
/// was never called) and may read while it waits for something else.
pub(crate) struct SequenceSync {
    read: tokio_postgres::Statement,
    write: tokio_postgres::Statement,
}

impl SequenceSync {
    pub async fn prepare(source: &Client, target: &Client) -> Result<SequenceSync, SchemaError> {
        let version = Version::of(source)
            .await
            .map_err(sql_err("reading the source version"))?;
        let read = source
            .prepare(crate::pg::catalog::read_sequences_sql(version))
            .await
            .map_err(sql_err("preparing to read source sequences"))?;
        let write = target
            .prepare(WRITE_SEQUENCES_SQL)
            .await
            .map_err(sql_err("preparing to set target sequences"))?;
        Ok(SequenceSync { read, write })
    }

    /// Every sequence's value on the source (`source` is where this was prepared).
    pub async fn read(&self, source: &Client) -> Result<SequenceValues, SchemaError> {
        let rows = source
            .query(&self.read, &[])
            .await
            .map_err(sql_err("reading source sequences"))?;
        let mut v = SequenceValues::default();
        let mut uncalled = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let last: Option<i64> = r.get(1);
            v.names.push(r.get::<_, String>(0));
            v.values.push(last.unwrap_or_else(|| r.get(2)));
            v.called.push(last.is_some());
            if last.is_none() {
                uncalled.push(i);
            }
        }
        // A sequence with is_called = false may still have been set to a value
        // (setval(s, v, false)); read those few directly, in one more query.
        if !uncalled.is_empty() {
            let sql = uncalled
                .iter()
                .map(|&i| format!("SELECT {i}, last_value FROM {}", v.names[i]))
                .collect::<Vec<_>>()
                .join(" UNION ALL ");
            // Simple protocol: one round trip for a statement used once.
            let reply = source
                .simple_query(&sql)
                .await
                .map_err(sql_err("reading unused source sequences"))?;
            for m in reply {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                    let i = r.get(0).and_then(|x| x.parse::<usize>().ok());
                    let value = r.get(1).and_then(|x| x.parse::<i64>().ok());
                    if let (Some(i), Some(value)) = (i, value)
                        && i < v.values.len()
                    {
                        v.values[i] = value;
                    }
                }
            }
        }
        Ok(v)
    }

    /// Sets the values on the target (`target` is where this was prepared).
    pub async fn write(
        &self,
        target: &Client,
        v: &SequenceValues,
    ) -> Result<SequencesReport, SchemaError> {
        let missing: Vec<String> = target
            .query(&self.write, &[&v.names, &v.values, &v.called])
            .await
            .map_err(sql_err("setting target sequences"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(SequencesReport {
            copied: v.names.len() - missing.len(),
            missing_on_target: missing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::leading_ident;

    #[test]
    fn role_names_from_dump_lines() {
        assert_eq!(leading_ident("app;"), "app");
        assert_eq!(leading_ident("app WITH LOGIN;"), "app");
        assert_eq!(leading_ident("\"We\"\"ird\" WITH LOGIN;"), "We\"ird");
    }
}
