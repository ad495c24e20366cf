//! Post-data (indexes, constraints, triggers …) restored while the copy
//! runs: a table's own indexes and index-backed constraints (PRIMARY KEY,
//! UNIQUE, EXCLUDE) are built as soon as all of that table's data is on the
//! target, in parallel with the copy of the other tables; everything that
//! involves more than one table or no copied table (foreign keys, triggers,
//! rules, policies, partitioned parents' indexes and their ATTACH items,
//! NOT VALID checks, materialized views' indexes, statistics …) is restored
//! after every table is in.
//!
//! The schema stays exactly pg_dump's post-data: the section is dumped once,
//! at the migration's snapshot, in the archive (custom) format; its table of
//! contents (`pg_restore -l`) names every item by catalog and OID, the
//! source's catalog says which table each index or constraint belongs to,
//! and each batch is `pg_restore -L <those items>` of that one archive piped
//! into psql — the same SQL a plain dump holds, item by item, in the
//! archive's order. pg_restore and psql come from pg_dump's installation
//! (the archive and its SQL are of that version).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{DumpPlan, SchemaError, Section, dump_args, run_program, run_program_output};
use crate::config::Endpoint;
use crate::pg::tables::CopiedTable;

/// What post-data index builds get on the target: memory and parallel
/// workers (index builds dominate post-data).
pub(super) const POST_DATA_OPTIONS: &str =
    "-c maintenance_work_mem=256MB -c max_parallel_maintenance_workers=4";

/// `pg_class` and `pg_constraint`'s OIDs: the catalogs of the TOC items
/// that may be restored early.
const PG_CLASS: u32 = 1259;
const PG_CONSTRAINT: u32 = 2606;

/// One item of the archive's table of contents.
#[derive(Clone, Debug)]
struct TocItem {
    /// The `pg_restore -l` line, as `-L` reads it back.
    line: String,
    /// "INDEX public child_lower postgres": type, schema, name and owner,
    /// as pg_restore lists them (for logs and errors).
    label: String,
    /// The source table it belongs to when it may be restored with that
    /// table's data (an index or index-backed constraint of one table).
    table: Option<u32>,
}

/// The post-data section of one database, dumped at the snapshot.
pub(crate) struct PostDataArchive {
    database: String,
    /// Removed when the archive is dropped.
    file: tempfile::TempPath,
    items: Vec<TocItem>,
    pg_restore: String,
    psql: String,
    plan: DumpPlan,
}

/// Whether the plan's client programs can restore post-data per table
/// (pg_restore next to its pg_dump). Without it, post-data is restored in
/// one step after the copy.
pub(crate) fn can_restore_per_table(plan: &DumpPlan) -> bool {
    let p = plan.program("pg_restore");
    !p.contains('/') || std::path::Path::new(&p).is_file()
}

