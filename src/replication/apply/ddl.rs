//! DDL events in the stream (see [`replication::ddl`](crate::replication::ddl)):
//! each runs on the target inside the target transaction of the source
//! transaction that ran it, after the changes before it and before the
//! changes after it, under the source session's `search_path` and role.
//!
//! - What is queued is sent and checked first, and the relations' target
//!   side is looked up again afterwards (prepared statements included).
//! - The group commits right after a transaction with DDL, so a later
//!   transaction may use what it made (`ALTER TYPE … ADD VALUE`).
//! - A command that cannot run in a transaction block (`CREATE INDEX
//!   CONCURRENTLY`) runs alone between two groups; an index it already
//!   built (apply restarted before the origin moved) is not built again.
//! - A command the target refuses stops apply, naming the command and the
//!   source transaction; the operator fixes the target (`ddl retry`) or
//!   skips it (`ddl skip`).

use std::sync::Arc;

use super::{Applier, ApplyError, SourceTxn};
use crate::db::quote_literal;
use crate::filter::TableFilter;
use crate::replication::ddl::{
    self, DdlControl, DdlEvent, DdlObject, DdlPlan, DdlRecord, Reconcile, TableDef,
    capture::CaptureNames, table,
};
use crate::replication::pgoutput::{LogicalMessage, TupleValue};
use crate::wire::WireError;

/// What apply needs to apply DDL events of one database.
#[derive(Clone)]
pub struct ApplyDdl {
    pub control: Arc<DdlControl>,
    pub names: CaptureNames,
    /// The key that signs this capture's logical messages (14+).
    pub key: Option<Vec<u8>>,
    pub filter: TableFilter,
    /// Run after DDL that created tables, in the same transaction (the
    /// target's write guard, for the new tables).
    pub after_create: Option<String>,
}

impl std::fmt::Debug for ApplyDdl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyDdl")
            .field("setting", &self.control.setting)
            .field("prefix", &self.names.prefix)
            .field("signed", &self.key.is_some())
            .finish()
    }
}

impl Applier {
    /// A logical message of this migration's DDL capture; false if it is
    /// not one.
    pub(super) async fn ddl_message(&mut self, m: &LogicalMessage) -> Result<bool, ApplyError> {
        let Some(d) = &self.opts.ddl else {
            return Ok(false);
        };
        if !m.transactional || m.prefix != d.names.prefix {
            return Ok(false);
        }
        let read = ddl::read_signed(&m.content, d.key.as_deref());
        self.ddl_read(read).await?;
        Ok(true)
    }

    /// A row of this migration's DDL capture table (sources before 14);
    /// false if the relation is not that table.
    pub(super) async fn ddl_row(
        &mut self,
        oid: u32,
        new: Option<&crate::replication::pgoutput::Tuple>,
    ) -> Result<bool, ApplyError> {
        let Some(d) = &self.opts.ddl else {
            return Ok(false);
        };
        let Some(entry) = self.rel.map.get(&oid) else {
            return Ok(false);
        };
        if !crate::replication::marker::is_pgshift_relation(&entry.source.namespace)
            || entry.source.name != d.names.row_table_name()
        {
            return Ok(false);
        }
        let Some(new) = new else {
            return Ok(true);
        };
        let at = entry.source.columns.iter().position(|c| c.name == "event");
        let read = match at.and_then(|i| new.0.get(i)) {
            Some(TupleValue::Text(t)) => ddl::decode_bytea_text(t)
                .ok_or(ddl::EventError::Unsigned)
                .and_then(|json| ddl::read_event(&json)),
            Some(TupleValue::Binary(b)) => ddl::read_event(b),
            _ => Err(ddl::EventError::Unsigned),
        };
        self.ddl_read(read).await?;
        Ok(true)
    }

    async fn ddl_read(
        &mut self,
        read: Result<DdlEvent, ddl::EventError>,
    ) -> Result<(), ApplyError> {
        if self.applying()?.is_none() {
            return Ok(());
        }
        match read {
            Ok(ev) => self.ddl_event(ev).await,
            Err(e) => {
                // Not from pgshift's capture (anyone may emit a message):
                // never run, never a reason to stop.
                tracing::warn!(database = %self.opts.database, "DDL event rejected: {e}");
                self.ddl_record("?", "?", String::new(), "rejected");
                Ok(())
            }
        }
    }

