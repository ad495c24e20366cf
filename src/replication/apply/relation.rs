//! Source relations (from Relation messages) mapped onto target tables: the
//! column check that stops apply on a schema difference, and the SQL of the
//! per-relation statements.

use std::collections::HashMap;
use std::sync::Arc;

use crate::db::{quote_ident, quote_literal};
use crate::replication::pgoutput::{Relation, ReplicaIdentity, TypeInfo};
use crate::wire::connect::TextRow;

/// First OID of user-defined objects: below it, type OIDs are the same on every server.
const FIRST_NORMAL_OID: u32 = 16384;

/// Types without a usable `=` (or with one that is not equality): rows are
/// matched on their text form under replica identity FULL.
const TEXT_MATCHED_TYPES: &[u32] = &[
    114, 199, // json, json[]
    142, 143, // xml, xml[]
    600, 1017, // point, point[]
    602, 1019, // path
    603, 1020, // box
    604, 1027, // polygon
    628, 629, // line
    718, 719, // circle
];

/// The target side of a relation, read from the target catalog.
#[derive(Clone, Debug)]
pub(super) struct Target {
    /// Per source column: the target type OID (parameters are parsed with it).
    pub param_types: Vec<u32>,
    /// 'r' plain table, 'p' partitioned.
    pub relkind: char,
    /// Per source column: the target type by qualified name, without a
    /// typmod (so that assignment applies the column's, as for parameters).
    pub casts: Vec<String>,
    /// Row changes may be folded into net-change batches (see `batch`).
    pub batchable: bool,
}

/// The statements of net-change batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum BatchKind {
    Insert,
    Update,
    Delete,
}

/// Which statement shape a row needs; masks are per source column.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum StmtKey {
    Insert,
    Update { set: Vec<bool>, by: Vec<bool> },
    Delete { by: Vec<bool> },
}

pub(super) struct RelEntry {
    pub source: Relation,
    /// `"schema"."table"` for SQL.
    pub quoted: String,
    /// `schema.table` for messages.
    pub display: Arc<str>,
    pub target: Option<Target>,
    pub statements: HashMap<StmtKey, String>,
    pub batch_statements: HashMap<BatchKind, String>,
}

impl RelEntry {
    pub fn new(source: Relation) -> RelEntry {
        RelEntry {
            quoted: format!(
                "{}.{}",
                quote_ident(&source.namespace),
                quote_ident(&source.name)
            ),
            display: format!("{}.{}", source.namespace, source.name).into(),
            source,
            target: None,
            statements: HashMap::new(),
            batch_statements: HashMap::new(),
        }
    }

    pub fn full_identity(&self) -> bool {
        self.source.replica_identity == ReplicaIdentity::Full
    }

    /// The columns rows are found by under DEFAULT / USING INDEX.
    pub fn key_mask(&self) -> Vec<bool> {
        self.source.columns.iter().map(|c| c.key).collect()
    }

    /// The key rows are folded by in a batch: none under FULL (rows may be
    /// duplicates; only inserts are batched there).
    pub fn batch_key(&self) -> Vec<bool> {
        let full = self.full_identity();
        self.source.columns.iter().map(|c| c.key && !full).collect()
    }

    /// The catalog query that describes the target table.
    pub fn catalog_query(&self) -> String {
        format!(
            "SELECT c.relkind::text, a.attname, a.atttypid::int8::text, format_type(a.atttypid, a.atttypmod), \
             tn.nspname, t.typname FROM pg_class c \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace tn ON tn.oid = t.typnamespace \
             WHERE c.oid = to_regclass({}) ORDER BY a.attnum",
            quote_literal(&self.quoted)
        )
    }

