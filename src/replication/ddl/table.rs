//! Tables created or altered inside a function or a `DO` block: the query
//! string holds no statement of their own, so the capture sends the
//! table's definition as the command left it (the same query, run on the
//! target, reads the target's side) and apply rebuilds the change from it:
//! a `CREATE TABLE`, or `ALTER TABLE` statements that make the target's
//! table match the source's (a reconcile, which needs the target's catalog,
//! so it runs in apply, inside the open transaction).

use serde::Deserialize;

use super::TableName;
use crate::db::quote_ident;

/// A table's definition as [`table_def_sql`] prints it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct TableDef {
    /// `r` (table) or `p` (partitioned table).
    #[serde(default)]
    pub relkind: String,
    /// `p` (permanent), `u` (unlogged).
    #[serde(default)]
    pub persistence: Option<String>,
    /// `reloptions` (`fillfactor=70`).
    #[serde(default)]
    pub options: Option<Vec<String>>,
    /// `pg_get_partkeydef`, for a partitioned table.
    #[serde(default)]
    pub partkey: Option<String>,
    /// The partition bound (`FOR VALUES …`, `DEFAULT`), for a partition.
    #[serde(default)]
    pub bound: Option<String>,
    /// The parent of a partition (or of an inheritance child).
    #[serde(default)]
    pub parent: Option<TableName>,
    #[serde(default)]
    pub columns: Vec<ColumnDef>,
    /// Not-null constraints (18+) are left out: they are the columns'.
    #[serde(default)]
    pub constraints: Vec<ConstraintDef>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct ColumnDef {
    pub name: String,
    /// `format_type(atttypid, atttypmod)`.
    #[serde(rename = "type")]
    pub type_name: String,
    /// The column's collation, quoted and qualified, where it is not the
    /// type's.
    #[serde(default)]
    pub collation: Option<String>,
    #[serde(default)]
    pub not_null: bool,
    /// The default expression (or the generation expression).
    #[serde(default)]
    pub default: Option<String>,
    /// `a` (ALWAYS) or `d` (BY DEFAULT).
    #[serde(default)]
    pub identity: Option<String>,
    /// `s` (stored) or `v` (virtual, 18+).
    #[serde(default)]
    pub generated: Option<String>,
    /// False for a column inherited from a parent.
    #[serde(default = "yes")]
    pub local: bool,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct ConstraintDef {
    pub name: String,
    /// `pg_get_constraintdef`.
    pub def: String,
    /// `contype`: p, u, c, f, x, t.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// False for a constraint inherited from a parent.
    #[serde(default = "yes")]
    pub local: bool,
}

/// A sequence's parameters (`pg_sequence`) and owner.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct SequenceDef {
    #[serde(rename = "type")]
    pub type_name: String,
    pub start: i64,
    pub increment: i64,
    pub min: i64,
    pub max: i64,
    pub cache: i64,
    pub cycle: bool,
    #[serde(default)]
    pub owned_by: Option<SequenceOwner>,
}

/// The column a sequence belongs to: `OWNED BY` (a serial), or an identity.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct SequenceOwner {
    pub schema: String,
    pub table: String,
    pub column: String,
    #[serde(default)]
    pub identity: bool,
}

fn yes() -> bool {
    true
}