impl PostDataArchive {
    /// Dumps the post-data section of `db` as of `snapshot` to an archive
    /// file and reads its table of contents; the source's catalog, read in
    /// the same snapshot, tells which table each index and constraint
    /// belongs to.
    pub(crate) async fn dump(
        source: &Endpoint,
        db: &str,
        snapshot: Option<&str>,
        plan: &DumpPlan,
    ) -> Result<PostDataArchive, SchemaError> {
        let started = Instant::now();
        let file = tempfile::Builder::new()
            .prefix("pgshift-post-data-")
            .suffix(".dump")
            .tempfile()
            .map_err(|e| SchemaError::Spawn {
                program: "pg_dump (archive file)".into(),
                source: e,
            })?
            .into_temp_path();
        let mut args = dump_args(snapshot, plan, Section::PostData);
        // Uncompressed: the archive is read once per batch, and small.
        args.extend([
            "--format=custom".into(),
            "--compress=0".into(),
            format!("--file={}", file.display()),
        ]);
        let source_db_ep = source.with_dbname(db);
        run_program(
            &plan.program("pg_dump"),
            &args,
            &source_db_ep,
            None,
            &format!("pg_dump post-data of {db}"),
        )
        .await?;
        let pg_restore = plan.program("pg_restore");
        let toc = run_program(
            &pg_restore,
            &["--list".into(), file.display().to_string()],
            &source_db_ep,
            None,
            &format!("pg_restore --list of {db}'s post-data"),
        )
        .await?;
        let mut items = parse_toc(&String::from_utf8_lossy(&toc));
        let catalog = crate::db::connect(&source_db_ep, "source (post-data)").await?;
        if let Some(snap) = snapshot {
            catalog
                .batch_execute(&format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
                    crate::db::quote_literal(snap)
                ))
                .await
                .map_err(super::sql_err(format!("importing snapshot {snap}")))?;
        }
        assign_tables(&catalog, &mut items).await?;
        drop(catalog);
        tracing::info!(
            database = db,
            items = items.len(),
            per_table = items.iter().filter(|i| i.table.is_some()).count(),
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "post-data dumped: tables' own indexes and constraints are built as each table is copied, the rest after the copy"
        );
        Ok(PostDataArchive {
            database: db.to_string(),
            file,
            items,
            pg_restore,
            psql: plan.program("psql"),
            plan: plan.clone(),
        })
    }

    /// Items restored with their table's data.
    fn per_table(&self) -> HashMap<u32, Vec<usize>> {
        let mut m: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, item) in self.items.iter().enumerate() {
            if let Some(t) = item.table {
                m.entry(t).or_default().push(i);
            }
        }
        m
    }

    /// Restores these items (indexes into `items`, in archive order) in
    /// one target transaction.
    async fn restore(&self, target: &Endpoint, which: &[usize]) -> Result<(), SchemaError> {
        let db = &self.database;
        let mut list = tempfile::Builder::new()
            .prefix("pgshift-post-data-")
            .suffix(".list")
            .tempfile()
            .map_err(|e| SchemaError::Spawn {
                program: "pg_restore (list file)".into(),
                source: e,
            })?;
        let mut text = String::new();
        for &i in which {
            text.push_str(&self.items[i].line);
            text.push('\n');
        }
        list.write_all(text.as_bytes())
            .and_then(|()| list.flush())
            .map_err(|e| SchemaError::Spawn {
                program: "pg_restore (list file)".into(),
                source: e,
            })?;
        // pg_restore only writes SQL here (-f -): it connects to nothing.
        let sql = run_program(
            &self.pg_restore,
            &[
                format!("--use-list={}", list.path().display()),
                "--file=-".into(),
                self.file.display().to_string(),
            ],
            &target.with_dbname(db),
            None,
            &format!("pg_restore of {db}'s post-data"),
        )
        .await?;
        let (sql, _) = self.plan.for_target(sql);
        let out = run_program_output(
            &self.psql,
            &[
                "-X".into(),
                "-q".into(),
                "-v".into(),
                "ON_ERROR_STOP=1".into(),
                "--single-transaction".into(),
                "-o".into(),
                "/dev/null".into(),
                // Stdin as a file: psql then says at which line it stopped.
                "-f".into(),
                "-".into(),
            ],
            &target.with_dbname(db),
            Some(POST_DATA_OPTIONS),
            sql.clone(),
            &format!("restoring {db}'s post-data"),
        )
        .await?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let message: String = stderr.lines().take(20).collect::<Vec<_>>().join("\n");
        let object = failed_object(&sql, &stderr).unwrap_or_else(|| {
            which
                .iter()
                .map(|&i| self.items[i].label.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        });
        Err(SchemaError::PostData {
            database: db.clone(),
            object,
            message,
        })
    }
}

/// The TOC's items: `ID; CATALOG OID TYPE SCHEMA NAME OWNER` lines (`;`
/// starts a comment).
fn parse_toc(toc: &str) -> Vec<TocItem> {
    toc.lines()
        .filter(|l| !l.trim_start().starts_with(';') && !l.trim().is_empty())
        // pgshift's DDL capture on the source is not the application's.
        .filter(|l| !l.contains(" EVENT TRIGGER - pgshift_ddl_"))
        .filter_map(|l| {
            let (_, rest) = l.split_once(';')?;
            let mut f = rest.trim_start().splitn(3, ' ');
            let catalog: u32 = f.next()?.parse().ok()?;
            let oid: u32 = f.next()?.parse().ok()?;
            let label = f.next()?.to_string();
            // Only an INDEX (pg_class) or an index-backed CONSTRAINT
            // (pg_constraint: "CHECK CONSTRAINT" and "FK CONSTRAINT" are
            // other types) can belong to one table; INDEX ATTACH has catalog 0.
            let candidate = (catalog == PG_CLASS && label.starts_with("INDEX "))
                || (catalog == PG_CONSTRAINT && label.starts_with("CONSTRAINT "));
            Some(TocItem {
                line: l.to_string(),
                label,
                // Filled by assign_tables: the OID for now.
                table: candidate.then_some(oid),
            })
        })
        .collect()
}

