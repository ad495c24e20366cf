//! DDL replication: commands captured on the source (`capture`) arrive in
//! the stream as events of the transaction that ran them; this module reads
//! an event and decides what apply runs on the target, exactly between the
//! data changes before and after it.
//!
//! What runs is the statement the source ran, cut out of the client's query
//! string (which may hold several statements, DDL and not), under the same
//! `search_path` and role. DDL run inside a function or a `DO` block has no
//! statement of its own in the query string: it is rebuilt from the
//! catalog where PostgreSQL can print the object (indexes, functions,
//! procedures, views, triggers, sequences, drops) and, for tables, from the
//! definition the capture sends (`table`): a `CREATE TABLE`, or a reconcile
//! of the target's table with the source's; anything else stops apply with
//! the source's query and a remedy.

pub mod capture;
mod control;
pub mod table;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::db::quote_ident;
use crate::filter::TableFilter;
use crate::sqltext;

pub use self::control::{DdlControl, DdlRecord, DdlStop};
use self::table::NewSequence;
pub use self::table::{Reconcile, SequenceDef, TableDef};

/// One object a DDL command created, altered or dropped.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct DdlObject {
    /// The sub-command's tag (`CREATE SEQUENCE` inside a `CREATE TABLE`).
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(rename = "type", default, deserialize_with = "null_as_empty")]
    pub kind: String,
    #[serde(default)]
    pub schema: Option<String>,
    /// Empty where the catalog gives none (a GRANT's objects).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub identity: String,
    /// The table the object is or belongs to (index, trigger, constraint).
    #[serde(default)]
    pub table: Option<TableName>,
    /// The object's definition as the catalog prints it, when it can.
    #[serde(default)]
    pub def: Option<String>,
    /// A dropped object's address (`pg_event_trigger_dropped_objects()`).
    #[serde(default)]
    pub names: Option<Vec<String>>,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// A table's definition as the command left it (`table` and `table
    /// column` objects).
    #[serde(default)]
    pub rel: Option<TableDef>,
    /// A sequence's parameters (`sequence` objects).
    #[serde(default)]
    pub seq: Option<SequenceDef>,
    /// The column of a `table column` object (a renamed column's new name).
    #[serde(default)]
    pub column: Option<String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

/// A DDL event as the source's capture sends it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct DdlEvent {
    pub v: u32,
    /// `end` (a command finished) or `drop` (what it dropped, just before
    /// its `end`).
    pub kind: String,
    /// `<source xid>.<n>`: the n-th event of that source transaction.
    pub id: String,
    /// The xid of the (sub)transaction that ran the command.
    #[serde(default)]
    pub sub: Option<u32>,
    pub tag: String,
    /// Earlier firings of `tag` in the same query string.
    #[serde(default)]
    pub nth: usize,
    /// The client's whole query string (`current_query()`).
    pub query: String,
    /// The effective schemas of the session, quoted, comma-separated.
    #[serde(default)]
    pub search_path: Option<String>,
    /// The role that ran the command.
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub objects: Vec<DdlObject>,
}

/// Why an event could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("a DDL event without a valid signature (not emitted by pgshift's capture)")]
    Unsigned,
    #[error("a DDL event that is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("a DDL event of an unknown version {0}")]
    Version(u32),
}

/// Reads a signed logical message's content: `<hex HMAC> <json>`.
pub fn read_signed(content: &[u8], key: Option<&[u8]>) -> Result<DdlEvent, EventError> {
    use hmac::{Hmac, KeyInit, Mac};
    let key = key.ok_or(EventError::Unsigned)?;
    let space = content
        .iter()
        .position(|&b| b == b' ')
        .ok_or(EventError::Unsigned)?;
    let (mac_hex, json) = (&content[..space], &content[space + 1..]);
    let mac = decode_hex(mac_hex).ok_or(EventError::Unsigned)?;
    let mut m = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    m.update(json);
    m.verify_slice(&mac).map_err(|_| EventError::Unsigned)?;
    read_event(json)
}

/// Reads an event's JSON (a row of the capture's table, which only the
/// capture may write, carries no signature).
pub fn read_event(json: &[u8]) -> Result<DdlEvent, EventError> {
    let ev: DdlEvent = serde_json::from_slice(json)?;
    if ev.v != 1 {
        return Err(EventError::Version(ev.v));
    }
    Ok(ev)
}

