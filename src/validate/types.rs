//! Whether every column type of the carried tables can exist on the target,
//! checked before anything starts: the schema copy creates user types
//! (enums, domains, composites, ranges) on the target, but a type that an
//! extension provides needs that extension installable there, and a
//! built-in type must exist in the target's version (e.g. `abstime` is gone
//! in 12, multiranges came in 14). Each problem names the table and column.

use std::collections::BTreeSet;

use super::Check;
use super::database::Available;
use super::objects::DbContext;
use super::server::query_failed;

const NAME: &str = "column_types";

/// Columns of carried tables with every type they are built from: through
/// domains, array elements, range subtypes and composite fields.
const LEAF_TYPES: &str = "WITH RECURSIVE walk(nspname, relname, attname, top, t, depth) AS ( \
       SELECT n.nspname::text, c.relname::text, a.attname::text, a.atttypid, a.atttypid, 0 \
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
       JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
       WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence <> 't' \
         AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' \
     UNION \
       SELECT w.nspname, w.relname, w.attname, w.top, x.t, w.depth + 1 \
       FROM walk w JOIN pg_type ty ON ty.oid = w.t \
       CROSS JOIN LATERAL ( \
         SELECT ty.typbasetype AS t WHERE ty.typtype = 'd' \
         UNION ALL SELECT ty.typelem WHERE ty.typcategory = 'A' AND ty.typelem <> 0 \
         UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = ty.oid \
         UNION ALL SELECT f.atttypid FROM pg_attribute f WHERE ty.typtype = 'c' \
           AND f.attrelid = ty.typrelid AND f.attnum > 0 AND NOT f.attisdropped) x \
       WHERE w.depth < 16) \
   SELECT DISTINCT w.nspname, w.relname, w.attname, format_type(w.top, NULL), \
          format_type(w.t, NULL), ty.oid < 16384, tn.nspname::text || '.' || ty.typname::text, e.extname::text \
   FROM walk w JOIN pg_type ty ON ty.oid = w.t JOIN pg_namespace tn ON tn.oid = ty.typnamespace \
   LEFT JOIN pg_depend d ON d.classid = 'pg_type'::regclass AND d.objid = ty.oid AND d.deptype = 'e' \
   LEFT JOIN pg_extension e ON e.oid = d.refobjid \
   ORDER BY 1, 2, 3, 5";

/// One type a column is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ColumnType {
    /// `schema.table.column`, for messages.
    pub column: String,
    /// The column's declared type.
    pub declared: String,
    /// The type it is built from (itself, a base, an element, …).
    pub part: String,
    /// `pg_catalog.name` of a built-in type, to look up on the target.
    pub builtin: Option<String>,
    /// The extension that provides it.
    pub extension: Option<String>,
}

pub(crate) async fn column_types_check(ctx: &DbContext<'_>) -> Check {
    let rows = match ctx.client.query(LEAF_TYPES, &[]).await {
        Ok(r) => r,
        Err(e) => return query_failed(NAME, ctx.db, e),
    };
    let types: Vec<ColumnType> = rows
        .iter()
        .filter(|r| ctx.filter.includes(r.get(0), r.get(1)))
        .map(|r| ColumnType {
            column: format!(
                "{}.{}.{}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            ),
            declared: r.get(3),
            part: r.get(4),
            builtin: r.get::<_, bool>(5).then(|| r.get(6)),
            extension: r.get(7),
        })
        .collect();
    let builtins: Vec<String> = types
        .iter()
        .filter_map(|t| t.builtin.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let missing = match ctx.target {
        Some(t) => match t
            .client
            .query(
                "SELECT n FROM unnest($1::text[]) n WHERE to_regtype(n) IS NULL",
                &[&builtins],
            )
            .await
        {
            Ok(rows) => Some(rows.iter().map(|r| r.get(0)).collect::<BTreeSet<String>>()),
            Err(e) => return query_failed(NAME, ctx.db, e),
        },
        None => None,
    };
    judge(ctx.db, &types, ctx.available, missing.as_ref())
}

/// The check from the column types, what the target can install and the
/// built-in types it lacks (None: the target was not reachable).
fn judge(
    db: &str,
    types: &[ColumnType],
    available: Option<&Available>,
    missing_builtins: Option<&BTreeSet<String>>,
) -> Check {
    let mut problems = BTreeSet::new();
    for t in types {
        let what = if t.part == t.declared {
            format!("column {} ({})", t.column, t.declared)
        } else {
            format!(
                "column {} ({}, built from {})",
                t.column, t.declared, t.part
            )
        };
        if let (Some(ext), Some(avail)) = (&t.extension, available)
            && !avail.contains_key(ext)
        {
            problems.insert(format!(
                "{what}: type {} comes from extension {ext}, which the target cannot install",
                t.part
            ));
        }
        if let (Some(name), Some(missing)) = (&t.builtin, missing_builtins)
            && missing.contains(name)
        {
            problems.insert(format!(
                "{what}: the target's PostgreSQL version has no type {}",
                t.part
            ));
        }
    }
    let columns = types
        .iter()
        .map(|t| &t.column)
        .collect::<BTreeSet<_>>()
        .len();
    if problems.is_empty() {
        return Check::succeeded(
            NAME,
            db,
            format!(
                "the types of all {columns} columns exist on the target or are created with the schema"
            ),
        );
    }
    Check::failed(
        NAME,
        db,
        format!(
            "{} column type(s) cannot exist on the target: {}",
            problems.len(),
            problems.into_iter().collect::<Vec<_>>().join("; ")
        ),
        "install the extensions on the target server, or change or drop these columns on the \
         source (or exclude their tables with [migration] exclude_tables) before migrating",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(
        column: &str,
        declared: &str,
        part: &str,
        builtin: bool,
        ext: Option<&str>,
    ) -> ColumnType {
        ColumnType {
            column: column.into(),
            declared: declared.into(),
            part: part.into(),
            builtin: builtin.then(|| format!("pg_catalog.{part}")),
            extension: ext.map(str::to_string),
        }
    }

    #[test]
    fn names_the_table_and_column_of_an_unavailable_type() {
        let types = [
            col("s.t.tags", "s.tagset", "s.tagset", false, None),
            col("s.t.tags", "s.tagset", "hstore", false, Some("hstore")),
            col("s.t.old", "abstime[]", "abstime", true, None),
            col("s.t.ok", "integer", "integer", true, None),
        ];
        let avail = Available::from([("citext".to_string(), vec!["1.6".to_string()])]);
        let missing = BTreeSet::from(["pg_catalog.abstime".to_string()]);
        let c = judge("db", &types, Some(&avail), Some(&missing));
        let text = serde_json::to_string(&c).unwrap();
        assert!(
            text.contains("column s.t.tags (s.tagset, built from hstore): type hstore comes from extension hstore, which the target cannot install"),
            "{text}"
        );
        assert!(
            text.contains("column s.t.old (abstime[], built from abstime): the target's PostgreSQL version has no type abstime"),
            "{text}"
        );
        assert_eq!(c.status, crate::validate::Status::Failed);
        let avail = Available::from([("hstore".to_string(), vec!["1.8".to_string()])]);
        let c = judge("db", &types, Some(&avail), Some(&BTreeSet::new()));
        assert_eq!(c.status, crate::validate::Status::Succeeded);
        assert!(c.found.contains("all 3 columns"), "{}", c.found);
    }
}