/// Replaces each candidate's own OID with its table's, from the source's
/// catalog; an item whose table cannot be found stays for the end.
async fn assign_tables(
    c: &tokio_postgres::Client,
    items: &mut [TocItem],
) -> Result<(), SchemaError> {
    let oids: Vec<u32> = items.iter().filter_map(|i| i.table).collect();
    if oids.is_empty() {
        return Ok(());
    }
    // Indexes by pg_class OID, constraints by pg_constraint OID: the two
    // catalogs' OIDs come from one counter, so one map holds both. Only
    // tables that hold data (relkind 'r') qualify: a partitioned parent's
    // index waits for its partitions'.
    let rows = c
        .query(
            "SELECT i.indexrelid, i.indrelid FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid \
             WHERE i.indexrelid = ANY($1) AND t.relkind = 'r' \
             UNION ALL \
             SELECT c.oid, c.conrelid FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid \
             WHERE c.oid = ANY($1) AND c.contype IN ('p', 'u', 'x') AND t.relkind = 'r'",
            &[&oids],
        )
        .await
        .map_err(super::sql_err(
            "reading which table each post-data item belongs to",
        ))?;
    let owner: HashMap<u32, u32> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for item in items {
        item.table = item.table.and_then(|oid| owner.get(&oid).copied());
    }
    Ok(())
}

/// The object the statement psql stopped at creates: pg_restore heads each
/// item with `-- Name: …; Type: …; Schema: …` and psql names the failing
/// line (`psql:<stdin>:LINE: ERROR: …`).
fn failed_object(sql: &[u8], stderr: &str) -> Option<String> {
    let line: usize = stderr.lines().find_map(|l| {
        let rest = l.strip_prefix("psql:<stdin>:")?;
        let (n, tail) = rest.split_once(':')?;
        tail.trim_start()
            .starts_with("ERROR")
            .then(|| n.parse().ok())
            .flatten()
    })?;
    String::from_utf8_lossy(sql)
        .lines()
        .take(line)
        .filter_map(|l| l.strip_prefix("-- Name: "))
        .last()
        .map(|h| h.split("; Owner:").next().unwrap_or(h).to_string())
}

/// Progress of one database's post-data, for `/status` and the log.
#[derive(Debug, Default)]
pub(crate) struct PostDataProgress {
    inner: Mutex<PostDataState>,
}

/// A point-in-time view of [`PostDataProgress`].
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct PostDataState {
    /// Items in the post-data section (indexes, constraints, triggers …).
    pub items_total: usize,
    /// Items restored so far.
    pub items_done: usize,
    /// Tables with items of their own, and how many of those are built.
    pub tables_total: usize,
    pub tables_done: usize,
    /// Tables whose indexes are being built now.
    pub building: Vec<String>,
    /// Whether the items that wait for every table (foreign keys, triggers …)
    /// are restored.
    pub rest_done: bool,
}