    /// Checks the target table (rows of [`catalog_query`](Self::catalog_query))
    /// against the source columns. `source_type_names` names each source
    /// column's type for messages.
    pub fn resolve(
        &self,
        rows: &[TextRow],
        types: &HashMap<u32, TypeInfo>,
        source_type_names: &[String],
    ) -> Result<Target, Mismatch> {
        let field = |r: &TextRow, i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        if rows.is_empty() {
            return Err(Mismatch {
                difference: "the table does not exist on the target (or has no columns)".into(),
                fix: format!(
                    "create the table {} on the target with the source's definition",
                    self.display
                ),
            });
        }
        let relkind = field(&rows[0], 0).chars().next().unwrap_or('r');
        let by_name: HashMap<String, &TextRow> = rows.iter().map(|r| (field(r, 1), r)).collect();
        let mut param_types = Vec::with_capacity(self.source.columns.len());
        let mut casts = Vec::with_capacity(self.source.columns.len());
        for (i, col) in self.source.columns.iter().enumerate() {
            let src_type = source_type_names.get(i).cloned().unwrap_or_default();
            let Some(row) = by_name.get(&col.name) else {
                return Err(Mismatch {
                    difference: format!(
                        "column {} ({src_type}) exists on the source but not on the target",
                        quote_ident(&col.name)
                    ),
                    fix: format!(
                        "ALTER TABLE {} ADD COLUMN {} {src_type};",
                        self.quoted,
                        quote_ident(&col.name)
                    ),
                });
            };
            let target_oid: u32 = field(row, 2).parse().unwrap_or(0);
            let same = if col.type_oid < FIRST_NORMAL_OID {
                target_oid == col.type_oid
            } else {
                // User types have their own OIDs per server: compare by name when known.
                types
                    .get(&col.type_oid)
                    .is_none_or(|t| t.namespace == field(row, 4) && t.name == field(row, 5))
            };
            if !same {
                return Err(Mismatch {
                    difference: format!(
                        "column {} is {src_type} on the source but {} on the target",
                        quote_ident(&col.name),
                        field(row, 3)
                    ),
                    fix: format!(
                        "ALTER TABLE {} ALTER COLUMN {} TYPE {src_type};",
                        self.quoted,
                        quote_ident(&col.name)
                    ),
                });
            }
            param_types.push(target_oid);
            casts.push(format!(
                "{}.{}",
                quote_ident(&field(row, 4)),
                quote_ident(&field(row, 5))
            ));
        }
        Ok(Target {
            param_types,
            relkind,
            casts,
            batchable: false,
        })
    }

    /// The SQL and parameter types of a statement shape.
    pub fn statement_sql(&self, key: &StmtKey) -> (String, Vec<u32>) {
        let target = self
            .target
            .as_ref()
            .expect("resolved before statements are built");
        let cols = &self.source.columns;
        let mut types = Vec::new();
        let mut next = |i: usize, types: &mut Vec<u32>| {
            types.push(target.param_types[i]);
            types.len()
        };
        match key {
            StmtKey::Insert => {
                let names: Vec<String> = cols.iter().map(|c| quote_ident(&c.name)).collect();
                let params: Vec<String> = (0..cols.len())
                    .map(|i| format!("${}", next(i, &mut types)))
                    .collect();
                // Rows carry their identity values: keep them, as native apply does.
                let sql = format!(
                    "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({})",
                    self.quoted,
                    names.join(", "),
                    params.join(", ")
                );
                (sql, types)
            }
            StmtKey::Update { set, by } => {
                let sets: Vec<String> = (0..cols.len())
                    .filter(|i| set[*i])
                    .map(|i| format!("{} = ${}", quote_ident(&cols[i].name), next(i, &mut types)))
                    .collect();
                let cond = self.condition(by, &mut types, &mut next);
                let sql = format!(
                    "UPDATE {} SET {} WHERE {cond}",
                    self.quoted,
                    sets.join(", ")
                );
                (sql, types)
            }
            StmtKey::Delete { by } => {
                let cond = self.condition(by, &mut types, &mut next);
                (format!("DELETE FROM {} WHERE {cond}", self.quoted), types)
            }
        }
    }

    /// A query answering whether the target table's rows are independent
    /// under the replica identity, so that changes may be batched: no
    /// trigger fires in replica mode, it is not partitioned, and its only
    /// unique constraint (if any) is a plain unique index on exactly the
    /// key columns.
    pub fn batchable_query(&self) -> String {
        let keys: Vec<String> = self
            .source
            .columns
            .iter()
            .filter(|c| c.key && !self.full_identity())
            .map(|c| quote_literal(&c.name))
            .collect();
        format!(
            "SELECT (c.relkind = 'r' \
             AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal AND g.tgenabled IN ('A', 'R')) \
             AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND (i.indisunique OR i.indisexclusion) \
               AND (i.indisexclusion OR i.indexprs IS NOT NULL OR i.indpred IS NOT NULL \
                 OR ARRAY(SELECT a.attname::text FROM generate_series(0, i.indnkeyatts - 1) k \
                          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[k] ORDER BY 1) \
                    IS DISTINCT FROM ARRAY(SELECT unnest(ARRAY[{}]::text[]) ORDER BY 1))))::text \
             FROM pg_class c WHERE c.oid = to_regclass({})",
            keys.join(", "),
            quote_literal(&self.quoted)
        )
    }

