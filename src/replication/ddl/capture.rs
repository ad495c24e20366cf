//! Capturing DDL on the source: event triggers that put each DDL command
//! into the replication stream inside the transaction that ran it.
//!
//! Per (migration, database), in schema `pgshift`:
//! - `ddl_<h>_end()` on `ddl_command_end` and `ddl_<h>_drop()` on
//!   `sql_drop`: small functions that run as the user who ran the DDL (so
//!   they see that user's role and `search_path`) and hand over to
//! - `ddl_<h>_emit(…)`, SECURITY DEFINER with a fixed `search_path`: it
//!   reads what the command did (`pg_event_trigger_ddl_commands()` /
//!   `pg_event_trigger_dropped_objects()`, which fail outside an event
//!   trigger, so it cannot be called to make up a command), adds a table
//!   created in the migrated set to a listed publication (so its rows flow
//!   from its first insert, in the same transaction), and emits the event:
//!   - 14+: a transactional logical message, prefix `pgshift-ddl:<h>`,
//!     signed with HMAC-SHA256 by a key only pgshift's user can read
//!     (`ddl_<h>_key`): any user may call `pg_logical_emit_message`, and
//!     apply must not run a command nobody ran;
//!   - before 14 (no messages in pgoutput): a row of `ddl_<h>`, which is in
//!     the publication and which only the definer may write.
//!
//! Installed before the slot is created (no DDL can fall between the copy's
//! snapshot and the capture), removed at cutover, cancel and cleanup.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::db::{quote_ident, quote_literal};
use crate::filter::TableFilter;
use crate::pg::replication::MarkerTransport;
use crate::replication::client::ReplicationError;
use crate::replication::marker::MARKER_SCHEMA;
use crate::replication::names::ReplicationNames;

/// The names of one (migration, database)'s capture objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureNames {
    /// `ddl_<8 hex>`: the stem of the functions, tables and event triggers.
    pub stem: String,
    /// The logical message prefix of this migration's DDL events.
    pub prefix: String,
    /// The publication new tables are added to.
    publication: String,
}

impl CaptureNames {
    pub fn new(names: &ReplicationNames) -> CaptureNames {
        let digest = Sha256::digest(names.publication.as_bytes());
        let h: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
        CaptureNames {
            stem: format!("ddl_{h}"),
            prefix: format!("pgshift-ddl:{h}"),
            publication: names.publication.clone(),
        }
    }

    fn object(&self, suffix: &str) -> String {
        format!(
            "{}.{}",
            quote_ident(MARKER_SCHEMA),
            quote_ident(&format!("{}{suffix}", self.stem))
        )
    }

    /// The table DDL events travel in on sources before 14, as
    /// `"pgshift"."ddl_<h>"`; it must be in the publication.
    pub fn row_table(&self) -> String {
        self.object("")
    }

    /// The name (in schema `pgshift`) of the row table, as the stream's
    /// Relation message names it.
    pub fn row_table_name(&self) -> &str {
        &self.stem
    }

    fn key_table(&self) -> String {
        self.object("_key")
    }

    /// An unlogged scratch table: a row written there tells the emitting
    /// (sub)transaction's xid.
    fn xid_table(&self) -> String {
        self.object("_xid")
    }

    fn trigger(&self, which: &str) -> String {
        quote_ident(&format!("pgshift_{}_{which}", self.stem))
    }
}

/// How the capture's HMAC key signs an event: HMAC-SHA256 with a random
/// 32-byte key; the source computes it as `sha256(okey || sha256(ikey ||
/// m))` with the pads precomputed.
pub struct DdlKey(pub Vec<u8>);

impl DdlKey {
    fn generate() -> DdlKey {
        let mut k = vec![0u8; 32];
        rand::fill(&mut k[..]);
        DdlKey(k)
    }

    /// The inner and outer padded keys of HMAC (block size 64).
    fn pads(&self) -> (Vec<u8>, Vec<u8>) {
        let mut block = [0u8; 64];
        block[..self.0.len()].copy_from_slice(&self.0);
        let ipad = block.iter().map(|b| b ^ 0x36).collect();
        let opad = block.iter().map(|b| b ^ 0x5c).collect();
        (ipad, opad)
    }
}