impl PostDataProgress {
    pub(crate) fn new() -> Arc<PostDataProgress> {
        Arc::new(PostDataProgress::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PostDataState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn snapshot(&self) -> PostDataState {
        self.lock().clone()
    }
}

/// Restores each copied table's own items as the copy announces it on
/// `copied`, at most `jobs` restores at a time, until the copy ends (the
/// channel closes); then everything else, in one transaction. Stops at
/// the first failure (naming the object) or when `cancel` fires.
pub(crate) async fn restore_during_copy(
    archive: Arc<PostDataArchive>,
    target: &Endpoint,
    jobs: usize,
    mut copied: UnboundedReceiver<CopiedTable>,
    progress: Arc<PostDataProgress>,
    cancel: CancellationToken,
) -> Result<PostDataReport, SchemaError> {
    let db = archive.database.clone();
    let started = Instant::now();
    let mut own = archive.per_table();
    {
        let mut g = progress.lock();
        g.items_total = archive.items.len();
        g.tables_total = own.len();
    }
    let jobs = jobs.max(1);
    let mut ready: VecDeque<(String, Vec<usize>)> = VecDeque::new();
    let mut running: JoinSet<(Vec<String>, usize, Result<(), SchemaError>)> = JoinSet::new();
    let mut open = true;
    let mut during_copy = 0usize;
    loop {
        // Ready tables are shared out over the free jobs: one restore per
        // job, several small tables in one when they queue up.
        while running.len() < jobs && !ready.is_empty() {
            let free = jobs - running.len();
            let take = ready.len().div_ceil(free);
            let batch: Vec<(String, Vec<usize>)> = ready.drain(..take).collect();
            let names: Vec<String> = batch.iter().map(|(n, _)| n.clone()).collect();
            let mut which: Vec<usize> = batch.into_iter().flat_map(|(_, w)| w).collect();
            which.sort_unstable();
            progress.lock().building.extend(names.iter().cloned());
            let (a, t) = (archive.clone(), target.clone());
            running.spawn(async move {
                let n = which.len();
                let r = a.restore(&t, &which).await;
                (names, n, r)
            });
        }
        if !open && ready.is_empty() && running.is_empty() {
            break;
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                running.abort_all();
                return Err(SchemaError::Canceled);
            }
            msg = copied.recv(), if open => match msg {
                Some(t) => {
                    if let Some(which) = own.remove(&t.oid) {
                        ready.push_back((t.table, which));
                    }
                }
                None => open = false,
            },
            Some(joined) = running.join_next() => {
                let (names, n, r) = joined.map_err(|e| SchemaError::PostData {
                    database: db.clone(),
                    object: "a post-data job".into(),
                    message: e.to_string(),
                })?;
                r?;
                if open {
                    during_copy += names.len();
                }
                let mut g = progress.lock();
                g.items_done += n;
                g.tables_done += names.len();
                g.building.retain(|b| !names.contains(b));
                tracing::info!(
                    database = %db,
                    tables = %names.join(", "),
                    items = n,
                    "post-data: indexes built for {} ({}/{} items, {}/{} tables)",
                    names.join(", "), g.items_done, g.items_total, g.tables_done, g.tables_total
                );
            }
        }
    }
    let per_table_seconds = started.elapsed().as_secs_f64();
    // Everything not restored yet, in archive order: foreign keys,
    // triggers, parents' indexes and ATTACH … and the items of any table
    // the copy did not announce.
    let done: HashSet<usize> = archive
        .items
        .iter()
        .enumerate()
        .filter(|(_, item)| item.table.is_some_and(|t| !own.contains_key(&t)))
        .map(|(i, _)| i)
        .collect();
    let rest: Vec<usize> = (0..archive.items.len())
        .filter(|i| !done.contains(i))
        .collect();
    let rest_started = Instant::now();
    if !rest.is_empty() {
        tokio::select! {
            _ = cancel.cancelled() => return Err(SchemaError::Canceled),
            r = archive.restore(target, &rest) => r?,
        }
    }
    let rest_seconds = rest_started.elapsed().as_secs_f64();
    let mut g = progress.lock();
    g.items_done += rest.len();
    g.rest_done = true;
    tracing::info!(
        database = %db,
        items = rest.len(),
        seconds = format!("{rest_seconds:.2}"),
        "post-data: the rest restored (foreign keys, triggers, partitioned indexes …; {}/{} items)",
        g.items_done, g.items_total
    );
    Ok(PostDataReport {
        items: archive.items.len(),
        per_table_items: done.len(),
        tables_during_copy: during_copy,
        per_table_seconds,
        rest_items: rest.len(),
        rest_seconds,
    })
}

/// What [`restore_during_copy`] did.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PostDataReport {
    pub items: usize,
    /// Items restored with their table's data.
    pub per_table_items: usize,
    /// Tables whose own items were built while the copy still ran.
    pub tables_during_copy: usize,
    /// From the first copied table to the last table's own items.
    pub per_table_seconds: f64,
    pub rest_items: usize,
    pub rest_seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOC: &str = ";
; Archive created at 2026-12-07 10:21:32 UTC
;     dbname: postgres
;
; Selected TOC Entries:
;
3508; 2606 17064 CONSTRAINT public booking booking_room_during_excl postgres
3499; 2606 17057 CHECK CONSTRAINT public child v_chk2 postgres
3520; 2606 17103 CONSTRAINT public we ird we ird_pkey postgres
3504; 1259 17056 INDEX public child_lower postgres
3521; 0 0 INDEX ATTACH public ev_1_at_idx postgres
3526; 2620 17084 TRIGGER public child t postgres
3525; 2606 17051 FK CONSTRAINT public child child_pid_fkey postgres
";

    #[test]
    fn toc_candidates() {
        let items = parse_toc(TOC);
        assert_eq!(items.len(), 7);
        let c: Vec<Option<u32>> = items.iter().map(|i| i.table).collect();
        assert_eq!(
            c,
            vec![
                Some(17064),
                None,
                Some(17103),
                Some(17056),
                None,
                None,
                None
            ]
        );
        assert_eq!(
            items[2].label,
            "CONSTRAINT public we ird we ird_pkey postgres"
        );
        assert!(items[4].line.starts_with("3521; 0 0 INDEX ATTACH"));
    }

    #[test]
    fn names_the_failed_object() {
        let sql = b"SET x = 1;\n\n--\n-- Name: a_pkey; Type: CONSTRAINT; Schema: public; Owner: postgres\n--\n\nALTER TABLE ONLY public.a\n    ADD CONSTRAINT a_pkey PRIMARY KEY (id);\n\n--\n-- Name: b_i; Type: INDEX; Schema: public; Owner: postgres\n--\n\nCREATE UNIQUE INDEX b_i ON public.b USING btree (v);\n";
        let err = "psql:<stdin>:14: ERROR:  could not create unique index \"b_i\"\nDETAIL:  Key (v)=(1) is duplicated.\n";
        assert_eq!(
            failed_object(sql, err).as_deref(),
            Some("b_i; Type: INDEX; Schema: public")
        );
        assert_eq!(failed_object(sql, "psql: error: connection refused"), None);
    }
}