/// The query (a scalar subquery of type json) that prints the definition
/// of the table whose oid is `rel`, with names qualified as under
/// `search_path = pg_catalog, pg_temp`. Valid on PostgreSQL 11 through 18
/// (`attgenerated`, 12+, is read through `to_jsonb`).
pub fn table_def_sql(rel: &str) -> String {
    format!(
        "(SELECT json_build_object(
    'relkind', t.relkind::text, 'persistence', t.relpersistence::text, 'options', t.reloptions,
    'partkey', CASE WHEN t.relkind = 'p' THEN pg_get_partkeydef(t.oid) END,
    'bound', CASE WHEN t.relispartition THEN pg_get_expr(t.relpartbound, t.oid) END,
    'parent', (SELECT json_build_object('schema', pn.nspname, 'name', p.relname)
                 FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
                 JOIN pg_namespace pn ON pn.oid = p.relnamespace
                WHERE i.inhrelid = t.oid ORDER BY i.inhseqno LIMIT 1),
    'columns', coalesce((SELECT json_agg(json_build_object(
        'name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
        'collation', CASE WHEN a.attcollation <> ty.typcollation THEN
          (SELECT quote_ident(cn.nspname) || '.' || quote_ident(co.collname)
             FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace
            WHERE co.oid = a.attcollation) END,
        'not_null', a.attnotnull, 'default', pg_get_expr(d.adbin, d.adrelid),
        'identity', nullif(a.attidentity::text, ''),
        'generated', nullif(to_jsonb(a)->>'attgenerated', ''),
        'local', a.attislocal) ORDER BY a.attnum)
      FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
      WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped), '[]'::json),
    'constraints', coalesce((SELECT json_agg(json_build_object(
        'name', x.conname, 'def', pg_get_constraintdef(x.oid), 'type', x.contype::text,
        'local', x.conislocal) ORDER BY x.conname)
      FROM pg_constraint x WHERE x.conrelid = t.oid AND x.contype <> 'n'), '[]'::json))
  FROM pg_class t WHERE t.oid = {rel})"
    )
}

/// The query (json) that prints the sequence whose oid is `seq`. (Its
/// aliases must not be names of the capture's plpgsql variables.)
pub fn sequence_def_sql(seq: &str) -> String {
    format!(
        "(SELECT json_build_object('type', format_type(s.seqtypid, NULL), 'start', s.seqstart,
    'increment', s.seqincrement, 'min', s.seqmin, 'max', s.seqmax, 'cache', s.seqcache,
    'cycle', s.seqcycle,
    'owned_by', (SELECT json_build_object('schema', sqn.nspname, 'table', sqr.relname,
                   'column', a.attname, 'identity', dep.deptype = 'i')
                   FROM pg_depend dep JOIN pg_class sqr ON sqr.oid = dep.refobjid
                   JOIN pg_namespace sqn ON sqn.oid = sqr.relnamespace
                   JOIN pg_attribute a ON a.attrelid = sqr.oid AND a.attnum = dep.refobjsubid
                  WHERE dep.classid = 'pg_class'::regclass AND dep.objid = s.seqrelid
                    AND dep.refclassid = 'pg_class'::regclass AND dep.deptype IN ('a', 'i')
                  LIMIT 1))
  FROM pg_sequence s WHERE s.seqrelid = {seq})"
    )
}

/// `"schema"."name"`.
pub fn qualified(t: &TableName) -> String {
    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
}

/// A sequence made by a command, with its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSequence {
    pub name: TableName,
    pub def: SequenceDef,
}

fn sequence_options(s: &SequenceDef) -> String {
    format!(
        "START WITH {} INCREMENT BY {} MINVALUE {} MAXVALUE {} CACHE {} {}",
        s.start,
        s.increment,
        s.min,
        s.max,
        s.cache,
        if s.cycle { "CYCLE" } else { "NO CYCLE" }
    )
}

/// `CREATE SEQUENCE` (or `ALTER SEQUENCE`) with the source's parameters.
pub fn sequence_statement(verb: &str, s: &NewSequence) -> String {
    format!(
        "{verb} SEQUENCE {} AS {} {}",
        qualified(&s.name),
        s.def.type_name,
        sequence_options(&s.def)
    )
}

/// `ALTER SEQUENCE … OWNED BY` for a serial's sequence (identity sequences
/// belong to their column already).
pub fn owned_by_statement(s: &NewSequence) -> Option<String> {
    let o = s.def.owned_by.as_ref().filter(|o| !o.identity)?;
    Some(format!(
        "ALTER SEQUENCE {} OWNED BY {}.{}.{}",
        qualified(&s.name),
        quote_ident(&o.schema),
        quote_ident(&o.table),
        quote_ident(&o.column)
    ))
}

