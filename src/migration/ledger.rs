//! The migration as the cutover's ledger: an attempt's record and the state
//! it leaves the migration in, persisted in the control store.

use serde_json::Value;

use super::{Migration, State, Substate};
use crate::cutover::fence::FenceRecord;
use crate::cutover::protocol::{AfterAttempt, CutoverLedger, LedgerError, Outcome};

fn boxed(e: super::control::ControlError) -> LedgerError {
    LedgerError(Box::new(e))
}

impl CutoverLedger for Migration {
    fn databases(&self) -> Vec<String> {
        self.cfg.databases.clone()
    }

    async fn begin(&self) -> Result<(), LedgerError> {
        self.transition(State::InProgress, Substate::CompletingMigration, None)
            .await
            .map_err(boxed)
    }

    async fn save_attempt(
        &self,
        id: &str,
        outcome: Outcome,
        reason: Option<&str>,
        doc: &Value,
    ) -> Result<(), LedgerError> {
        self.control()
            .save_cutover_attempt(id, outcome.as_str(), reason, doc)
            .await
            .map_err(boxed)
    }

    async fn mark_switched(&self, fence: &FenceRecord) -> Result<(), LedgerError> {
        self.switch_forward(fence).await.map_err(boxed)
    }

    async fn end(&self, next: AfterAttempt) -> Result<(), LedgerError> {
        let (state, substate, reason) = match next {
            AfterAttempt::Succeeded if self.window().is_some_and(|w| w.is_open()) => (
                State::Succeeded,
                Substate::RollbackAvailable,
                Some("clients run on the target; the source is fenced and kept current by reverse replication: `pgshift rollback` goes back, `pgshift complete` ends the window".into()),
            ),
            AfterAttempt::Succeeded => (State::Succeeded, Substate::Completed, None),
            AfterAttempt::WaitingForReplication(why) => {
                (State::InProgress, Substate::MigratingData, Some(why))
            }
            AfterAttempt::WaitingForTrigger(why) => (
                State::WaitingForUserAction,
                Substate::WaitingForCutoverTrigger,
                why,
            ),
        };
        self.transition(state, substate, reason)
            .await
            .map_err(boxed)
    }
}

/// The migration as a rollback's ledger: the attempt recorded beside the
/// cutovers (its id starts with `rollback-`), "switched" persisted back to
/// false at its point of no return; an aborted rollback leaves the
/// migration where it was, on the target with the window open.
pub(crate) struct RollbackLedger<'a>(pub &'a Migration);

impl CutoverLedger for RollbackLedger<'_> {
    fn databases(&self) -> Vec<String> {
        self.0.cfg.databases.clone()
    }

    async fn begin(&self) -> Result<(), LedgerError> {
        self.0
            .transition(State::InProgress, Substate::RollingBack, None)
            .await
            .map_err(boxed)
    }

    async fn save_attempt(
        &self,
        id: &str,
        outcome: Outcome,
        reason: Option<&str>,
        doc: &Value,
    ) -> Result<(), LedgerError> {
        self.0.save_attempt(id, outcome, reason, doc).await
    }

    async fn mark_switched(&self, fence: &FenceRecord) -> Result<(), LedgerError> {
        self.0.switch_back(fence).await.map_err(boxed)
    }

    async fn end(&self, next: AfterAttempt) -> Result<(), LedgerError> {
        let (state, substate, reason) = match next {
            AfterAttempt::Succeeded => (
                State::InProgress,
                Substate::MigratingData,
                Some("rolled back: clients run on the source; forward streaming resumes, ready for another cutover once every database streams and applies".into()),
            ),
            AfterAttempt::WaitingForReplication(why) | AfterAttempt::WaitingForTrigger(Some(why)) => (
                State::Succeeded,
                Substate::RollbackAvailable,
                Some(why.replace("cutover attempt", "rollback attempt")),
            ),
            AfterAttempt::WaitingForTrigger(None) => {
                (State::Succeeded, Substate::RollbackAvailable, None)
            }
        };
        self.0
            .transition(state, substate, reason)
            .await
            .map_err(boxed)
    }
}