    fn ddl_record(&self, id: &str, tag: &str, statement: String, outcome: &'static str) {
        if let Some(d) = &self.opts.ddl {
            d.control.record(DdlRecord {
                database: self.opts.database.clone(),
                id: id.to_string(),
                tag: tag.to_string(),
                statement,
                outcome,
                at: chrono::Utc::now().to_rfc3339(),
            });
        }
    }

    async fn ddl_event(&mut self, ev: DdlEvent) -> Result<(), ApplyError> {
        let cur = self.tx.current.as_mut().expect("applying");
        if ev.kind == "drop" {
            cur.dropped.extend(ev.objects);
            return Ok(());
        }
        let dropped = std::mem::take(&mut cur.dropped);
        let d = self.opts.ddl.clone().expect("DDL events need DDL options");
        let target_major = self.target_major();
        let plan = ddl::plan(&ev, &dropped, &d.filter, target_major);
        if d.control.is_skipped(&ev.id) {
            tracing::warn!(database = %self.opts.database, id = %ev.id, tag = %ev.tag,
                "DDL skipped by the operator: {}", ev.query);
            self.ddl_record(&ev.id, &ev.tag, ev.query.clone(), "skipped");
            return Ok(());
        }
        match plan {
            DdlPlan::Ignore(why) => {
                tracing::info!(database = %self.opts.database, id = %ev.id, tag = %ev.tag, "DDL not replicated: {why}");
                self.ddl_record(&ev.id, &ev.tag, ev.query.clone(), "ignored");
                Ok(())
            }
            DdlPlan::Unsupported(reason) => {
                self.ddl_record(&ev.id, &ev.tag, ev.query.clone(), "failed");
                Err(ApplyError::DdlUnsupported {
                    database: self.opts.database.clone(),
                    transaction: self.ddl_txn(),
                    id: ev.id,
                    query: ev.query,
                    reason,
                })
            }
            DdlPlan::Reconcile(r) => match self.ddl_reconcile(&ev, &r).await {
                Ok(statements) => {
                    let text = statements.join(";\n");
                    tracing::info!(database = %self.opts.database, id = %ev.id, tag = %ev.tag,
                        "DDL applied (reconciled): {text}");
                    self.ddl_record(&ev.id, &ev.tag, text, "applied");
                    Ok(())
                }
                Err(e) => {
                    self.ddl_record(&ev.id, &ev.tag, ev.query.clone(), "failed");
                    Err(e)
                }
            },
            DdlPlan::Run {
                statements, alone, ..
            } => {
                let r = if alone {
                    self.ddl_alone(&ev, &statements).await
                } else {
                    self.ddl_in_group(&ev, &statements).await
                };
                let text = statements.join(";\n");
                match r {
                    Ok(()) => {
                        tracing::info!(database = %self.opts.database, id = %ev.id, tag = %ev.tag,
                            "DDL applied: {text}");
                        self.ddl_record(&ev.id, &ev.tag, text, "applied");
                        Ok(())
                    }
                    Err(e) => {
                        self.ddl_record(&ev.id, &ev.tag, text, "failed");
                        Err(e)
                    }
                }
            }
        }
    }

    fn ddl_txn(&self) -> SourceTxn {
        match &self.tx.current {
            Some(c) if c.commit_lsn == crate::replication::Lsn(u64::MAX) => {
                SourceTxn::InProgress { xid: c.xid }
            }
            Some(c) => SourceTxn::Committed(c.commit_lsn),
            None => SourceTxn::Committed(self.tx.group.last_commit_lsn),
        }
    }

    /// The target's major version, from the session's server_version.
    fn target_major(&self) -> i32 {
        self.pipe
            .conn
            .params
            .iter()
            .find(|(k, _)| k == "server_version")
            .and_then(|(_, v)| crate::pg::Version::from_server_version(v))
            .map(|v| v.major())
            .unwrap_or(0)
    }

