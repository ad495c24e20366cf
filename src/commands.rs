//! Operator commands arriving over the admin API (`POST /cutover`,
//! `POST /cancel`), handed to the migration runner over a channel so the
//! HTTP layer knows nothing about how they are carried out.

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandKind {
    Cutover,
    Cancel,
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
