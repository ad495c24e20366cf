//! Event triggers: whether a server lets a user create them (PostgreSQL
//! asks for a superuser on every supported version; managed services grant
//! it to their admin role, e.g. `rds_superuser`).

use tokio_postgres::Client;

/// Whether this user may create event triggers in the connected database,
/// tried in a transaction that is rolled back: None when it may, else the
/// server's answer.
pub(crate) async fn refusal(client: &Client) -> Result<Option<String>, tokio_postgres::Error> {
    let sql = "BEGIN;
CREATE FUNCTION pg_temp.pgshift_probe() RETURNS event_trigger LANGUAGE plpgsql AS 'BEGIN END';
CREATE EVENT TRIGGER pgshift_probe ON ddl_command_end EXECUTE FUNCTION pg_temp.pgshift_probe();";
    let r = client.batch_execute(sql).await;
    client.batch_execute("ROLLBACK").await?;
    Ok(r.err().map(|e| crate::db::describe(&e)))
}