fn bytea_literal(b: &[u8]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("'\\x{hex}'::bytea")
}

fn sql_err(context: String) -> impl FnOnce(tokio_postgres::Error) -> ReplicationError {
    move |source| ReplicationError::Sql { context, source }
}

/// `[migration] tables` globs as `LIKE` patterns (`*` → `%`, `?` → `_`,
/// the rest literal).
fn like_patterns(globs: &[String]) -> String {
    let items: Vec<String> = globs
        .iter()
        .map(|g| {
            let mut p = String::new();
            for c in g.chars() {
                match c {
                    '*' => p.push('%'),
                    '?' => p.push('_'),
                    '%' | '_' | '\\' => {
                        p.push('\\');
                        p.push(c);
                    }
                    c => p.push(c),
                }
            }
            quote_literal(&p)
        })
        .collect();
    format!("ARRAY[{}]::text[]", items.join(", "))
}

/// What the capture of one database is: where its events go and whether
/// new tables must be added to a listed publication.
pub(crate) struct CaptureSpec<'a> {
    pub names: &'a CaptureNames,
    pub transport: MarkerTransport,
    /// Some: the publication lists tables, and new tables matching the
    /// filter are added to it; None: it is FOR ALL TABLES.
    pub listed: Option<&'a TableFilter>,
}

