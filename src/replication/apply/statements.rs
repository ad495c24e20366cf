//! Row changes and TRUNCATE as statements on the target: each relation is
//! resolved against the target catalog before its first change (a schema
//! difference stops apply with what to do about it), and each shape of
//! change gets one named statement, bound with the values exactly as
//! pgoutput sent them and checked to affect exactly one row.

use std::collections::HashMap;
use std::time::Duration;

use super::pipeline::{Op, Param, Pipeline};
use super::relation::{self, BatchKind, RelEntry, SourceColumn, SourceNames, StmtKey};
use super::{Applier, ApplyError};
use crate::replication::marker;
use crate::replication::pgoutput::{OldKind, Relation, Truncate, Tuple, TupleValue, TypeInfo};
use crate::wire::{ConnectOptions, ServerConnection, WireError};

/// A row change as apply handles it.
pub(super) enum RowChange {
    Insert(Tuple),
    Update(Option<(OldKind, Tuple)>, Tuple),
    Delete(Tuple),
}

/// The relations and types the stream announced, and the named statements
/// prepared for them on the target.
#[derive(Default)]
pub(super) struct Relations {
    pub(super) map: HashMap<u32, RelEntry>,
    pub(super) types: HashMap<u32, TypeInfo>,
    next_statement: u64,
}

impl Relations {
    /// The named statement for a shape, queuing its Parse on first use.
    fn statement(&mut self, pipe: &mut Pipeline, oid: u32, key: StmtKey) -> String {
        let entry = self.map.get_mut(&oid).expect("resolved");
        if let Some(name) = entry.statements.get(&key) {
            return name.clone();
        }
        self.next_statement += 1;
        let name = format!("pgshift_s{}", self.next_statement);
        let (sql, types) = entry.statement_sql(&key);
        pipe.parse(&name, &sql, &types);
        entry.statements.insert(key, name.clone());
        name
    }

    /// The named statement of a batch kind, queuing its Parse on first use.
    pub(super) fn batch_statement(
        &mut self,
        pipe: &mut Pipeline,
        oid: u32,
        kind: BatchKind,
    ) -> String {
        let entry = self.map.get_mut(&oid).expect("resolved");
        if let Some(name) = entry.batch_statements.get(&kind) {
            return name.clone();
        }
        self.next_statement += 1;
        let name = format!("pgshift_b{}", self.next_statement);
        let (sql, types) = entry.batch_sql(kind);
        pipe.parse(&name, &sql, &types);
        entry.batch_statements.insert(kind, name.clone());
        name
    }

    /// After DDL on the target: every relation's target side is looked up
    /// again, and its statements prepared anew, at its next change.
    pub(super) fn after_ddl(&mut self) {
        for r in self.map.values_mut() {
            r.target = None;
        }
        self.forget_statements();
    }

    /// Forgets every prepared statement: the Parses that were queued are
    /// gone with the queue, so each is prepared anew on next use.
    pub(super) fn forget_statements(&mut self) {
        for r in self.map.values_mut() {
            r.statements.clear();
            r.batch_statements.clear();
        }
    }
}

impl Applier {
    /// A Relation message: a new or changed layout replaces what is known.
    pub(super) async fn relation(&mut self, r: Relation) -> Result<(), ApplyError> {
        let changed = self.rel.map.get(&r.oid).is_none_or(|e| {
            e.source.columns != r.columns
                || e.source.name != r.name
                || e.source.namespace != r.namespace
                || e.source.replica_identity != r.replica_identity
        });
        if changed {
            if !self.batching.exact() && self.rel.map.contains_key(&r.oid) {
                // A re-apply would need the old layout: verify what
                // is batched and apply the rest of the group exactly.
                self.flush_batch().await?;
                self.round().await?;
                self.stop_batching_for_group();
            }
            self.rel.map.insert(r.oid, RelEntry::new(r));
        }
        Ok(())
    }