fn decode_hex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|p| {
            let hi = (p[0] as char).to_digit(16)?;
            let lo = (p[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

/// The (sub)transaction xid a DDL event of the capture with message
/// `prefix` names, read without checking its signature (only to place a
/// savepoint; the event itself is verified when applied).
pub fn event_subxact(
    prefix: &str,
    m: &crate::replication::pgoutput::LogicalMessage,
) -> Option<u32> {
    if !m.transactional || m.prefix != prefix {
        return None;
    }
    #[derive(Deserialize)]
    struct Sub {
        sub: Option<u32>,
    }
    let space = m.content.iter().position(|&b| b == b' ')?;
    serde_json::from_slice::<Sub>(&m.content[space + 1..])
        .ok()?
        .sub
}

/// Decodes a `bytea` column's text output (`\x…`).
pub fn decode_bytea_text(s: &[u8]) -> Option<Vec<u8>> {
    decode_hex(s.strip_prefix(b"\\x")?)
}

/// What apply does with a DDL command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DdlPlan {
    /// Nothing: the command does not concern the target.
    Ignore(&'static str),
    /// Run these statements, in order.
    Run {
        statements: Vec<String>,
        /// They cannot run in a transaction block (`CREATE INDEX
        /// CONCURRENTLY`, …): run on their own, outside the group.
        alone: bool,
        /// Whether the statements are the source's own text (not rebuilt
        /// from the catalog).
        verbatim: bool,
    },
    /// Make the target's table match the source's definition: apply reads
    /// the target's table inside the open transaction and runs the `ALTER
    /// TABLE` statements [`table::reconcile_statements`] finds.
    Reconcile(Box<Reconcile>),
    /// Cannot be reproduced: apply stops, naming it.
    Unsupported(String),
}

/// Commands that are the source's own business.
fn ignored_tag(tag: &str) -> bool {
    tag.ends_with(" PUBLICATION")
        || tag.ends_with(" SUBSCRIPTION")
        || tag.ends_with(" EVENT TRIGGER")
        || tag == "REFRESH MATERIALIZED VIEW"
}

/// A tag a DDL event may carry: what an event trigger reports, never a
/// data-changing statement.
fn ddl_tag(tag: &str) -> bool {
    [
        "CREATE ",
        "ALTER ",
        "DROP ",
        "COMMENT",
        "GRANT",
        "REVOKE",
        "SECURITY LABEL",
        "IMPORT FOREIGN SCHEMA",
        "SELECT INTO",
        "REFRESH MATERIALIZED VIEW",
        "REINDEX",
    ]
    .iter()
    .any(|p| tag.starts_with(p))
}

fn in_own_or_temp_schema(schema: &str) -> bool {
    schema == "pgshift"
        || schema == "pgshift_guard"
        || schema.starts_with("pg_temp")
        || schema.starts_with("pg_toast")
}

/// Decides what to run for `ev` (an `end` event), given the objects the
/// same command dropped (its `drop` event, if any), the migration's table
/// filter and the target's major version.
pub fn plan(
    ev: &DdlEvent,
    dropped: &[DdlObject],
    filter: &TableFilter,
    target_major: i32,
) -> DdlPlan {
    if ignored_tag(&ev.tag) {
        return DdlPlan::Ignore("not migrated (publication, subscription or refresh)");
    }
    if !ddl_tag(&ev.tag) {
        return DdlPlan::Unsupported(format!("an event with the unexpected tag {:?}", ev.tag));
    }
    // Objects outside the migrated set (by their table) are not on the
    // target: a command only about them is left out.
    let tables: Vec<TableName> = ev
        .objects
        .iter()
        .filter_map(|o| o.table.clone())
        .chain(dropped.iter().filter_map(dropped_table))
        .collect();
    let schemas: Vec<&str> = ev
        .objects
        .iter()
        .chain(dropped)
        .filter_map(|o| o.schema.as_deref())
        .collect();
    if !schemas.is_empty() && schemas.iter().all(|s| in_own_or_temp_schema(s)) {
        return DdlPlan::Ignore("temporary or pgshift's own objects");
    }
    if filter.is_filtered()
        && !tables.is_empty()
        && tables.iter().all(|t| !filter.includes(&t.schema, &t.name))
    {
        return DdlPlan::Ignore("tables outside the migrated set");
    }
    if let Some(stmt) = pick(ev) {
        let alone = sqltext::runs_outside_transaction(stmt)
            || (target_major < 12 && sqltext::is_enum_add_value(stmt));
        return DdlPlan::Run {
            statements: vec![stmt.to_string()],
            alone,
            verbatim: true,
        };
    }
    rebuild(ev, dropped)
}

/// The statement of the query string that fired `ev`. A firing inside a
/// DO block or a function call counts towards `nth` but has no statement
/// of its own; where the string holds such a call, the statement must also
/// name one of the event's objects (or their tables), and a top-level
/// command is found as the last such statement at or before `nth`.
fn pick(ev: &DdlEvent) -> Option<&str> {
    let statements = sqltext::statements(&ev.query);
    let may_nest = statements
        .iter()
        .any(|s| sqltext::ddl_command_tag(s).is_none() && may_run_ddl(s));
    if !may_nest || ev.objects.is_empty() {
        return sqltext::pick_statement(&ev.query, &ev.tag, ev.nth);
    }
    let names: Vec<&str> = ev
        .objects
        .iter()
        .flat_map(|o| {
            // `schema.name`, `schema.table.column`, `schema.f(integer)`.
            let path = o.identity.split('(').next().unwrap_or_default();
            let own = path.rsplit('.').next().map(|n| n.trim_matches('"'));
            own.into_iter()
                .chain(o.table.as_ref().map(|t| t.name.as_str()))
        })
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return sqltext::pick_statement(&ev.query, &ev.tag, ev.nth);
    }
    statements
        .into_iter()
        .filter(|s| sqltext::command_tag_matches(s, &ev.tag))
        .take(ev.nth + 1)
        .filter(|s| identifiers(s).iter().any(|i| names.contains(&i.as_str())))
        .last()
}

/// A statement that fires no event itself but may run DDL inside (a DO
/// block, a function or procedure call).
fn may_run_ddl(stmt: &str) -> bool {
    let first = stmt
        .split(|c: char| !c.is_ascii_alphabetic())
        .find(|w| !w.is_empty())
        .unwrap_or("")
        .to_ascii_uppercase();
    matches!(
        first.as_str(),
        "DO" | "SELECT" | "CALL" | "EXECUTE" | "WITH"
    )
}

/// The identifiers of a statement as the catalog stores them: unquoted
/// ones folded to lower case, quoted ones as written.
fn identifiers(stmt: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = stmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            let mut s = String::new();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        s.push('"');
                        continue;
                    }
                    break;
                }
                s.push(c);
            }
            out.push(s);
        } else if c.is_alphanumeric() || c == '_' {
            let mut s = c.to_lowercase().to_string();
            while let Some(&c) = chars.peek() {
                if c.is_alphanumeric() || c == '_' || c == '$' {
                    s.extend(c.to_lowercase());
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(s);
        }
    }
    out
}