    /// The settings a DDL statement runs under, and what undoes them.
    fn ddl_session(&self, ev: &DdlEvent, local: bool) -> (String, String) {
        let scope = if local { "SET LOCAL" } else { "SET" };
        let mut set = Vec::new();
        let mut reset = Vec::new();
        let path = ev.search_path.as_deref().unwrap_or("");
        set.push(format!(
            "{scope} search_path = {}",
            if path.is_empty() { "''" } else { path }
        ));
        reset.push(format!("{scope} search_path TO DEFAULT"));
        if let Some(role) = &ev.role {
            let r = quote_literal(role);
            // As the role that ran it on the source, when apply's user may
            // be it there (roles are copied); else as apply's own user.
            set.push(format!(
                "SELECT CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {r}) \
                   AND pg_catalog.pg_has_role(current_user, {r}, 'MEMBER') \
                 THEN pg_catalog.set_config('role', {r}, {local}) END"
            ));
            reset.push(format!("{scope} ROLE NONE"));
        }
        (set.join("; "), reset.join("; "))
    }

    /// Runs DDL inside the open target transaction.
    async fn ddl_in_group(
        &mut self,
        ev: &DdlEvent,
        statements: &[String],
    ) -> Result<(), ApplyError> {
        self.flush_batch().await?;
        self.open_group();
        self.round().await?;
        let (set, reset) = self.ddl_session(ev, true);
        let mut sql = format!("{set}; {}; {reset}", statements.join(";\n"));
        let creates = ev.objects.iter().any(|o| {
            o.kind == "table"
                && o.tag
                    .as_deref()
                    .is_some_and(|t| t.starts_with("CREATE TABLE") || t == "SELECT INTO")
        });
        if let Some(after) = self.opts.ddl.as_ref().and_then(|d| d.after_create.as_ref())
            && creates
        {
            sql.push_str(";\n");
            sql.push_str(after);
        }
        self.ddl_exec(ev, statements, &sql).await?;
        self.rel.after_ddl();
        if let Some(c) = self.tx.current.as_mut() {
            c.ddl = true;
        }
        Ok(())
    }

    /// An `ALTER TABLE` run inside a function or a `DO` block: reads the
    /// target's table inside the open transaction (after what runs before
    /// it: sequences, other dropped objects) and runs what makes it match
    /// the source's. Returns the statements run.
    async fn ddl_reconcile(
        &mut self,
        ev: &DdlEvent,
        r: &Reconcile,
    ) -> Result<Vec<String>, ApplyError> {
        self.flush_batch().await?;
        self.open_group();
        self.round().await?;
        let (set, reset) = self.ddl_session(ev, true);
        if !r.before.is_empty() {
            let sql = format!("{set}; {}; {reset}", r.before.join(";\n"));
            self.ddl_exec(ev, &r.before, &sql).await?;
        }
        // Printed as the source's capture prints it.
        let read = format!(
            "SET LOCAL search_path = pg_catalog, pg_temp; SELECT {}::text; SET LOCAL search_path TO DEFAULT",
            table::table_def_sql(&format!(
                "pg_catalog.to_regclass({})",
                quote_literal(&table::qualified(&r.table))
            ))
        );
        let rows = self.ddl_query(ev, &read).await?;
        let json = rows.first().and_then(|row| row.first().cloned().flatten());
        let target: Option<TableDef> = json.and_then(|j| serde_json::from_str(&j).ok());
        let unsupported = |reason: String| ApplyError::DdlUnsupported {
            database: self.opts.database.clone(),
            transaction: self.ddl_txn(),
            id: ev.id.clone(),
            query: ev.query.clone(),
            reason: format!("{} inside a function or a DO block: {reason}", ev.tag),
        };
        let Some(target) = target else {
            return Err(unsupported(format!(
                "table {} is not on the target (renamed or moved on the source?)",
                table::qualified(&r.table)
            )));
        };
        let mut statements = table::reconcile_statements(r, &target).map_err(unsupported)?;
        statements.extend(r.after.iter().cloned());
        let sql = format!("{set}; {}; {reset}", statements.join(";\n"));
        self.ddl_exec(ev, &statements, &sql).await?;
        self.rel.after_ddl();
        if let Some(c) = self.tx.current.as_mut() {
            c.ddl = true;
        }
        let mut all = r.before.clone();
        all.extend(statements);
        Ok(all)
    }

