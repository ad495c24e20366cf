//! The migration as the cutover's ledger: an attempt's record and the state
//! it leaves the migration in, persisted in the control store.

use serde_json::Value;

use super::{Migration, State, Substate};
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

    async fn mark_switched(&self) -> Result<(), LedgerError> {
        Migration::mark_switched(self).await.map_err(boxed)
    }

    async fn end(&self, next: AfterAttempt) -> Result<(), LedgerError> {
        let (state, substate, reason) = match next {
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