/// The SECURITY DEFINER function that reads and emits an event.
fn emit_function(spec: &CaptureSpec<'_>) -> String {
    let n = spec.names;
    let key = n.key_table();
    let send = match spec.transport {
        MarkerTransport::LogicalMessage => format!(
            "PERFORM pg_logical_emit_message(true, {prefix}, \
               convert_to((SELECT encode(sha256(k.okey || sha256(k.ikey || convert_to(ev, 'UTF8'))), 'hex') FROM {key} k) || ' ' || ev, 'UTF8'));",
            prefix = quote_literal(&n.prefix),
        ),
        MarkerTransport::Row => format!(
            "INSERT INTO {table} (event) VALUES (convert_to(ev, 'UTF8'));",
            table = n.row_table()
        ),
    };
    let publish = match spec.listed {
        None => String::new(),
        Some(filter) => {
            let include = if filter.include.is_empty() {
                "ARRAY['%']::text[]".to_string()
            } else {
                like_patterns(&filter.include)
            };
            let exclude = like_patterns(&filter.exclude);
            format!(
                "IF NOT dropping THEN
    FOR r IN SELECT DISTINCT t.oid, tn.nspname, t.relname
      FROM pg_event_trigger_ddl_commands() c
      JOIN pg_class t ON c.classid = 'pg_class'::regclass AND t.oid = c.objid
      JOIN pg_namespace tn ON tn.oid = t.relnamespace
      WHERE c.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
        AND t.relkind = 'r' AND t.relpersistence = 'p'
        AND (tn.nspname || '.' || t.relname) LIKE ANY ({include})
        AND NOT (tn.nspname || '.' || t.relname) LIKE ANY ({exclude})
        AND NOT EXISTS (SELECT FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                        WHERE p.pubname = {pub} AND pr.prrelid = t.oid)
    LOOP
      EXECUTE format('ALTER PUBLICATION %I ADD TABLE %I.%I', {pub}, r.nspname, r.relname);
    END LOOP;
  END IF;",
                pub = quote_literal(&n.publication),
            )
        }
    };
    let seq_guc = quote_literal(&format!("pgshift.{}_seq", n.stem));
    let n_guc = quote_literal(&format!("pgshift.{}_n", n.stem));
    let dropped_guc = quote_literal(&format!("pgshift.{}_dropped", n.stem));
    format!(
        r#"CREATE OR REPLACE FUNCTION {emit}(tag text, role text, schemas text, dropping boolean)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $pgshift$
DECLARE
  q text := current_query();
  objects json;
  total int;
  kept int;
  ev text;
  seq jsonb;
  k text;
  nth int := 0;
  n int;
  r record;
  sub bigint;
  at tid;
BEGIN
  IF dropping THEN
    SELECT json_agg(json_build_object('type', o.object_type, 'schema', o.schema_name,
             'identity', o.object_identity, 'names', o.address_names, 'args', o.address_args)),
           count(*)
      INTO objects, kept
      FROM pg_event_trigger_dropped_objects() o
      WHERE o.original AND NOT o.is_temporary
        AND coalesce(o.schema_name, '') NOT IN ('pgshift', 'pgshift_guard');
    PERFORM set_config({dropped_guc}, kept::text, true);
    IF kept = 0 THEN RETURN; END IF;
  ELSE
    SELECT count(*) INTO total FROM pg_event_trigger_ddl_commands();
    SELECT json_agg(json_build_object(
             'tag', c.command_tag, 'type', c.object_type, 'schema', c.schema_name,
             'identity', c.object_identity,
             'table', (SELECT json_build_object('schema', tn.nspname, 'name', t.relname)
                         FROM pg_class t JOIN pg_namespace tn ON tn.oid = t.relnamespace
                        WHERE t.oid = CASE c.classid
                          WHEN 'pg_class'::regclass THEN coalesce(
                            (SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = c.objid), c.objid)
                          WHEN 'pg_trigger'::regclass THEN (SELECT g.tgrelid FROM pg_trigger g WHERE g.oid = c.objid)
                          WHEN 'pg_constraint'::regclass THEN (SELECT x.conrelid FROM pg_constraint x WHERE x.oid = c.objid)
                          END),
             'def', CASE
                      WHEN c.classid = 'pg_class'::regclass AND c.object_type = 'index' THEN pg_get_indexdef(c.objid)
                      WHEN c.classid = 'pg_proc'::regclass THEN pg_get_functiondef(c.objid)
                      WHEN c.classid = 'pg_trigger'::regclass THEN pg_get_triggerdef(c.objid)
                      WHEN c.object_type = 'view' THEN 'CREATE OR REPLACE VIEW ' || c.object_identity || ' AS ' || pg_get_viewdef(c.objid)
                    END,
             'rel', CASE WHEN c.classid = 'pg_class'::regclass AND c.object_type IN ('table', 'table column')
                      THEN {table_def} END,
             'column', CASE WHEN c.classid = 'pg_class'::regclass AND c.objsubid > 0
                      THEN (SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.objid AND a.attnum = c.objsubid) END,
             'seq', CASE WHEN c.classid = 'pg_class'::regclass AND c.object_type = 'sequence'
                      THEN {seq_def} END)),
           count(*)
      INTO objects, kept
      FROM pg_event_trigger_ddl_commands() c
      WHERE c.schema_name IS NULL
         OR (c.schema_name NOT IN ('pgshift', 'pgshift_guard')
             AND c.schema_name NOT LIKE 'pg\_temp%' AND c.schema_name NOT LIKE 'pg\_toast%');
    -- Only temporary or pgshift's own objects: nothing to replicate.
    IF total > 0 AND kept = 0 THEN RETURN; END IF;
    -- A DROP that dropped only temporary or pgshift's objects.
    IF total = 0 AND current_setting({dropped_guc}, true) = '0' THEN
      PERFORM set_config({dropped_guc}, '', true);
      RETURN;
    END IF;
    PERFORM set_config({dropped_guc}, '', true);
  END IF;
  IF role IS NULL OR NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role)
     OR NOT pg_has_role(session_user, role, 'MEMBER') THEN
    role := session_user;
  END IF;
  -- Which firing of this tag in this query string this is: apply cuts
  -- that statement out of a string that holds several.
  k := md5(statement_timestamp()::text || q);
  BEGIN
    seq := nullif(current_setting({seq_guc}, true), '')::jsonb;
  EXCEPTION WHEN others THEN
    seq := NULL;
  END;
  IF seq IS NULL OR seq->>'k' IS DISTINCT FROM k THEN
    seq := jsonb_build_object('k', k, 'c', '{{}}'::jsonb);
  END IF;
  IF NOT dropping THEN
    nth := coalesce((seq->'c'->>tag)::int, 0);
    seq := jsonb_set(seq, ARRAY['c', tag], to_jsonb(nth + 1));
    PERFORM set_config({seq_guc}, seq::text, false);
  END IF;
  -- The (sub)transaction that ran the command: pgoutput names a streamed
  -- message by its top-level transaction only, and a rollback to a
  -- savepoint must undo the command on the target too.
  INSERT INTO {xid_table} VALUES (1) RETURNING ctid, xmin::text::bigint INTO at, sub;
  DELETE FROM {xid_table} WHERE ctid = at;
  n := coalesce(nullif(current_setting({n_guc}, true), '')::int, 0) + 1;
  PERFORM set_config({n_guc}, n::text, true);
  {publish}
  ev := json_build_object('v', 1, 'kind', CASE WHEN dropping THEN 'drop' ELSE 'end' END,
          'id', txid_current()::text || '.' || n::text, 'sub', sub, 'tag', tag, 'nth', nth, 'query', q,
          'search_path', schemas, 'role', role, 'objects', coalesce(objects, '[]'::json))::text;
  {send}
END
$pgshift$"#,
        emit = n.object("_emit"),
        xid_table = n.xid_table(),
        table_def = super::table::table_def_sql("c.objid"),
        seq_def = super::table::sequence_def_sql("c.objid"),
    )
}