/// The table a dropped object is or belongs to, from its address.
fn dropped_table(o: &DdlObject) -> Option<TableName> {
    let names = o.names.as_deref()?;
    match o.kind.as_str() {
        "table" | "foreign table" | "table column" | "table constraint" | "trigger"
            if names.len() >= 2 =>
        {
            Some(TableName {
                schema: names[0].clone(),
                name: names[1].clone(),
            })
        }
        _ => None,
    }
}

/// DDL run inside a function or a `DO` block: its statement is not in the
/// query string, so it is rebuilt from what the catalog prints.
fn rebuild(ev: &DdlEvent, dropped: &[DdlObject]) -> DdlPlan {
    // The command's own objects, each printed by the catalog; sub-commands
    // (a sequence a CREATE TABLE made) come with their owner.
    let main: Vec<&DdlObject> = ev
        .objects
        .iter()
        .filter(|o| o.tag.as_deref().is_none_or(|t| t == ev.tag))
        .collect();
    if !ev.tag.starts_with("DROP ")
        && main
            .iter()
            .any(|o| matches!(o.kind.as_str(), "table" | "table column"))
    {
        return rebuild_table(ev, dropped, &main);
    }
    let mut statements = Vec::new();
    if ev.tag.starts_with("DROP ") || !dropped.is_empty() {
        for o in dropped {
            match drop_statement(o) {
                Some(s) => statements.push(s),
                None => {
                    return DdlPlan::Unsupported(format!(
                        "{} of {} {} inside a function or a DO block",
                        ev.tag, o.kind, o.identity
                    ));
                }
            }
        }
        if ev.tag.starts_with("DROP ") {
            return DdlPlan::Run {
                statements,
                alone: false,
                verbatim: false,
            };
        }
    }
    if main.is_empty() {
        return DdlPlan::Unsupported(format!(
            "{} inside a function or a DO block, with nothing pgshift can rebuild",
            ev.tag
        ));
    }
    for o in main {
        match (&o.def, &o.seq, &o.table) {
            (Some(def), _, _) if !matches!(o.kind.as_str(), "table" | "table column") => {
                statements.push(def.clone())
            }
            (None, Some(seq), Some(name))
                if o.kind == "sequence"
                    && matches!(ev.tag.as_str(), "CREATE SEQUENCE" | "ALTER SEQUENCE") =>
            {
                let s = NewSequence {
                    name: name.clone(),
                    def: seq.clone(),
                };
                let verb = ev.tag.split(' ').next().unwrap_or("CREATE");
                statements.push(table::sequence_statement(verb, &s));
                statements.extend(table::owned_by_statement(&s));
            }
            _ => {
                return DdlPlan::Unsupported(format!(
                    "{} of {} {} inside a function or a DO block (pgshift replays DDL from the query string, which here is the function call or the DO block)",
                    ev.tag, o.kind, o.identity
                ));
            }
        }
    }
    DdlPlan::Run {
        statements,
        alone: false,
        verbatim: false,
    }
}