    /// Makes sure the relation's target side is known and matches.
    async fn ensure_target(&mut self, oid: u32) -> Result<(), ApplyError> {
        let entry = self
            .rel
            .map
            .get(&oid)
            .ok_or_else(|| self.protocol(format!("change for unknown relation {oid}")))?;
        if entry.target.is_some() {
            return Ok(());
        }
        let catalog = entry.catalog_query();
        let type_query = source_type_query(entry);
        // The catalog is read on the same connection: send what is queued first.
        self.round().await?;
        let conn_err = |source: WireError| ApplyError::Connection {
            database: self.opts.database.clone(),
            source: Box::new(source),
        };
        let rows = self
            .pipe
            .conn
            .simple_query(&catalog)
            .await
            .map_err(conn_err)?;
        let names = self
            .pipe
            .conn
            .simple_query(&type_query)
            .await
            .map_err(conn_err)?;
        let names = SourceNames {
            builtin: names
                .into_iter()
                .map(|r| r.into_iter().next().flatten())
                .collect(),
            ..Default::default()
        };
        let batchable = if self.opts.net_batching {
            let q = self.rel.map[&oid].batchable_query();
            let rows = self.pipe.conn.simple_query(&q).await.map_err(conn_err)?;
            rows.first().and_then(|r| r.first().cloned().flatten()) == Some("true".into())
        } else {
            false
        };
        let entry = &self.rel.map[&oid];
        let mismatch = match entry.resolve(&rows, &self.rel.types, &names) {
            Ok(mut t) => {
                t.batchable = batchable;
                let entry = self.rel.map.get_mut(&oid).expect("checked above");
                entry.target = Some(t);
                entry.batch_statements.clear();
                entry.statements.clear();
                return Ok(());
            }
            Err(m) => m,
        };
        // Name the source columns exactly (a domain's name, defaults) when
        // the source catalog can be read; the first answer stands otherwise.
        let mismatch = match self.source_columns(oid).await {
            Some(columns) => {
                let names = SourceNames { columns, ..names };
                entry
                    .resolve(&rows, &self.rel.types, &names)
                    .err()
                    .unwrap_or(mismatch)
            }
            None => mismatch,
        };
        let database = self.opts.database.clone();
        Err(ApplyError::SchemaMismatch {
            remedy: match &mismatch.fix {
                // The stream retries a stopped apply, so it resumes by
                // itself once the target matches.
                Some(sql) => format!(
                    "run on the target database {database}: {sql} Apply retries and resumes once the target matches"
                ),
                None => format!(
                    "{} (database {database}); apply retries and resumes once the target matches",
                    mismatch.manual
                ),
            },
            database,
            table: entry.display.to_string(),
            difference: mismatch.difference,
            fix: mismatch.fix,
        })
    }

    /// The source catalog's definitions of a relation's columns, or None
    /// when no source is configured or it cannot be read (they only
    /// improve a message).
    async fn source_columns(&self, oid: u32) -> Option<HashMap<String, SourceColumn>> {
        let source = self.opts.source.as_ref()?;
        let query = self.rel.map.get(&oid)?.source_columns_query();
        let startup = [
            ("user".to_string(), source.user.clone()),
            ("database".to_string(), source.dbname.clone()),
            ("application_name".to_string(), "pgshift apply".to_string()),
        ];
        let read = async {
            let mut conn = ServerConnection::connect(
                &ConnectOptions::for_endpoint(source),
                &startup,
                source.password.as_ref().map(|p| p.expose()),
            )
            .await
            .ok()?;
            conn.simple_query("SET search_path = pg_catalog")
                .await
                .ok()?;
            conn.simple_query(&query).await.ok()
        };
        // An unreachable source must not hold up the error it would improve.
        let rows = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .ok()??;
        Some(SourceColumn::from_rows(&rows))
    }

    pub(super) async fn row(&mut self, oid: u32, change: RowChange) -> Result<(), ApplyError> {
        let Some(commit_lsn) = self.applying()? else {
            return Ok(());
        };
        let new = match &change {
            RowChange::Insert(n) | RowChange::Update(_, n) => Some(n),
            RowChange::Delete(_) => None,
        };
        if self.ddl_row(oid, new).await? {
            return Ok(());
        }
        if self.own_row(oid, &change)? {
            return Ok(());
        }
        self.ensure_target(oid).await?;
        let Some(change) = self.batch_row(oid, change).await? else {
            return Ok(());
        };
        // Applied on its own, after everything batched before it.
        self.flush_batch().await?;
        let entry = &self.rel.map[&oid];
        let ncols = entry.source.columns.len();
        let table = entry.display.clone();
        let bad_width = |t: &Tuple| t.0.len() != ncols;
        let (key, params, what, expect): (StmtKey, Vec<Param<'_>>, &'static str, u64);
        match &change {
            RowChange::Insert(new) => {
                if bad_width(new) || new.0.contains(&TupleValue::UnchangedToast) {
                    return Err(self.protocol(format!("malformed Insert for {table}")));
                }
                key = StmtKey::Insert;
                params = new.0.iter().map(param).collect();
                what = "insert";
                expect = 1;
            }
            RowChange::Update(old, new) => {
                let old_tuple = old.as_ref().map(|(_, t)| t);
                if bad_width(new) || old_tuple.is_some_and(bad_width) {
                    return Err(self.protocol(format!("malformed Update for {table}")));
                }
                // Unchanged TOAST values stay as they are; without an old key
                // tuple the key did not change, so it is not set either (an
                // identity column GENERATED ALWAYS could not be).
                let keep_key = old.is_none() && !entry.full_identity();
                let mut set: Vec<bool> = new
                    .0
                    .iter()
                    .zip(&entry.source.columns)
                    .map(|(v, c)| *v != TupleValue::UnchangedToast && !(keep_key && c.key))
                    .collect();
                if !set.iter().any(|s| *s) {
                    // Only key columns: set them to themselves (the row must still exist).
                    set = new
                        .0
                        .iter()
                        .map(|v| *v != TupleValue::UnchangedToast)
                        .collect();
                }
                let (by, by_values) = self.locate(oid, old_tuple, Some(new))?;
                let mut p: Vec<Param<'_>> = new
                    .0
                    .iter()
                    .zip(&set)
                    .filter(|(_, s)| **s)
                    .map(|(v, _)| param(v))
                    .collect();
                p.extend(by_values);
                key = StmtKey::Update { set, by };
                params = p;
                what = "update";
                expect = 1;
            }
            RowChange::Delete(old) => {
                if bad_width(old) {
                    return Err(self.protocol(format!("malformed Delete for {table}")));
                }
                let (by, by_values) = self.locate(oid, Some(old), None)?;
                key = StmtKey::Delete { by };
                params = by_values;
                what = "delete";
                expect = 1;
            }
        }
        let stmt = self.rel.statement(&mut self.pipe, oid, key);
        self.open_group();
        self.pipe.execute(
            &stmt,
            &params,
            Op {
                commit_lsn,
                table: Some(table),
                what,
                expect_rows: Some(expect),
            },
        );
        self.tx.statement_queued();
        self.tx.group.single_rows += 1;
        if let Some(c) = self.tx.counts() {
            match what {
                "insert" => c.inserts += 1,
                "update" => c.updates += 1,
                _ => c.deletes += 1,
            }
        }
        if self.pipe.queued_bytes() >= self.opts.max_round_bytes {
            self.round().await?;
        }
        Ok(())
    }