/// A column's definition in `CREATE TABLE` or `ADD COLUMN`; `seqs` are the
/// sequences the same command made (an identity's, named as on the source).
pub fn column_sql(table: &TableName, c: &ColumnDef, seqs: &[NewSequence]) -> String {
    let mut s = format!("{} {}", quote_ident(&c.name), c.type_name);
    if let Some(coll) = &c.collation {
        s.push_str(&format!(" COLLATE {coll}"));
    }
    match (c.generated.as_deref(), &c.default) {
        (Some("v"), Some(e)) => s.push_str(&format!(" GENERATED ALWAYS AS ({e}) VIRTUAL")),
        (Some(_), Some(e)) => s.push_str(&format!(" GENERATED ALWAYS AS ({e}) STORED")),
        (None, Some(e)) => s.push_str(&format!(" DEFAULT {e}")),
        _ => {}
    }
    if let Some(kind) = c.identity.as_deref() {
        s.push_str(if kind == "a" {
            " GENERATED ALWAYS AS IDENTITY"
        } else {
            " GENERATED BY DEFAULT AS IDENTITY"
        });
        let seq = seqs.iter().find(|q| {
            q.def.owned_by.as_ref().is_some_and(|o| {
                o.identity
                    && o.schema == table.schema
                    && o.table == table.name
                    && o.column == c.name
            })
        });
        if let Some(q) = seq {
            s.push_str(&format!(
                " (SEQUENCE NAME {} {})",
                qualified(&q.name),
                sequence_options(&q.def)
            ));
        }
    }
    if c.not_null {
        s.push_str(" NOT NULL");
    }
    s
}

/// `CREATE TABLE` from a definition: columns, defaults, NOT NULL,
/// identity, generated columns and constraints; a partition as
/// `PARTITION OF` its parent with its bound; a partitioned table with its
/// key. Err: what it cannot rebuild.
pub fn create_table(
    name: &TableName,
    def: &TableDef,
    seqs: &[NewSequence],
) -> Result<String, String> {
    let unlogged = if def.persistence.as_deref() == Some("u") {
        "UNLOGGED "
    } else {
        ""
    };
    let mut s = format!("CREATE {unlogged}TABLE {}", qualified(name));
    let mut items: Vec<String> = Vec::new();
    match (&def.bound, &def.parent) {
        (Some(bound), Some(parent)) => {
            items.extend(
                def.constraints
                    .iter()
                    .filter(|c| c.local)
                    .map(|c| format!("CONSTRAINT {} {}", quote_ident(&c.name), c.def)),
            );
            s.push_str(&format!(" PARTITION OF {}", qualified(parent)));
            if !items.is_empty() {
                s.push_str(&format!(" (\n  {}\n)", items.join(",\n  ")));
            }
            s.push_str(&format!(" {bound}"));
        }
        (Some(_), None) => return Err("a partition whose parent is unknown".into()),
        (None, Some(parent)) => {
            return Err(format!(
                "a table that inherits from {} (INHERITS)",
                qualified(parent)
            ));
        }
        (None, None) => {
            items.extend(def.columns.iter().map(|c| column_sql(name, c, seqs)));
            items.extend(
                def.constraints
                    .iter()
                    .map(|c| format!("CONSTRAINT {} {}", quote_ident(&c.name), c.def)),
            );
            s.push_str(&format!(" (\n  {}\n)", items.join(",\n  ")));
        }
    }
    if let Some(key) = &def.partkey {
        s.push_str(&format!(" PARTITION BY {key}"));
    }
    if let Some(opts) = def.options.as_ref().filter(|o| !o.is_empty()) {
        s.push_str(&format!(" WITH ({})", opts.join(", ")));
    }
    Ok(s)
}

/// What apply reconciles: the source's table as an `ALTER TABLE` left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reconcile {
    pub table: TableName,
    pub definition: TableDef,
    /// Columns of this table the command dropped (its `drop` event).
    pub dropped_columns: Vec<String>,
    /// The column a `RENAME COLUMN` names (its new name).
    pub renamed_to: Option<String>,
    /// Sequences the command made (a serial or identity column added).
    pub sequences: Vec<NewSequence>,
    /// Run before reading the target (sequences to create, other dropped
    /// objects).
    pub before: Vec<String>,
    /// Run after the table's statements (`OWNED BY`).
    pub after: Vec<String>,
}

