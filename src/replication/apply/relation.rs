//! Source relations (from Relation messages) mapped onto target tables: the
//! column check that stops apply on a schema difference, and the SQL of the
//! per-relation statements.

use std::collections::HashMap;
use std::sync::Arc;

use crate::db::{quote_ident, quote_literal};
use crate::replication::pgoutput::{Relation, ReplicaIdentity, TypeInfo};
use crate::wire::connect::TextRow;

/// First OID of user-defined objects: below it, type OIDs are the same on every server.
pub(super) const FIRST_NORMAL_OID: u32 = 16384;

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
    /// Per source column: how both sides of a key comparison are cast. A
    /// domain has no operators of its own where its base is polymorphic
    /// (`enum_domain = enum_domain` does not resolve), so a domain column is
    /// compared as its base type (a relabeling: indexes still apply).
    pub key_cast: Vec<String>,
    /// Per source column: the same for replica identity FULL, where rows are
    /// found by every old value: as text where the type has no usable
    /// equality (json, geometry) or is a user type (an extension's `=` may
    /// not be exact, a composite's may not exist); text output of a stored
    /// value is exact.
    pub full_cast: Vec<String>,
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

    pub(crate) fn full_identity(&self) -> bool {
        self.source.replica_identity == ReplicaIdentity::Full
    }

    /// The columns rows are found by under DEFAULT / USING INDEX.
    pub(crate) fn key_mask(&self) -> Vec<bool> {
        self.source.columns.iter().map(|c| c.key).collect()
    }

    /// The key rows are folded by in a batch: none under FULL (rows may be
    /// duplicates; only inserts are batched there).
    pub(crate) fn batch_key(&self) -> Vec<bool> {
        let full = self.full_identity();
        self.source.columns.iter().map(|c| c.key && !full).collect()
    }

    /// The catalog query that describes the target table: per column its
    /// type, and the base type at the end of its domain chain (what
    /// pgoutput's Type message names for a domain column).
    pub(crate) fn catalog_query(&self) -> String {
        format!(
            "SELECT c.relkind::text, a.attname, a.atttypid::int8::text, format_type(a.atttypid, a.atttypmod), \
             tn.nspname, t.typname, bn.nspname, bt.typname, t.typtype::text, bt.oid::int8::text FROM pg_class c \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace tn ON tn.oid = t.typnamespace \
             CROSS JOIN LATERAL (WITH RECURSIVE chain(oid, depth) AS ( \
               SELECT t.oid, 0 UNION ALL SELECT d.typbasetype, chain.depth + 1 FROM chain \
               JOIN pg_type d ON d.oid = chain.oid WHERE d.typtype = 'd' AND chain.depth < 64) \
               SELECT chain.oid FROM chain ORDER BY chain.depth DESC LIMIT 1) base \
             JOIN pg_type bt ON bt.oid = base.oid JOIN pg_namespace bn ON bn.oid = bt.typnamespace \
             WHERE c.oid = to_regclass({}) ORDER BY a.attnum",
            quote_literal(&self.quoted)
        )
    }

    /// The query (run on the source, with `search_path` = pg_catalog so
    /// that every other name comes qualified) of the source columns'
    /// definitions, for messages and remedies: name, type, default, NOT NULL.
    pub(crate) fn source_columns_query(&self) -> String {
        format!(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), \
             pg_get_expr(d.adbin, d.adrelid), a.attnotnull::text, t.typtype::text \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = to_regclass({}) AND a.attnum > 0 AND NOT a.attisdropped",
            quote_literal(&self.quoted)
        )
    }

    /// Checks the target table (rows of [`catalog_query`](Self::catalog_query))
    /// against the source columns.
    ///
    /// How a column's type is matched: a built-in type (OID below 16384) by
    /// OID, which is the same on every server. A user type by name — but
    /// pgoutput's Type message names the column's *base* type (PostgreSQL's
    /// `logicalrep_write_typ` sends `getBaseType`'s namespace and name, with
    /// pg_catalog as an empty namespace), so for a domain column it names
    /// e.g. `int4`, never the domain. The name is therefore compared with the
    /// base type at the end of the target column's domain chain, never with
    /// the target type's own name: a domain on both sides matches, and a
    /// type that differs in its base is reported.
    ///
    /// `names` says what is known of each source column for messages:
    /// built-in types by `format_type`, and, when the applier could read the
    /// source catalog, every column's definition there.
    pub(crate) fn resolve(
        &self,
        rows: &[TextRow],
        types: &HashMap<u32, TypeInfo>,
        names: &SourceNames,
    ) -> Result<Target, Mismatch> {
        let field = |r: &TextRow, i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        if rows.is_empty() {
            return Err(Mismatch {
                difference: "the table does not exist on the target (or has no columns)".into(),
                fix: None,
                manual: format!(
                    "create the table {} on the target with the source's definition",
                    self.display
                ),
            });
        }
        let relkind = field(&rows[0], 0).chars().next().unwrap_or('r');
        let by_name: HashMap<String, &TextRow> = rows.iter().map(|r| (field(r, 1), r)).collect();
        let mut param_types = Vec::with_capacity(self.source.columns.len());
        let mut casts = Vec::with_capacity(self.source.columns.len());
        let (mut key_cast, mut full_cast) = (Vec::new(), Vec::new());
        for (i, col) in self.source.columns.iter().enumerate() {
            let Some(row) = by_name.get(&col.name) else {
                return Err(self.missing_column(i, types, names));
            };
            let target_oid: u32 = field(row, 2).parse().unwrap_or(0);
            let same = if col.type_oid < FIRST_NORMAL_OID {
                target_oid == col.type_oid
            } else {
                // User types have their own OIDs per server: compare by name when known.
                types.get(&col.type_oid).is_none_or(|t| {
                    let ns = if t.namespace.is_empty() {
                        "pg_catalog"
                    } else {
                        &t.namespace
                    };
                    ns == field(row, 6) && t.name == field(row, 7)
                })
            };
            if !same {
                return Err(self.type_difference(
                    i,
                    types,
                    names,
                    &field(row, 3),
                    field(row, 8) == "d",
                ));
            }
            let base_oid: u32 = field(row, 9).parse().unwrap_or(0);
            let key = if field(row, 8) == "d" {
                format!(
                    "::{}.{}",
                    quote_ident(&field(row, 6)),
                    quote_ident(&field(row, 7))
                )
            } else {
                String::new()
            };
            full_cast.push(
                if TEXT_MATCHED_TYPES.contains(&base_oid) || base_oid >= FIRST_NORMAL_OID {
                    "::text".to_string()
                } else {
                    key.clone()
                },
            );
            key_cast.push(key);
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
            key_cast,
            full_cast,
        })
    }

    /// How source column `i`'s type is named in messages: the source
    /// catalog's `format_type` when read, a built-in type's name, or what
    /// the Type message says (only the base type of a domain).
    fn source_type_text(
        &self,
        i: usize,
        types: &HashMap<u32, TypeInfo>,
        names: &SourceNames,
    ) -> String {
        let col = &self.source.columns[i];
        if let Some(def) = names.columns.get(&col.name) {
            return def.type_sql.clone();
        }
        if let Some(Some(builtin)) = names.builtin.get(i) {
            return builtin.clone();
        }
        match types.get(&col.type_oid) {
            Some(t) => {
                let base = if t.namespace.is_empty() {
                    t.name.clone()
                } else {
                    format!("{}.{}", quote_ident(&t.namespace), quote_ident(&t.name))
                };
                format!(
                    "the user type with OID {} on the source, {base} or a domain over it (the stream names only a domain's base type)",
                    col.type_oid
                )
            }
            None => format!("the type with OID {} on the source", col.type_oid),
        }
    }

    /// A source column the target table lacks. The statement adding it is
    /// offered only with an exact type: the source catalog's definition
    /// (with its default and NOT NULL), or a built-in type's name.
    fn missing_column(
        &self,
        i: usize,
        types: &HashMap<u32, TypeInfo>,
        names: &SourceNames,
    ) -> Mismatch {
        let col = &self.source.columns[i];
        let name = quote_ident(&col.name);
        let src_type = self.source_type_text(i, types, names);
        let definition = match names.columns.get(&col.name) {
            Some(def) => Some(def.definition()),
            None => names.builtin.get(i).cloned().flatten(),
        };
        Mismatch {
            difference: format!(
                "column {name} ({src_type}) exists on the source but not on the target"
            ),
            fix: definition
                .as_ref()
                .map(|d| format!("ALTER TABLE {} ADD COLUMN {name} {d};", self.quoted)),
            manual: format!(
                "add column {name} to {} on the target with the source's definition ({src_type})",
                self.display
            ),
        }
    }

    /// A column whose type differs. `ALTER COLUMN … TYPE` is offered only
    /// when the source type is exactly known and the target column's type
    /// is not a domain (changing it would silently drop the domain and its
    /// checks from the target column); otherwise both types are named.
    fn type_difference(
        &self,
        i: usize,
        types: &HashMap<u32, TypeInfo>,
        names: &SourceNames,
        target_type: &str,
        target_is_domain: bool,
    ) -> Mismatch {
        let col = &self.source.columns[i];
        let name = quote_ident(&col.name);
        let src_type = self.source_type_text(i, types, names);
        let exact = match names.columns.get(&col.name) {
            Some(def) => Some(def.type_sql.clone()),
            None => names.builtin.get(i).cloned().flatten(),
        };
        Mismatch {
            difference: format!(
                "column {name} is {src_type} on the source but {target_type} on the target"
            ),
            // USING: a conversion without an assignment cast (text to a
            // number) is tried rather than refused outright; values that do
            // not convert make the statement fail, changing nothing.
            fix: exact.filter(|_| !target_is_domain).map(|t| {
                format!(
                    "ALTER TABLE {} ALTER COLUMN {name} TYPE {t} USING {name}::{t};",
                    self.quoted
                )
            }),
            manual: format!(
                "make column {name} of {} on the target the source's type (source: {src_type}; target: {target_type})",
                self.display
            ),
        }
    }

    /// The SQL and parameter types of a statement shape.
    pub(crate) fn statement_sql(&self, key: &StmtKey) -> (String, Vec<u32>) {
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
    pub(crate) fn batchable_query(&self) -> String {
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

    /// `COPY` of every source column into the target table, for a batch
    /// of inserts. Like `INSERT … OVERRIDING SYSTEM VALUE`, COPY writes
    /// the given values into identity columns.
    pub(crate) fn copy_sql(&self) -> String {
        let names: Vec<String> = self
            .source
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        format!("COPY {} ({}) FROM STDIN", self.quoted, names.join(", "))
    }

    /// The SQL of a net-change batch statement: one `text[]` parameter per
    /// column (all columns for update, the key columns for delete),
    /// unnested and cast to the column types; for inserts, their `COPY`.
    pub(crate) fn batch_sql(&self, kind: BatchKind) -> (String, Vec<u32>) {
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
                    let cast = &target.key_cast[*c];
                    format!(
                        "pgshift_t.{}{cast} = {}{cast}",
                        quote_ident(&cols[*c].name),
                        value(pos, *c)
                    )
                })
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let sql = match kind {
            // Inserts go by COPY, which takes no parameters.
            BatchKind::Insert => return (self.copy_sql(), Vec::new()),
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
                let cast = &target.key_cast[i];
                format!("{name}{cast} = ${p}{cast}")
            } else {
                let cast = &target.full_cast[i];
                format!("{name}{cast} IS NOT DISTINCT FROM ${p}{cast}")
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
    /// A statement that makes the target match, only when it is certainly
    /// right and safe; otherwise `manual` says what to do.
    pub fix: Option<String>,
    pub manual: String,
}

/// What is known of the source columns' types, for messages and remedies.
#[derive(Debug, Clone, Default)]
pub(super) struct SourceNames {
    /// Per source column: a built-in type's `format_type` (None for user types).
    pub builtin: Vec<Option<String>>,
    /// By column name: the source catalog's definitions, when read.
    pub columns: HashMap<String, SourceColumn>,
}

/// A source column's definition from the source catalog.
#[derive(Debug, Clone)]
pub(super) struct SourceColumn {
    /// `format_type`, qualified (read with `search_path` = pg_catalog).
    pub type_sql: String,
    pub default: Option<String>,
    pub not_null: bool,
}

impl SourceColumn {
    /// Rows of [`RelEntry::source_columns_query`], by column name.
    pub(crate) fn from_rows(rows: &[TextRow]) -> HashMap<String, SourceColumn> {
        let field = |r: &TextRow, i: usize| r.get(i).cloned().flatten();
        rows.iter()
            .filter_map(|r| {
                Some((
                    field(r, 0)?,
                    SourceColumn {
                        type_sql: field(r, 1)?,
                        default: field(r, 2),
                        not_null: field(r, 3).as_deref() == Some("true"),
                    },
                ))
            })
            .collect()
    }

    /// The column definition after its name in `ADD COLUMN`.
    fn definition(&self) -> String {
        let mut d = self.type_sql.clone();
        if let Some(default) = &self.default {
            d.push_str(&format!(" DEFAULT {default}"));
        }
        if self.not_null {
            d.push_str(" NOT NULL");
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::pgoutput::Column;

    /// `"s"."t"` with one column `d` of type OID `oid`.
    fn entry(oid: u32) -> RelEntry {
        RelEntry::new(Relation {
            xid: None,
            oid: 1,
            namespace: "s".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                key: false,
                name: "d".into(),
                type_oid: oid,
                type_modifier: -1,
            }],
        })
    }

    /// A target catalog row for column `name`.
    fn row(
        name: &str,
        ty: (&str, &str),
        base: (&str, &str),
        display: &str,
        typtype: &str,
    ) -> TextRow {
        [
            "r", name, "20000", display, ty.0, ty.1, base.0, base.1, typtype, "23",
        ]
        .iter()
        .map(|s| Some(s.to_string()))
        .collect()
    }

    /// The Type message of a domain over int4: pgoutput sends the base's name.
    fn domain_over_int4(oid: u32) -> HashMap<u32, TypeInfo> {
        HashMap::from([(
            oid,
            TypeInfo {
                xid: None,
                oid,
                namespace: String::new(),
                name: "int4".into(),
            },
        )])
    }

    fn source(type_sql: &str) -> SourceNames {
        SourceNames {
            builtin: vec![None],
            columns: HashMap::from([(
                "d".to_string(),
                SourceColumn {
                    type_sql: type_sql.into(),
                    default: None,
                    not_null: false,
                },
            )]),
        }
    }

    #[test]
    fn a_domain_column_matches_a_target_domain_over_the_same_base() {
        let e = entry(16400);
        let rows = [row(
            "d",
            ("s", "posint"),
            ("pg_catalog", "int4"),
            "s.posint",
            "d",
        )];
        let t = e
            .resolve(&rows, &domain_over_int4(16400), &SourceNames::default())
            .expect("matches");
        assert_eq!(t.casts, vec!["\"s\".\"posint\"".to_string()]);
    }

    #[test]
    fn a_domain_against_another_base_is_named_without_a_statement_unless_known() {
        let e = entry(16400);
        let rows = [row(
            "d",
            ("pg_catalog", "text"),
            ("pg_catalog", "text"),
            "text",
            "b",
        )];
        let types = domain_over_int4(16400);
        let m = e
            .resolve(&rows, &types, &SourceNames::default())
            .unwrap_err();
        assert_eq!(m.fix, None);
        assert!(
            m.difference.contains("int4 or a domain over it")
                && m.difference.contains("text on the target"),
            "{}",
            m.difference
        );
        // The source catalog names the domain: the statement makes the
        // target column that domain, never the base type.
        let m = e.resolve(&rows, &types, &source("s.posint")).unwrap_err();
        assert_eq!(
            m.fix.as_deref(),
            Some("ALTER TABLE \"s\".\"t\" ALTER COLUMN \"d\" TYPE s.posint USING \"d\"::s.posint;")
        );
    }

    #[test]
    fn a_target_domain_is_never_altered_away() {
        let e = entry(23);
        let rows = [row(
            "d",
            ("s", "posint"),
            ("pg_catalog", "int4"),
            "s.posint",
            "d",
        )];
        let names = SourceNames {
            builtin: vec![Some("integer".into())],
            ..Default::default()
        };
        let m = e.resolve(&rows, &HashMap::new(), &names).unwrap_err();
        assert_eq!(m.fix, None);
        assert!(
            m.manual.contains("source: integer; target: s.posint"),
            "{}",
            m.manual
        );
    }

    #[test]
    fn a_missing_column_is_added_only_with_an_exact_definition() {
        let e = entry(16401);
        let rows = [row(
            "other",
            ("pg_catalog", "int4"),
            ("pg_catalog", "int4"),
            "integer",
            "b",
        )];
        let types = HashMap::from([(
            16401,
            TypeInfo {
                xid: None,
                oid: 16401,
                namespace: "s".into(),
                name: "_mood".into(),
            },
        )]);
        let m = e
            .resolve(&rows, &types, &SourceNames::default())
            .unwrap_err();
        assert_eq!(m.fix, None);
        assert!(m.manual.contains("add column \"d\""), "{}", m.manual);
        let mut names = source("s.mood[]");
        names.columns.get_mut("d").unwrap().default = Some("'{a}'::s.mood[]".into());
        names.columns.get_mut("d").unwrap().not_null = true;
        let m = e.resolve(&rows, &types, &names).unwrap_err();
        assert_eq!(
            m.fix.as_deref(),
            Some(
                "ALTER TABLE \"s\".\"t\" ADD COLUMN \"d\" s.mood[] DEFAULT '{a}'::s.mood[] NOT NULL;"
            )
        );
    }
}