    /// The SQL of a net-change batch statement: one `text[]` parameter per
    /// column (all columns for insert and update, the key columns for
    /// delete), unnested and cast to the column types.
    pub fn batch_sql(&self, kind: BatchKind) -> (String, Vec<u32>) {
        const TEXT_ARRAY: u32 = 1009;
        let target = self.target.as_ref().expect("resolved before batching");
        let cols = &self.source.columns;
        let included: Vec<usize> = match kind {
            BatchKind::Delete => (0..cols.len()).filter(|i| cols[*i].key).collect(),
            _ => (0..cols.len()).collect(),
        };
        let arrays: Vec<String> = (1..=included.len())
            .map(|n| format!("${n}::text[]"))
            .collect();
        let aliases: Vec<String> = (1..=included.len()).map(|n| format!("c{n}")).collect();
        let from = format!(
            "unnest({}) AS pgshift_u({})",
            arrays.join(", "),
            aliases.join(", ")
        );
        let value =
            |pos: usize, col: usize| format!("pgshift_u.c{}::{}", pos + 1, target.casts[col]);
        let key_match = || {
            included
                .iter()
                .enumerate()
                .filter(|(_, c)| cols[**c].key)
                .map(|(pos, c)| {
                    format!(
                        "pgshift_t.{} = {}",
                        quote_ident(&cols[*c].name),
                        value(pos, *c)
                    )
                })
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let sql = match kind {
            BatchKind::Insert => {
                let names: Vec<String> = cols.iter().map(|c| quote_ident(&c.name)).collect();
                let values: Vec<String> = (0..cols.len()).map(|c| value(c, c)).collect();
                format!(
                    "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {from}",
                    self.quoted,
                    names.join(", "),
                    values.join(", ")
                )
            }
            BatchKind::Update => {
                let sets: Vec<String> = (0..cols.len())
                    .filter(|c| !cols[*c].key)
                    .map(|c| format!("{} = {}", quote_ident(&cols[c].name), value(c, c)))
                    .collect();
                format!(
                    "UPDATE {} AS pgshift_t SET {} FROM {from} WHERE {}",
                    self.quoted,
                    sets.join(", "),
                    key_match()
                )
            }
            BatchKind::Delete => format!(
                "DELETE FROM {} AS pgshift_t USING {from} WHERE {}",
                self.quoted,
                key_match()
            ),
        };
        (sql, vec![TEXT_ARRAY; included.len()])
    }

    /// How a row is found. DEFAULT / USING INDEX: key equality (index-usable).
    /// FULL: every old value with IS NOT DISTINCT FROM (NULLs match), and one
    /// row only even among duplicates, through its ctid.
    fn condition(
        &self,
        by: &[bool],
        types: &mut Vec<u32>,
        next: &mut impl FnMut(usize, &mut Vec<u32>) -> usize,
    ) -> String {
        let target = self.target.as_ref().expect("resolved");
        let cols = &self.source.columns;
        let mut terms = Vec::new();
        for i in (0..cols.len()).filter(|i| by[*i]) {
            let name = quote_ident(&cols[i].name);
            let p = next(i, types);
            terms.push(if !self.full_identity() {
                format!("{name} = ${p}")
            } else if TEXT_MATCHED_TYPES.contains(&target.param_types[i]) {
                format!("{name}::text IS NOT DISTINCT FROM ${p}::text")
            } else {
                format!("{name} IS NOT DISTINCT FROM ${p}")
            });
        }
        let all = if terms.is_empty() {
            "true".to_string()
        } else {
            terms.join(" AND ")
        };
        if self.full_identity() {
            format!(
                "ctid = (SELECT ctid FROM {} WHERE {all} LIMIT 1)",
                self.quoted
            )
        } else {
            all
        }
    }
}

/// A difference between a source relation and its target table.
#[derive(Debug, Clone)]
pub(super) struct Mismatch {
    pub difference: String,
    pub fix: String,
}