/// The `ALTER TABLE` statements that make `target` (the target's table
/// now) match the source's definition. Err: why not (apply stops).
///
/// Columns are matched by name. A target column the source no longer has
/// is dropped only when the command's drop event lists it; otherwise it
/// is renamed, when exactly one such column and exactly one new source
/// column of the same type (and, where the event names it, the renamed
/// one) make the rename certain. Never a guess that may lose data.
pub fn reconcile_statements(r: &Reconcile, target: &TableDef) -> Result<Vec<String>, String> {
    let t = qualified(&r.table);
    let src = &r.definition;
    if src.parent != target.parent || src.bound != target.bound {
        return Err(format!(
            "{t} is attached, detached or bound differently on the source (pgshift does not reconcile partitions)"
        ));
    }
    if src.relkind != target.relkind || src.partkey != target.partkey {
        return Err(format!("{t} is of a different kind on the source"));
    }
    let mut out = Vec::new();
    let alter = |what: String| format!("ALTER TABLE {t} {what}");
    // Columns the command dropped.
    for c in &target.columns {
        if r.dropped_columns.contains(&c.name) {
            out.push(alter(format!("DROP COLUMN {}", quote_ident(&c.name))));
        }
    }
    let remaining: Vec<&ColumnDef> = target
        .columns
        .iter()
        .filter(|c| !r.dropped_columns.contains(&c.name))
        .collect();
    let gone: Vec<&ColumnDef> = remaining
        .iter()
        .copied()
        .filter(|c| !src.columns.iter().any(|s| s.name == c.name))
        .collect();
    let new: Vec<&ColumnDef> = src
        .columns
        .iter()
        .filter(|s| !remaining.iter().any(|c| c.name == s.name))
        .collect();
    if !gone.is_empty() {
        let certain = gone.len() == 1
            && new.len() == 1
            && gone[0].type_name == new[0].type_name
            && r.renamed_to.as_ref().is_none_or(|n| *n == new[0].name);
        if !certain {
            let list = |cs: &[&ColumnDef]| {
                cs.iter()
                    .map(|c| format!("{} {}", c.name, c.type_name))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(format!(
                "cannot tell how the columns of {t} were renamed: on the target but not on the source (and not dropped): {}; on the source but not on the target: {}",
                list(&gone),
                if new.is_empty() {
                    "none".into()
                } else {
                    list(&new)
                }
            ));
        }
        // A RENAME COLUMN is a command of its own: nothing else changed.
        out.push(alter(format!(
            "RENAME COLUMN {} TO {}",
            quote_ident(&gone[0].name),
            quote_ident(&new[0].name)
        )));
        return Ok(out);
    }
    // Constraints the source no longer has (by name): dropped first, so
    // that column changes are not held by them. A constraint only renamed
    // (same definition) is renamed.
    let src_cons = &src.constraints;
    let tgt_cons: Vec<&ConstraintDef> = target.constraints.iter().collect();
    let cons_gone: Vec<&ConstraintDef> = tgt_cons
        .iter()
        .copied()
        .filter(|c| !src_cons.iter().any(|s| s.name == c.name))
        .collect();
    let cons_new: Vec<&ConstraintDef> = src_cons
        .iter()
        .filter(|s| !tgt_cons.iter().any(|c| c.name == s.name))
        .collect();
    let mut add_cons = Vec::new();
    if cons_gone.len() == 1 && cons_new.len() == 1 && cons_gone[0].def == cons_new[0].def {
        out.push(alter(format!(
            "RENAME CONSTRAINT {} TO {}",
            quote_ident(&cons_gone[0].name),
            quote_ident(&cons_new[0].name)
        )));
    } else {
        for c in &cons_gone {
            // IF EXISTS: a dropped column takes its constraints with it.
            out.push(alter(format!(
                "DROP CONSTRAINT IF EXISTS {}",
                quote_ident(&c.name)
            )));
        }
        add_cons.extend(cons_new.iter().copied());
    }
    for s in src_cons {
        let Some(c) = tgt_cons.iter().find(|c| c.name == s.name) else {
            continue;
        };
        if c.def == s.def {
            continue;
        }
        if c.def == format!("{} NOT VALID", s.def) {
            out.push(alter(format!(
                "VALIDATE CONSTRAINT {}",
                quote_ident(&s.name)
            )));
        } else {
            out.push(alter(format!("DROP CONSTRAINT {}", quote_ident(&s.name))));
            add_cons.push(s);
        }
    }
    // Columns on both sides.
    for s in &src.columns {
        let Some(c) = remaining.iter().find(|c| c.name == s.name) else {
            continue;
        };
        let col = quote_ident(&s.name);
        let generated_differs =
            s.generated != c.generated || (s.generated.is_some() && s.default != c.default);
        if generated_differs {
            if s.generated.is_none() && c.generated.is_some() {
                out.push(alter(format!("ALTER COLUMN {col} DROP EXPRESSION")));
            } else {
                return Err(format!(
                    "the generation expression of column {} of {t} changed",
                    s.name
                ));
            }
        }
        let type_differs = s.type_name != c.type_name || s.collation != c.collation;
        let default_differs = s.generated.is_none() && s.default != c.default;
        let has_default = c.default.is_some() && c.generated.is_none();
        // A default is dropped before a type change (it may not cast).
        let drop_first = has_default && type_differs;
        if drop_first || (has_default && default_differs && s.default.is_none()) {
            out.push(alter(format!("ALTER COLUMN {col} DROP DEFAULT")));
        }
        if type_differs {
            let coll = s
                .collation
                .as_ref()
                .map(|c| format!(" COLLATE {c}"))
                .unwrap_or_default();
            out.push(alter(format!(
                "ALTER COLUMN {col} TYPE {ty}{coll} USING {col}::{ty}",
                ty = s.type_name
            )));
        }
        if s.generated.is_none()
            && let Some(d) = &s.default
            && (default_differs || drop_first)
        {
            out.push(alter(format!("ALTER COLUMN {col} SET DEFAULT {d}")));
        }
        // An identity is dropped before NOT NULL changes and added after
        // (it needs NOT NULL).
        if s.identity.is_none() && c.identity.is_some() {
            out.push(alter(format!("ALTER COLUMN {col} DROP IDENTITY")));
        }
        if s.not_null != c.not_null {
            out.push(alter(format!(
                "ALTER COLUMN {col} {} NOT NULL",
                if s.not_null { "SET" } else { "DROP" }
            )));
        }
        match (s.identity.as_deref(), c.identity.as_deref()) {
            (Some(k), None) => out.push(alter(format!(
                "ALTER COLUMN {col} ADD {}",
                identity_sql(&r.table, s, k, &r.sequences)
            ))),
            (Some(k), Some(j)) if k != j => out.push(alter(format!(
                "ALTER COLUMN {col} SET GENERATED {}",
                if k == "a" { "ALWAYS" } else { "BY DEFAULT" }
            ))),
            _ => {}
        }
    }
    for s in &new {
        out.push(alter(format!(
            "ADD COLUMN {}",
            column_sql(&r.table, s, &r.sequences)
        )));
    }
    for s in add_cons {
        out.push(alter(format!(
            "ADD CONSTRAINT {} {}",
            quote_ident(&s.name),
            s.def
        )));
    }
    if src.persistence != target.persistence {
        out.push(alter(
            if src.persistence.as_deref() == Some("u") {
                "SET UNLOGGED"
            } else {
                "SET LOGGED"
            }
            .into(),
        ));
    }
    if src.options != target.options {
        let keys = |o: &Option<Vec<String>>| -> Vec<String> {
            o.iter()
                .flatten()
                .filter_map(|kv| kv.split('=').next().map(str::to_string))
                .collect()
        };
        let old = keys(&target.options);
        if !old.is_empty() {
            out.push(alter(format!("RESET ({})", old.join(", "))));
        }
        if let Some(o) = src.options.as_ref().filter(|o| !o.is_empty()) {
            out.push(alter(format!("SET ({})", o.join(", "))));
        }
    }
    if out.is_empty() && r.before.is_empty() {
        return Err(format!(
            "the command changed nothing of {t} that pgshift reconciles (columns, defaults, NOT NULL, identity, constraints, storage options), so it changed something else (a partition attached or detached, statistics, storage, triggers, replica identity, owner…)"
        ));
    }
    Ok(out)
}

fn identity_sql(table: &TableName, c: &ColumnDef, kind: &str, seqs: &[NewSequence]) -> String {
    let with = ColumnDef {
        identity: Some(kind.to_string()),
        not_null: false,
        default: None,
        generated: None,
        collation: None,
        ..c.clone()
    };
    // "<col> <type> GENERATED … AS IDENTITY (…)": keep what follows the type.
    let full = column_sql(table, &with, seqs);
    let head = format!("{} {} ", quote_ident(&c.name), c.type_name);
    full.strip_prefix(&head).unwrap_or(&full).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tn(s: &str, n: &str) -> TableName {
        TableName {
            schema: s.into(),
            name: n.into(),
        }
    }

    fn col(name: &str, ty: &str) -> ColumnDef {
        ColumnDef {
            name: name.into(),
            type_name: ty.into(),
            local: true,
            ..Default::default()
        }
    }

    fn con(name: &str, def: &str, kind: &str) -> ConstraintDef {
        ConstraintDef {
            name: name.into(),
            def: def.into(),
            kind: kind.into(),
            local: true,
        }
    }

    fn table(columns: Vec<ColumnDef>, constraints: Vec<ConstraintDef>) -> TableDef {
        TableDef {
            relkind: "r".into(),
            persistence: Some("p".into()),
            columns,
            constraints,
            ..Default::default()
        }
    }

    fn reconcile(src: TableDef, dropped: &[&str]) -> Reconcile {
        Reconcile {
            table: tn("public", "t"),
            definition: src,
            dropped_columns: dropped.iter().map(|s| s.to_string()).collect(),
            renamed_to: None,
            sequences: vec![],
            before: vec![],
            after: vec![],
        }
    }

    #[test]
    fn builds_create_table_with_serial_default_check_and_foreign_key() {
        let seq = NewSequence {
            name: tn("public", "items_id_seq"),
            def: SequenceDef {
                type_name: "integer".into(),
                start: 1,
                increment: 1,
                min: 1,
                max: 2147483647,
                cache: 1,
                cycle: false,
                owned_by: Some(SequenceOwner {
                    schema: "public".into(),
                    table: "items".into(),
                    column: "id".into(),
                    identity: false,
                }),
            },
        };
        let mut id = col("id", "integer");
        id.not_null = true;
        id.default = Some("nextval('public.items_id_seq'::regclass)".into());
        let mut qty = col("qty", "integer");
        qty.default = Some("1".into());
        let mut name = col("name", "text");
        name.collation = Some("\"pg_catalog\".\"C\"".into());
        let def = table(
            vec![id, qty, name, col("order_id", "bigint")],
            vec![
                con("items_pkey", "PRIMARY KEY (id)", "p"),
                con("items_qty_check", "CHECK ((qty > 0))", "c"),
                con(
                    "items_order_id_fkey",
                    "FOREIGN KEY (order_id) REFERENCES public.orders(id)",
                    "f",
                ),
            ],
        );
        let sql = create_table(&tn("public", "items"), &def, std::slice::from_ref(&seq)).unwrap();
        assert_eq!(
            sql,
            "CREATE TABLE \"public\".\"items\" (
  \"id\" integer DEFAULT nextval('public.items_id_seq'::regclass) NOT NULL,
  \"qty\" integer DEFAULT 1,
  \"name\" text COLLATE \"pg_catalog\".\"C\",
  \"order_id\" bigint,
  CONSTRAINT \"items_pkey\" PRIMARY KEY (id),
  CONSTRAINT \"items_qty_check\" CHECK ((qty > 0)),
  CONSTRAINT \"items_order_id_fkey\" FOREIGN KEY (order_id) REFERENCES public.orders(id)
)"
        );
        assert_eq!(
            sequence_statement("CREATE", &seq),
            "CREATE SEQUENCE \"public\".\"items_id_seq\" AS integer START WITH 1 INCREMENT BY 1 MINVALUE 1 MAXVALUE 2147483647 CACHE 1 NO CYCLE"
        );
        assert_eq!(
            owned_by_statement(&seq).unwrap(),
            "ALTER SEQUENCE \"public\".\"items_id_seq\" OWNED BY \"public\".\"items\".\"id\""
        );
    }

    #[test]
    fn builds_partitions_partitioned_tables_identity_and_generated_columns() {
        let def = TableDef {
            relkind: "r".into(),
            bound: Some("FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')".into()),
            parent: Some(tn("public", "events")),
            columns: vec![ColumnDef {
                local: false,
                ..col("id", "integer")
            }],
            constraints: vec![ConstraintDef {
                local: false,
                ..con("events_2026_pkey", "PRIMARY KEY (id, at)", "p")
            }],
            ..Default::default()
        };
        assert_eq!(
            create_table(&tn("public", "events_2026"), &def, &[]).unwrap(),
            "CREATE TABLE \"public\".\"events_2026\" PARTITION OF \"public\".\"events\" FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')"
        );
        let mut id = col("id", "bigint");
        id.identity = Some("a".into());
        id.not_null = true;
        let mut twice = col("twice", "bigint");
        twice.generated = Some("s".into());
        twice.default = Some("(id * 2)".into());
        let def = TableDef {
            relkind: "p".into(),
            partkey: Some("RANGE (id)".into()),
            columns: vec![id, twice],
            ..Default::default()
        };
        assert_eq!(
            create_table(&tn("s", "p"), &def, &[]).unwrap(),
            "CREATE TABLE \"s\".\"p\" (
  \"id\" bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  \"twice\" bigint GENERATED ALWAYS AS ((id * 2)) STORED
) PARTITION BY RANGE (id)"
        );
        let inherits = TableDef {
            parent: Some(tn("public", "base")),
            ..Default::default()
        };
        assert!(create_table(&tn("public", "child"), &inherits, &[]).is_err());
    }

    #[test]
    fn reconciles_added_dropped_and_changed_columns() {
        let mut status = col("status", "text");
        status.default = Some("'new'::text".into());
        status.not_null = true;
        let target = table(
            vec![
                col("id", "integer"),
                col("legacy", "text"),
                col("n", "integer"),
            ],
            vec![con("t_n_check", "CHECK ((n > 0))", "c")],
        );
        let mut n = col("n", "bigint");
        n.default = Some("0".into());
        let src = table(
            vec![col("id", "integer"), n, status],
            vec![con("t_id_check", "CHECK ((id > 0))", "c")],
        );
        let r = reconcile(src, &["legacy"]);
        assert_eq!(
            reconcile_statements(&r, &target).unwrap(),
            vec![
                r#"ALTER TABLE "public"."t" DROP COLUMN "legacy""#,
                r#"ALTER TABLE "public"."t" DROP CONSTRAINT IF EXISTS "t_n_check""#,
                r#"ALTER TABLE "public"."t" ALTER COLUMN "n" TYPE bigint USING "n"::bigint"#,
                r#"ALTER TABLE "public"."t" ALTER COLUMN "n" SET DEFAULT 0"#,
                r#"ALTER TABLE "public"."t" ADD COLUMN "status" text DEFAULT 'new'::text NOT NULL"#,
                r#"ALTER TABLE "public"."t" ADD CONSTRAINT "t_id_check" CHECK ((id > 0))"#,
            ]
        );
    }

    #[test]
    fn a_changed_default_is_set_and_a_removed_one_dropped() {
        let mut old = col("s", "text");
        old.default = Some("'new'::text".into());
        let mut new = col("s", "text");
        new.default = Some("'fresh'::text".into());
        let target = table(vec![old], vec![]);
        assert_eq!(
            reconcile_statements(&reconcile(table(vec![new], vec![]), &[]), &target).unwrap(),
            vec![r#"ALTER TABLE "public"."t" ALTER COLUMN "s" SET DEFAULT 'fresh'::text"#]
        );
        assert_eq!(
            reconcile_statements(
                &reconcile(table(vec![col("s", "text")], vec![]), &[]),
                &target
            )
            .unwrap(),
            vec![r#"ALTER TABLE "public"."t" ALTER COLUMN "s" DROP DEFAULT"#]
        );
    }

    #[test]
    fn a_column_gone_without_a_drop_is_renamed_only_when_certain() {
        let target = table(vec![col("id", "integer"), col("amount", "numeric")], vec![]);
        let src = table(vec![col("id", "integer"), col("total", "numeric")], vec![]);
        let mut r = reconcile(src, &[]);
        r.renamed_to = Some("total".into());
        assert_eq!(
            reconcile_statements(&r, &target).unwrap(),
            vec![r#"ALTER TABLE "public"."t" RENAME COLUMN "amount" TO "total""#]
        );
        // The event names another column: not this rename.
        r.renamed_to = Some("other".into());
        assert!(reconcile_statements(&r, &target).is_err());
        // Two columns gone, two new: which became which is a guess.
        let target = table(
            vec![col("id", "integer"), col("a", "text"), col("b", "text")],
            vec![],
        );
        let src = table(
            vec![col("id", "integer"), col("x", "text"), col("y", "text")],
            vec![],
        );
        let err = reconcile_statements(&reconcile(src, &[]), &target).unwrap_err();
        assert!(err.contains("cannot tell how the columns"), "{err}");
        assert!(
            err.contains("a text, b text") && err.contains("x text, y text"),
            "{err}"
        );
        // Gone and not dropped, nothing new: never dropped by a guess.
        let target = table(vec![col("id", "integer"), col("a", "text")], vec![]);
        let src = table(vec![col("id", "integer")], vec![]);
        assert!(reconcile_statements(&reconcile(src.clone(), &[]), &target).is_err());
        // A different type: not a rename.
        let target = table(vec![col("id", "integer"), col("a", "text")], vec![]);
        let src2 = table(vec![col("id", "integer"), col("b", "integer")], vec![]);
        assert!(reconcile_statements(&reconcile(src2, &[]), &target).is_err());
        assert_eq!(
            reconcile_statements(&reconcile(src, &["a"]), &target).unwrap(),
            vec![r#"ALTER TABLE "public"."t" DROP COLUMN "a""#]
        );
    }

    #[test]
    fn reconciles_constraints_not_null_and_identity() {
        let target = table(
            vec![col("id", "integer"), col("v", "integer")],
            vec![
                con("old_name", "CHECK ((v > 0))", "c"),
                con(
                    "t_fk",
                    "FOREIGN KEY (v) REFERENCES public.o(id) NOT VALID",
                    "f",
                ),
            ],
        );
        let mut id = col("id", "integer");
        id.not_null = true;
        id.identity = Some("d".into());
        let src = table(
            vec![id, col("v", "integer")],
            vec![
                con("new_name", "CHECK ((v > 0))", "c"),
                con("t_fk", "FOREIGN KEY (v) REFERENCES public.o(id)", "f"),
            ],
        );
        assert_eq!(
            reconcile_statements(&reconcile(src, &[]), &target).unwrap(),
            vec![
                r#"ALTER TABLE "public"."t" RENAME CONSTRAINT "old_name" TO "new_name""#,
                r#"ALTER TABLE "public"."t" VALIDATE CONSTRAINT "t_fk""#,
                r#"ALTER TABLE "public"."t" ALTER COLUMN "id" SET NOT NULL"#,
                r#"ALTER TABLE "public"."t" ALTER COLUMN "id" ADD GENERATED BY DEFAULT AS IDENTITY"#,
            ]
        );
        let same = table(vec![col("id", "integer")], vec![]);
        let err = reconcile_statements(&reconcile(same.clone(), &[]), &same).unwrap_err();
        assert!(err.contains("changed nothing"), "{err}");
    }
}