    /// Which columns find the old row and their values. DEFAULT / USING
    /// INDEX: the key columns, from the old key tuple when the key changed,
    /// else from the new row. FULL: every old value that was sent.
    fn locate<'a>(
        &self,
        oid: u32,
        old: Option<&'a Tuple>,
        new: Option<&'a Tuple>,
    ) -> Result<(Vec<bool>, Vec<Param<'a>>), ApplyError> {
        let entry = &self.rel.map[&oid];
        let source = old
            .or(new)
            .ok_or_else(|| self.protocol("no tuple to find a row by"))?;
        let by: Vec<bool> = if entry.full_identity() && old.is_some() {
            source
                .0
                .iter()
                .map(|v| *v != TupleValue::UnchangedToast)
                .collect()
        } else {
            entry.key_mask()
        };
        if !by.iter().any(|b| *b) {
            return Err(self.protocol(format!(
                "{} has no replica identity columns to find rows by",
                entry.display
            )));
        }
        let mut values = Vec::new();
        for (i, v) in source.0.iter().enumerate().filter(|(i, _)| by[*i]) {
            if *v == TupleValue::UnchangedToast {
                return Err(self.protocol(format!(
                    "key column {} of {} was not sent (unchanged TOAST)",
                    entry.source.columns[i].name, entry.display
                )));
            }
            values.push(param(v));
        }
        Ok((by, values))
    }

    pub(super) async fn truncate(&mut self, mut t: Truncate) -> Result<(), ApplyError> {
        let Some(commit_lsn) = self.applying()? else {
            return Ok(());
        };
        // pgshift's own tables on the source are not on the target.
        t.relations.retain(|oid| {
            self.rel
                .map
                .get(oid)
                .is_none_or(|e| !marker::is_pgshift_relation(&e.source.namespace))
        });
        let mut names = Vec::new();
        for oid in &t.relations {
            self.ensure_target(*oid).await?;
            let e = &self.rel.map[oid];
            let only = e.target.as_ref().is_some_and(|t| t.relkind != 'p');
            names.push(format!("{}{}", if only { "ONLY " } else { "" }, e.quoted));
        }
        if names.is_empty() {
            return Ok(());
        }
        self.flush_batch().await?;
        let sql = format!(
            "TRUNCATE {}{}{}",
            names.join(", "),
            if t.restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            },
            if t.cascade { " CASCADE" } else { "" }
        );
        let table: std::sync::Arc<str> = t
            .relations
            .iter()
            .map(|o| self.rel.map[o].display.to_string())
            .collect::<Vec<_>>()
            .join(", ")
            .into();
        self.open_group();
        self.pipe.parse("", &sql, &[]);
        self.pipe.execute(
            "",
            &[],
            Op {
                commit_lsn,
                table: Some(table),
                what: "truncate",
                expect_rows: None,
            },
        );
        self.tx.statement_queued();
        if let Some(c) = self.tx.counts() {
            c.truncates += t.relations.len() as u64;
        }
        Ok(())
    }
}

fn param(v: &TupleValue) -> Param<'_> {
    match v {
        TupleValue::Null | TupleValue::UnchangedToast => Param::Null,
        TupleValue::Text(b) => Param::Text(b),
        TupleValue::Binary(b) => Param::Binary(b),
    }
}

/// A query naming each source column's built-in type (by `format_type` on
/// the target: built-in OIDs are the same on every server), NULL for a user
/// type (its OID is the source's own).
fn source_type_query(entry: &RelEntry) -> String {
    let items: Vec<String> = entry
        .source
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if c.type_oid < relation::FIRST_NORMAL_OID {
                format!("({i}, format_type({}, {}))", c.type_oid, c.type_modifier)
            } else {
                format!("({i}, NULL)")
            }
        })
        .collect();
    if items.is_empty() {
        return "SELECT NULL WHERE false".into();
    }
    format!(
        "SELECT n FROM (VALUES {}) v(i, n) ORDER BY i",
        items.join(", ")
    )
}
