//! Relations, columns, sequences and privileges: generated columns (12+),
//! `pg_partition_root` (12+), `has_parameter_privilege` (15+); sequences
//! through `pg_sequence` (10+).

use super::{Probe, Version};
use crate::db::quote_literal;

impl Version {
    /// Does `WHERE ctid >= … AND ctid < …` scan only that block range (a TID
    /// range scan, 14+)? Before, it reads the whole table, so splitting a
    /// table's copy into ranges would read it once per range.
    pub(crate) fn tid_range_scans(self) -> bool {
        self.at_least(14)
    }
}

/// A condition on `pg_attribute a` that leaves out generated columns (12+),
/// whose values the target computes itself and COPY cannot write.
fn not_generated(v: Version) -> &'static str {
    if v.at_least(12) {
        "AND a.attgenerated = ''"
    } else {
        ""
    }
}

/// The oid of the partitioned table at the top of `rel`'s partition tree
/// (`rel` itself when it is no partition). 11 lacks `pg_partition_root`:
/// there the parents are walked in `pg_inherits` (a partition's parents
/// are always partitioned tables).
fn partition_root(v: Version, rel: &str) -> String {
    if v.at_least(12) {
        format!("pg_partition_root({rel})")
    } else {
        format!(
            "(WITH RECURSIVE up(oid, depth) AS (SELECT {rel}, 0 \
               UNION ALL SELECT i.inhparent, up.depth + 1 FROM pg_inherits i JOIN up ON i.inhrelid = up.oid) \
             SELECT oid FROM up ORDER BY depth DESC LIMIT 1)"
        )
    }
}

/// Columns of the relations in `$1::oid[]` that COPY writes: relation oid,
/// name, type oid, in column order.
pub(crate) fn copy_columns_sql(v: Version) -> String {
    format!(
        "SELECT a.attrelid, a.attname::text, a.atttypid FROM pg_attribute a \
         WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped {} \
         ORDER BY a.attrelid, a.attnum",
        not_generated(v)
    )
}

/// Every user sequence: name as `schema.name` SQL, last value (NULL when
/// never called) and start. The `pg_sequences` view hides `is_called`, so
/// its building blocks are used (`pg_sequence` and `pg_sequence_last_value`, 10+).
pub(crate) fn read_sequences_sql(_v: Version) -> &'static str {
    "SELECT format('%I.%I', n.nspname, c.relname), \
        pg_sequence_last_value(c.oid), s.seqstart \
     FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace \
     JOIN pg_sequence s ON s.seqrelid = c.oid \
     WHERE c.relkind = 'S' AND c.relpersistence <> 't' \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgshift') \
       AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast%' \
       AND CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(c.oid, 'SELECT, USAGE') END"
}

/// May the current user SET `parameter`? Before 15 only superusers may SET
/// a superuser-only parameter, and there is no function to ask: false.
pub(crate) fn may_set_parameter(v: Version, parameter: &str) -> String {
    if v.at_least(15) {
        format!(
            "has_parameter_privilege({}, 'SET')",
            quote_literal(parameter)
        )
    } else {
        "false".into()
    }
}

/// How to let `user_sql` (a quoted role) SET `parameter`.
pub(crate) fn grant_set_parameter(v: Version, parameter: &str, user_sql: &str) -> String {
    if v.at_least(15) {
        format!("GRANT SET ON PARAMETER {parameter} TO {user_sql};")
    } else {
        format!("connect as a superuser (before PostgreSQL 15 only superusers may SET {parameter})")
    }
}

/// Tables and materialized views of the connected database with what the
/// replica identity checks need (see validate/objects.rs for the columns).
pub(crate) fn relations_sql(v: Version) -> String {
    format!(
        "SELECT n.nspname::text, c.relname::text, c.relkind::text, c.relpersistence = 'u', c.relreplident::text, \
                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident AND i.indisvalid), \
                (SELECT ic.relname::text FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
                  WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid AND i.indimmediate \
                    AND i.indpred IS NULL AND i.indexprs IS NULL \
                    AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid \
                                    AND a.attnum = ANY (i.indkey::int2[]) AND NOT a.attnotnull) \
                  ORDER BY i.indnatts, ic.relname LIMIT 1), \
                pg_has_role(c.relowner, 'USAGE'), \
                rn.nspname::text, rc.relname::text \
         FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_class rc ON c.relispartition AND rc.oid = {} \
         LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace \
         WHERE c.relkind IN ('r', 'm') AND c.relpersistence <> 't' \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgshift') AND n.nspname NOT LIKE 'pg\\_toast%' \
         ORDER BY 1, 2",
        partition_root(v, "c.oid")
    )
}

pub fn probes(v: Version) -> Vec<Probe> {
    vec![
        Probe::new("catalog.copy_columns", copy_columns_sql(v)),
        Probe::new("catalog.read_sequences", read_sequences_sql(v)),
        Probe::new(
            "catalog.may_set_parameter",
            format!(
                "SELECT {}",
                may_set_parameter(v, "session_replication_role")
            ),
        ),
        Probe::new("catalog.relations", relations_sql(v)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_version() {
        let v = Version::major_release;
        assert_eq!(not_generated(v(11)), "");
        assert!(copy_columns_sql(v(12)).contains("attgenerated"));
        assert!(partition_root(v(11), "c.oid").contains("pg_inherits"));
        assert_eq!(partition_root(v(12), "c.oid"), "pg_partition_root(c.oid)");
        assert_eq!(may_set_parameter(v(14), "x"), "false");
        assert!(grant_set_parameter(v(15), "x", "\"u\"").starts_with("GRANT SET"));
    }
}