/// A table created or altered inside a function or a `DO` block, from the
/// definition the capture sent: `CREATE TABLE` (after the sequences its
/// serial columns made), or a reconcile for `ALTER TABLE`.
fn rebuild_table(ev: &DdlEvent, dropped: &[DdlObject], main: &[&DdlObject]) -> DdlPlan {
    let unsupported = |why: String| {
        DdlPlan::Unsupported(format!("{} inside a function or a DO block: {why}", ev.tag))
    };
    let Some(obj) = main
        .iter()
        .find(|o| matches!(o.kind.as_str(), "table" | "table column"))
    else {
        return unsupported("no table".into());
    };
    let (Some(name), Some(def)) = (&obj.table, &obj.rel) else {
        return unsupported(format!(
            "{} {} came without its definition (a capture installed by an older pgshift)",
            obj.kind, obj.identity
        ));
    };
    if main.iter().any(|o| o.table.as_ref() != Some(name)) {
        return unsupported("a command on several objects".into());
    }
    // Sequences the command made (serial and identity columns).
    let mut sequences = Vec::new();
    for o in ev
        .objects
        .iter()
        .filter(|o| o.kind == "sequence" && o.tag.as_deref() == Some("CREATE SEQUENCE"))
    {
        match (&o.table, &o.seq) {
            (Some(n), Some(seq)) => sequences.push(NewSequence {
                name: n.clone(),
                def: seq.clone(),
            }),
            _ => {
                return unsupported(format!(
                    "sequence {} came without its parameters",
                    o.identity
                ));
            }
        }
    }
    // Identity sequences are made by the column's own clause.
    let serial: Vec<&NewSequence> = sequences
        .iter()
        .filter(|s| !s.def.owned_by.as_ref().is_some_and(|o| o.identity))
        .collect();
    let mut before: Vec<String> = serial
        .iter()
        .map(|s| table::sequence_statement("CREATE", s))
        .collect();
    let after: Vec<String> = serial
        .iter()
        .filter_map(|s| table::owned_by_statement(s))
        .collect();
    match ev.tag.as_str() {
        "CREATE TABLE" if dropped.is_empty() => match table::create_table(name, def, &sequences) {
            Ok(create) => {
                before.push(create);
                before.extend(after);
                DdlPlan::Run {
                    statements: before,
                    alone: false,
                    verbatim: false,
                }
            }
            Err(why) => unsupported(why),
        },
        "ALTER TABLE" => {
            let mut dropped_columns = Vec::new();
            for o in dropped {
                let names = o.names.as_deref().unwrap_or_default();
                if o.kind == "table column"
                    && names.len() == 3
                    && dropped_table(o).as_ref() == Some(name)
                {
                    dropped_columns.push(names[2].clone());
                    continue;
                }
                // The table's own constraints: the reconcile drops those
                // the source no longer has.
                if o.kind == "table constraint" && dropped_table(o).as_ref() == Some(name) {
                    continue;
                }
                match drop_statement(o) {
                    Some(s) => before.push(s),
                    None => {
                        return unsupported(format!("dropping {} {}", o.kind, o.identity));
                    }
                }
            }
            let renamed_to = main
                .iter()
                .find(|o| o.kind == "table column")
                .and_then(|o| o.column.clone());
            DdlPlan::Reconcile(Box::new(Reconcile {
                table: name.clone(),
                definition: def.clone(),
                dropped_columns,
                renamed_to,
                sequences,
                before,
                after,
            }))
        }
        _ => unsupported(format!("{} {}", obj.kind, obj.identity)),
    }
}

