//! Operator commands arriving over the admin API (`POST /cutover`,
//! `POST /cancel`, `POST /ddl/{skip,retry,apply}`), handed to the migration runner over a channel so the
//! HTTP layer knows nothing about how they are carried out.

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandKind {
    Cutover,
    Cancel,
    /// Back to the source after a cutover (the rollback window is open).
    Rollback,
    /// Ends the rollback window.
    Complete,
    /// What to do about the schema change that stopped apply in
    /// `database` (None: the one database where apply is stopped).
    Ddl {
        action: DdlAction,
        database: Option<String>,
    },
}

impl CommandKind {
    /// As relayed through the control schema from a fleet member to the leader.
    pub(crate) fn to_json(&self) -> Value {
        match self {
            CommandKind::Cutover => serde_json::json!({"kind": "cutover"}),
            CommandKind::Cancel => serde_json::json!({"kind": "cancel"}),
            CommandKind::Rollback => serde_json::json!({"kind": "rollback"}),
            CommandKind::Complete => serde_json::json!({"kind": "complete"}),
            CommandKind::Ddl { action, database } => {
                serde_json::json!({"kind": "ddl", "action": action.as_str(), "database": database})
            }
        }
    }

    pub(crate) fn from_json(v: &Value) -> Option<CommandKind> {
        match v["kind"].as_str()? {
            "cutover" => Some(CommandKind::Cutover),
            "cancel" => Some(CommandKind::Cancel),
            "rollback" => Some(CommandKind::Rollback),
            "complete" => Some(CommandKind::Complete),
            "ddl" => Some(CommandKind::Ddl {
                action: DdlAction::parse(v["action"].as_str()?)?,
                database: v["database"].as_str().map(str::to_string),
            }),
            _ => None,
        }
    }
}

/// `pgshift ddl …`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DdlAction {
    /// Go on without the DDL command that stopped apply (the operator
    /// made the change on the target by hand, or does not want it).
    Skip,
    /// Try the command again now (the operator changed the target).
    Retry,
    /// Run the ready command of a table that no longer matches (`ddl =
    /// "stop"`) on the target, then go on.
    Apply,
}

impl DdlAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DdlAction::Skip => "skip",
            DdlAction::Retry => "retry",
            DdlAction::Apply => "apply",
        }
    }

    pub fn parse(s: &str) -> Option<DdlAction> {
        match s {
            "skip" => Some(DdlAction::Skip),
            "retry" => Some(DdlAction::Retry),
            "apply" => Some(DdlAction::Apply),
            _ => None,
        }
    }
}

/// Why a command was refused; becomes an HTTP status and a message.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Not allowed in the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// Something failed while carrying it out (500).
    #[error("{0}")]
    Failed(String),
}

pub struct AdminCommand {
    pub kind: CommandKind,
    pub reply: oneshot::Sender<Result<Value, CommandError>>,
}

pub(crate) type CommandSender = mpsc::Sender<AdminCommand>;
pub(crate) type CommandReceiver = mpsc::Receiver<AdminCommand>;

pub fn channel() -> (CommandSender, CommandReceiver) {
    mpsc::channel(8)
}