/// The event trigger functions: they run as the user who ran the DDL.
fn trigger_functions(n: &CaptureNames) -> String {
    let emit = n.object("_emit");
    let call = |dropping: bool| {
        format!(
            "PERFORM {emit}(tg_tag, CURRENT_USER::text, \
               (SELECT string_agg(quote_ident(s), ', ') FROM unnest(current_schemas(false)) s), {dropping});"
        )
    };
    format!(
        "CREATE OR REPLACE FUNCTION {end}() RETURNS event_trigger LANGUAGE plpgsql AS $pgshift$
BEGIN
  IF tg_tag LIKE '% PUBLICATION' OR tg_tag LIKE '% SUBSCRIPTION' THEN RETURN; END IF;
  {call_end}
END
$pgshift$;
CREATE OR REPLACE FUNCTION {drop}() RETURNS event_trigger LANGUAGE plpgsql AS $pgshift$
BEGIN
  {call_drop}
END
$pgshift$;",
        end = n.object("_end"),
        drop = n.object("_drop"),
        call_end = call(false),
        call_drop = call(true),
    )
}

/// Installs (or re-installs, keeping its key) the capture of one source
/// database, in one transaction. The user needs to be allowed to create
/// event triggers (a superuser; `rds_superuser` on RDS).
pub(crate) async fn install(
    client: &Client,
    spec: &CaptureSpec<'_>,
) -> Result<(), ReplicationError> {
    let n = spec.names;
    let key = DdlKey::generate();
    let (ipad, opad) = key.pads();
    let schema = quote_ident(MARKER_SCHEMA);
    let row_table = match spec.transport {
        MarkerTransport::Row => format!(
            "CREATE TABLE IF NOT EXISTS {t} (id bigserial PRIMARY KEY, event bytea NOT NULL);
             REVOKE ALL ON {t} FROM PUBLIC;",
            t = n.row_table()
        ),
        MarkerTransport::LogicalMessage => String::new(),
    };
    let sql = format!(
        "BEGIN;
CREATE SCHEMA IF NOT EXISTS {schema};
GRANT USAGE ON SCHEMA {schema} TO PUBLIC;
CREATE TABLE IF NOT EXISTS {key_table} (key bytea NOT NULL, ikey bytea NOT NULL, okey bytea NOT NULL);
REVOKE ALL ON {key_table} FROM PUBLIC;
CREATE UNLOGGED TABLE IF NOT EXISTS {xid_table} (x int);
REVOKE ALL ON {xid_table} FROM PUBLIC;
INSERT INTO {key_table} SELECT {k}, {i}, {o} WHERE NOT EXISTS (SELECT FROM {key_table});
{row_table}
{emit};
REVOKE ALL ON FUNCTION {emit_fn}(text, text, text, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {emit_fn}(text, text, text, boolean) TO PUBLIC;
{triggers}
DROP EVENT TRIGGER IF EXISTS {t_end};
DROP EVENT TRIGGER IF EXISTS {t_drop};
CREATE EVENT TRIGGER {t_end} ON ddl_command_end EXECUTE FUNCTION {f_end}();
CREATE EVENT TRIGGER {t_drop} ON sql_drop EXECUTE FUNCTION {f_drop}();
COMMIT;",
        key_table = n.key_table(),
        xid_table = n.xid_table(),
        k = bytea_literal(&key.0),
        i = bytea_literal(&ipad),
        o = bytea_literal(&opad),
        emit = emit_function(spec),
        emit_fn = n.object("_emit"),
        triggers = trigger_functions(n),
        t_end = n.trigger("end"),
        t_drop = n.trigger("drop"),
        f_end = n.object("_end"),
        f_drop = n.object("_drop"),
    );
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(sql_err(format!(
            "installing the DDL capture (event triggers {} and {}) on the source",
            n.trigger("end"),
            n.trigger("drop")
        ))(e));
    }
    Ok(())
}