/// `DROP … IF EXISTS` for a dropped object, from its address.
fn drop_statement(o: &DdlObject) -> Option<String> {
    let names = o.names.as_deref().unwrap_or_default();
    let qualified = |n: &[String]| {
        n.iter()
            .map(|s| quote_ident(s))
            .collect::<Vec<_>>()
            .join(".")
    };
    let simple: BTreeMap<&str, &str> = [
        ("table", "TABLE"),
        ("index", "INDEX"),
        ("sequence", "SEQUENCE"),
        ("view", "VIEW"),
        ("materialized view", "MATERIALIZED VIEW"),
        ("type", "TYPE"),
        ("domain", "DOMAIN"),
        ("schema", "SCHEMA"),
        ("foreign table", "FOREIGN TABLE"),
    ]
    .into_iter()
    .collect();
    if let Some(kw) = simple.get(o.kind.as_str()) {
        if names.is_empty() {
            return None;
        }
        return Some(format!("DROP {kw} IF EXISTS {}", qualified(names)));
    }
    match o.kind.as_str() {
        "function" | "procedure" | "aggregate" => {
            let kw = o.kind.to_uppercase();
            Some(format!(
                "DROP {kw} IF EXISTS {}({})",
                qualified(names),
                o.args.as_deref().unwrap_or_default().join(", ")
            ))
        }
        "table column" if names.len() == 3 => Some(format!(
            "ALTER TABLE IF EXISTS {} DROP COLUMN IF EXISTS {}",
            qualified(&names[..2]),
            quote_ident(&names[2])
        )),
        "table constraint" if names.len() == 3 => Some(format!(
            "ALTER TABLE IF EXISTS {} DROP CONSTRAINT IF EXISTS {}",
            qualified(&names[..2]),
            quote_ident(&names[2])
        )),
        "trigger" if names.len() == 3 => Some(format!(
            "DROP TRIGGER IF EXISTS {} ON {}",
            quote_ident(&names[2]),
            qualified(&names[..2])
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(tag: &str, query: &str, nth: usize) -> DdlEvent {
        DdlEvent {
            v: 1,
            kind: "end".into(),
            id: "1.1".into(),
            sub: None,
            tag: tag.into(),
            nth,
            query: query.into(),
            search_path: None,
            role: None,
            objects: vec![],
        }
    }

    #[test]
    fn runs_the_statement_that_fired_only() {
        let e = ev(
            "ALTER TABLE",
            "INSERT INTO t VALUES (1); ALTER TABLE t ADD c int; ALTER TABLE t ADD d int",
            1,
        );
        assert_eq!(
            plan(&e, &[], &TableFilter::default(), 18),
            DdlPlan::Run {
                statements: vec!["ALTER TABLE t ADD d int".into()],
                alone: false,
                verbatim: true
            }
        );
    }

    #[test]
    fn a_do_block_before_a_command_of_the_same_tag_does_not_shift_it() {
        let table = |name: &str| DdlObject {
            tag: Some("CREATE TABLE".into()),
            kind: "table".into(),
            schema: Some("public".into()),
            identity: format!("public.{name}"),
            table: Some(TableName {
                schema: "public".into(),
                name: name.into(),
            }),
            ..Default::default()
        };
        let q = "DO $$ BEGIN EXECUTE 'CREATE TABLE k1 ()'; END $$; CREATE TABLE k1b ()";
        let mut nested = ev("CREATE TABLE", q, 0);
        nested.objects.push(table("k1"));
        assert!(matches!(
            plan(&nested, &[], &TableFilter::default(), 18),
            DdlPlan::Unsupported(_)
        ));
        let mut top = ev("CREATE TABLE", q, 1);
        top.objects.push(table("k1b"));
        assert_eq!(pick(&top), Some("CREATE TABLE k1b ()"));
    }

    #[test]
    fn concurrent_index_builds_run_alone() {
        let e = ev("CREATE INDEX", "CREATE INDEX CONCURRENTLY i ON t (a)", 0);
        assert!(matches!(
            plan(&e, &[], &TableFilter::default(), 18),
            DdlPlan::Run { alone: true, .. }
        ));
    }

    #[test]
    fn a_do_block_is_rebuilt_from_the_catalog_or_refused() {
        let mut e = ev(
            "CREATE INDEX",
            "DO $$ BEGIN EXECUTE 'CREATE INDEX i ON t (a)'; END $$",
            0,
        );
        e.objects.push(DdlObject {
            tag: Some("CREATE INDEX".into()),
            kind: "index".into(),
            schema: Some("public".into()),
            identity: "public.i".into(),
            def: Some("CREATE INDEX i ON public.t USING btree (a)".into()),
            ..Default::default()
        });
        assert_eq!(
            plan(&e, &[], &TableFilter::default(), 18),
            DdlPlan::Run {
                statements: vec!["CREATE INDEX i ON public.t USING btree (a)".into()],
                alone: false,
                verbatim: false
            }
        );
        let mut e = ev("ALTER TABLE", "SELECT migrate()", 0);
        e.objects.push(DdlObject {
            tag: Some("ALTER TABLE".into()),
            kind: "table".into(),
            schema: Some("public".into()),
            identity: "public.t".into(),
            ..Default::default()
        });
        assert!(matches!(
            plan(&e, &[], &TableFilter::default(), 18),
            DdlPlan::Unsupported(_)
        ));
    }

    #[test]
    fn temporary_and_excluded_objects_are_ignored() {
        let mut e = ev("CREATE TABLE", "CREATE TABLE skip.t (a int)", 0);
        e.objects.push(DdlObject {
            tag: Some("CREATE TABLE".into()),
            kind: "table".into(),
            schema: Some("skip".into()),
            identity: "skip.t".into(),
            table: Some(TableName {
                schema: "skip".into(),
                name: "t".into(),
            }),
            ..Default::default()
        });
        let f = TableFilter::new(&[], &["skip.*".into()]);
        assert!(matches!(plan(&e, &[], &f, 18), DdlPlan::Ignore(_)));
        assert!(matches!(
            plan(&e, &[], &TableFilter::default(), 18),
            DdlPlan::Run { .. }
        ));
    }

    #[test]
    fn drops_are_rebuilt_from_addresses() {
        let col = DdlObject {
            kind: "table column".into(),
            identity: "public.t.c".into(),
            names: Some(vec!["public".into(), "t".into(), "c".into()]),
            ..Default::default()
        };
        assert_eq!(
            drop_statement(&col).unwrap(),
            r#"ALTER TABLE IF EXISTS "public"."t" DROP COLUMN IF EXISTS "c""#
        );
        let f = DdlObject {
            kind: "function".into(),
            identity: "public.f(integer)".into(),
            names: Some(vec!["public".into(), "f".into()]),
            args: Some(vec!["integer".into()]),
            ..Default::default()
        };
        assert_eq!(
            drop_statement(&f).unwrap(),
            r#"DROP FUNCTION IF EXISTS "public"."f"(integer)"#
        );
    }

    #[test]
    fn signed_events_are_verified() {
        use hmac::{Hmac, KeyInit, Mac};
        let json = br#"{"v":1,"kind":"end","id":"7.1","tag":"CREATE TABLE","nth":0,"query":"CREATE TABLE t (a int)","objects":[]}"#;
        let key = [3u8; 32];
        let mut m = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).unwrap();
        m.update(json);
        let mac: String = m
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let content = [mac.as_bytes(), b" ", json].concat();
        assert_eq!(read_signed(&content, Some(&key)).unwrap().id, "7.1");
        let mut forged = content.clone();
        let n = forged.len();
        forged[n - 3] = b'1';
        assert!(matches!(
            read_signed(&forged, Some(&key)),
            Err(EventError::Unsigned)
        ));
        assert!(read_signed(&content, None).is_err());
    }
}
