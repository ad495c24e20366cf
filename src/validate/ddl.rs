//! Whether schema changes on the source can be replicated (`[migration]
//! ddl`): pgshift's DDL capture is a pair of event triggers, which only a
//! superuser (or a managed service's admin role) may create.

use super::Check;
use super::server::Server;
use crate::config::{DdlSetting, MigrationConfig, MigrationMode};

pub(super) async fn checks(source: Option<&Server>, m: &MigrationConfig) -> Vec<Check> {
    let Some(s) = source else {
        return vec![];
    };
    if m.mode != MigrationMode::Online {
        return vec![];
    }
    const NAME: &str = "ddl_capture";
    if m.ddl == DdlSetting::Stop {
        return vec![Check::succeeded(
            NAME,
            "source",
            "ddl = \"stop\": a schema change on the source stops apply; `pgshift ddl apply` runs the ready command on the target",
        )];
    }
    let refusal = match crate::pg::event_trigger::refusal(&s.client).await {
        Ok(r) => r,
        Err(e) => Some(crate::db::describe(&e)),
    };
    let Some(why) = refusal else {
        return vec![Check::succeeded(
            NAME,
            "source",
            format!(
                "{} may create event triggers: schema changes are captured and applied on the target in stream order",
                s.user
            ),
        )];
    };
    let found = format!(
        "{} may not create event triggers on the source: {why}",
        s.user
    );
    let action = format!(
        "connect as a superuser (or the managed service's admin role, e.g. rds_superuser), e.g. ALTER ROLE {} SUPERUSER; or set [migration] ddl = \"stop\": a schema change then stops apply until `pgshift ddl apply`",
        crate::db::quote_ident(&s.user)
    );
    match m.ddl {
        DdlSetting::Replicate => vec![Check::failed(NAME, "source", found, action)],
        _ => vec![Check::warning(
            NAME,
            "source",
            format!("{found}; ddl = \"auto\" falls back to \"stop\""),
            action,
        )],
    }
}