    async fn ddl_query(
        &mut self,
        ev: &DdlEvent,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ApplyError> {
        match self.pipe.conn.simple_query(sql).await {
            Ok(rows) => Ok(rows),
            Err(WireError::Server(error)) => Err(ApplyError::Ddl {
                database: self.opts.database.clone(),
                transaction: self.ddl_txn(),
                id: ev.id.clone(),
                statement: sql.to_string(),
                error: Box::new(error),
            }),
            Err(source) => Err(ApplyError::Connection {
                database: self.opts.database.clone(),
                source: Box::new(source),
            }),
        }
    }

    /// Runs DDL that cannot run in a transaction block, between groups.
    async fn ddl_alone(&mut self, ev: &DdlEvent, statements: &[String]) -> Result<(), ApplyError> {
        if self.child || self.tx.current.as_ref().is_some_and(|c| c.statements > 0) {
            return Err(ApplyError::DdlUnsupported {
                database: self.opts.database.clone(),
                transaction: self.ddl_txn(),
                id: ev.id.clone(),
                query: ev.query.clone(),
                reason: "a command that cannot run in a transaction block, in a transaction with other changes".into(),
            });
        }
        // What is before it is committed first.
        self.commit_group_exactly().await?;
        if self.tx.group.open {
            return Err(self.protocol("a group still open before a DDL command that runs alone"));
        }
        if self.ddl_already_built(ev).await? {
            tracing::info!(database = %self.opts.database, id = %ev.id,
                "index already built on the target (apply restarted after building it)");
            return Ok(());
        }
        let (set, reset) = self.ddl_session(ev, false);
        let conn_err = |source: WireError| ApplyError::Connection {
            database: self.opts.database.clone(),
            source: Box::new(source),
        };
        self.pipe.conn.simple_query(&set).await.map_err(conn_err)?;
        let mut r = Ok(());
        for s in statements {
            r = self.ddl_exec(ev, statements, s).await;
            if r.is_err() {
                break;
            }
        }
        let undo = self.pipe.conn.simple_query(&reset).await;
        r?;
        undo.map_err(|source| ApplyError::Connection {
            database: self.opts.database.clone(),
            source: Box::new(source),
        })?;
        self.rel.after_ddl();
        Ok(())
    }

    /// For `CREATE INDEX CONCURRENTLY`: whether the index is on the target
    /// and valid. An invalid one (a build that was interrupted) is dropped
    /// so the build can run again.
    async fn ddl_already_built(&mut self, ev: &DdlEvent) -> Result<bool, ApplyError> {
        let Some(index) = ev
            .objects
            .iter()
            .find(|o: &&DdlObject| o.kind == "index" && ev.tag == "CREATE INDEX")
        else {
            return Ok(false);
        };
        let q = format!(
            "SELECT i.indisvalid FROM pg_catalog.pg_index i WHERE i.indexrelid = pg_catalog.to_regclass({})",
            quote_literal(&index.identity)
        );
        let conn_err = |source: WireError| ApplyError::Connection {
            database: self.opts.database.clone(),
            source: Box::new(source),
        };
        let rows = self.pipe.conn.simple_query(&q).await.map_err(conn_err)?;
        match rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .as_deref()
        {
            Some("t") => Ok(true),
            Some(_) => {
                let drop = format!("DROP INDEX CONCURRENTLY IF EXISTS {}", index.identity);
                self.pipe.conn.simple_query(&drop).await.map_err(conn_err)?;
                Ok(false)
            }
            None => Ok(false),
        }
    }

    async fn ddl_exec(
        &mut self,
        ev: &DdlEvent,
        statements: &[String],
        sql: &str,
    ) -> Result<(), ApplyError> {
        match self.pipe.conn.simple_query(sql).await {
            Ok(_) => Ok(()),
            Err(WireError::Server(error)) => Err(ApplyError::Ddl {
                database: self.opts.database.clone(),
                transaction: self.ddl_txn(),
                id: ev.id.clone(),
                statement: statements.join(";\n"),
                error: Box::new(error),
            }),
            Err(source) => Err(ApplyError::Connection {
                database: self.opts.database.clone(),
                source: Box::new(source),
            }),
        }
    }
}