/// The key that signs this capture's events, when it is installed.
pub async fn read_key(
    client: &Client,
    names: &CaptureNames,
) -> Result<Option<DdlKey>, ReplicationError> {
    let table = names.key_table();
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(sql_err(format!("looking up {table}")))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt(&format!("SELECT key FROM {table}"), &[])
        .await
        .map_err(sql_err(format!("reading the DDL capture key from {table}")))?;
    Ok(row.map(|r| DdlKey(r.get(0))))
}

/// Whether the capture's event trigger is on the source.
pub async fn is_installed(client: &Client, names: &CaptureNames) -> Result<bool, ReplicationError> {
    let name = format!("pgshift_{}_end", names.stem);
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = $1)",
            &[&name],
        )
        .await
        .map_err(sql_err("looking up the DDL capture's event trigger".into()))?
        .get(0))
}

/// Removes the capture: event triggers, functions, tables. Returns whether
/// it was there. The session must be allowed to write (a fenced source's
/// databases default to read-only: the statements run in a READ WRITE
/// transaction).
pub async fn remove(client: &Client, names: &CaptureNames) -> Result<bool, ReplicationError> {
    let was = is_installed(client, names).await?;
    let sql = format!(
        "BEGIN READ WRITE;
DROP EVENT TRIGGER IF EXISTS {t_end};
DROP EVENT TRIGGER IF EXISTS {t_drop};
DROP FUNCTION IF EXISTS {f_end}();
DROP FUNCTION IF EXISTS {f_drop}();
DROP FUNCTION IF EXISTS {emit}(text, text, text, boolean);
DROP TABLE IF EXISTS {key_table};
DROP TABLE IF EXISTS {xid_table};
DROP TABLE IF EXISTS {row_table};
COMMIT;",
        t_end = names.trigger("end"),
        t_drop = names.trigger("drop"),
        f_end = names.object("_end"),
        f_drop = names.object("_drop"),
        emit = names.object("_emit"),
        key_table = names.key_table(),
        xid_table = names.xid_table(),
        row_table = names.row_table(),
    );
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(sql_err(format!(
            "removing the DDL capture (event trigger {}) from the source",
            names.trigger("end")
        ))(e));
    }
    Ok(was)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_quoted_and_per_migration() {
        let a = CaptureNames::new(&ReplicationNames::new("m1", "app"));
        let b = CaptureNames::new(&ReplicationNames::new("m2", "app"));
        assert_ne!(a.stem, b.stem);
        assert_eq!(a.stem.len(), 12);
        assert!(a.prefix.starts_with("pgshift-ddl:"));
        assert_eq!(a.row_table(), format!("\"pgshift\".\"{}\"", a.stem));
    }

    #[test]
    fn globs_become_like_patterns() {
        assert_eq!(
            like_patterns(&["public.ord_*".into(), "a?%".into()]),
            "ARRAY['public.ord\\_%', 'a_\\%']::text[]"
        );
    }

    #[test]
    fn hmac_pads_match_the_hmac_crate() {
        use hmac::{Hmac, KeyInit, Mac};
        let key = DdlKey(vec![7u8; 32]);
        let (ipad, opad) = key.pads();
        let msg = b"{\"v\":1}";
        let inner = Sha256::digest([ipad.as_slice(), msg].concat());
        let outer = Sha256::digest([opad.as_slice(), inner.as_slice()].concat());
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0).unwrap();
        m.update(msg);
        assert_eq!(m.finalize().into_bytes().as_slice(), outer.as_slice());
    }
}
