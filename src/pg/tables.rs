//! The tables a migration carries, as the source's catalog lists them
//! (ordinary tables and leaf partitions, their copied columns, whether
//! binary COPY is safe for them): one listing for the copy, verify and the
//! publication, so they always agree.

use std::collections::HashMap;

use thiserror::Error;
use tokio_postgres::Client;

use super::Version;
use crate::db::quote_ident;
use crate::filter::TableFilter;

#[derive(Debug, Error)]
#[error("{what}: {}", crate::db::describe(.source))]
pub struct CatalogError {
    what: String,
    source: tokio_postgres::Error,
}

fn sql_err(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CatalogError {
    let what = what.into();
    move |source| CatalogError { what, source }
}

/// Types with OIDs below this are built in and identical on every server of
/// a major version; user types (enums, composites …) get different OIDs.
const FIRST_NORMAL_OID: u32 = 16384;

/// A source table to copy.
#[derive(Clone, Debug)]
pub struct SourceTable {
    /// The table's OID on the source (what its post-data items hang off).
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// Heap + TOAST bytes on the source.
    pub size_bytes: u64,
    /// Heap blocks on the source (for ctid ranges).
    pub blocks: u64,
    /// Quoted names of the copied columns (generated columns are left out).
    pub columns: Vec<String>,
    /// Binary COPY is safe: no column embeds a server-specific type OID.
    pub binary: bool,
}

impl SourceTable {
    /// `schema.table` for people.
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
    /// `"schema"."table"` for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// A table whose data is all on the target, as the copy announces it
/// (`CopyProgress::table_events`) to whoever builds its indexes.
#[derive(Clone, Debug)]
pub(crate) struct CopiedTable {
    /// The table's OID on the source.
    pub oid: u32,
    /// `schema.table`, for people.
    pub table: String,
}

struct TypeInfo {
    typtype: String,
    base: u32,
    elem: u32,
    is_array: bool,
    has_binary: bool,
}

/// Whether binary COPY of `oid` reads back identically on another server.
/// Composites and arrays carry element type OIDs in their binary form, which
/// differ between servers for user-defined types; types without send/receive
/// functions have no binary form at all.
fn binary_safe(types: &HashMap<u32, TypeInfo>, oid: u32, depth: u32) -> bool {
    let Some(t) = types.get(&oid) else {
        return false;
    };
    if depth > 16 || !t.has_binary {
        return false;
    }
    match t.typtype.as_str() {
        "d" => binary_safe(types, t.base, depth + 1),
        "e" => true,
        "b" if t.is_array => {
            t.elem < FIRST_NORMAL_OID
                && types.get(&t.elem).is_some_and(|e| e.typtype != "c")
                && binary_safe(types, t.elem, depth + 1)
        }
        "b" | "r" | "m" => oid < FIRST_NORMAL_OID,
        _ => false,
    }
}

/// The tables of the connected database that hold data: ordinary tables and
/// leaf partitions (not partitioned parents, views, foreign or temporary
/// tables, nor tables that belong to an extension), largest first.
pub async fn list_tables(
    c: &Client,
    filter: &TableFilter,
) -> Result<Vec<SourceTable>, CatalogError> {
    let version = Version::of(c)
        .await
        .map_err(sql_err("reading the server version"))?;
    let rows = c
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, \
                    coalesce(pg_table_size(c.oid), 0), \
                    coalesce(pg_relation_size(c.oid), 0) / current_setting('block_size')::int8 \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND c.relpersistence <> 't' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgshift') \
               AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' \
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                               AND d.objid = c.oid AND d.deptype = 'e') \
             ORDER BY 4 DESC, 2, 3",
            &[],
        )
        .await
        .map_err(sql_err("listing source tables"))?;
    let mut tables = Vec::new();
    let mut oids = Vec::new();
    for r in rows {
        let schema: String = r.get(1);
        let name: String = r.get(2);
        if !filter.includes(&schema, &name) {
            continue;
        }
        let oid = r.get::<_, u32>(0);
        oids.push(oid);
        tables.push(SourceTable {
            oid,
            schema,
            name,
            size_bytes: r.get::<_, i64>(3).max(0) as u64,
            blocks: r.get::<_, i64>(4).max(0) as u64,
            columns: vec![],
            binary: true,
        });
    }
    let types = load_types(c).await?;
    let cols = c
        .query(&crate::pg::catalog::copy_columns_sql(version), &[&oids])
        .await
        .map_err(sql_err("listing source columns"))?;
    let index: HashMap<u32, usize> = oids.iter().enumerate().map(|(i, o)| (*o, i)).collect();
    for r in cols {
        let Some(&i) = index.get(&r.get::<_, u32>(0)) else {
            continue;
        };
        let t = &mut tables[i];
        t.columns.push(quote_ident(r.get(1)));
        t.binary &= binary_safe(&types, r.get(2), 0);
    }
    Ok(tables)
}

async fn load_types(c: &Client) -> Result<HashMap<u32, TypeInfo>, CatalogError> {
    let rows = c
        .query(
            "SELECT oid, typtype::text, typbasetype, typelem, typcategory = 'A', \
                    typsend <> 0 AND typreceive <> 0 FROM pg_type",
            &[],
        )
        .await
        .map_err(sql_err("reading source types"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, u32>(0),
                TypeInfo {
                    typtype: r.get(1),
                    base: r.get(2),
                    elem: r.get(3),
                    is_array: r.get(4),
                    has_binary: r.get(5),
                },
            )
        })
        .collect())
}
