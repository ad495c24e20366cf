//! The migration's states and substates, spelled as the managed migration
//! services (and DESIGN.md) spell them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    InProgress,
    WaitingForUserAction,
    Succeeded,
    Failed,
    ValidationFailed,
    Canceled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Substate {
    PerformingPrerequisiteSteps,
    ValidationInProgress,
    MigratingData,
    WaitingForCutoverTrigger,
    CompletingMigration,
    /// Clients run on the target; the source is fenced and kept current by
    /// reverse replication: `rollback` or `complete`.
    RollbackAvailable,
    /// A rollback attempt runs (the cutover protocol in reverse).
    RollingBack,
    Completed,
    /// Terminal failure states carry no substate.
    None,
}

impl State {
    pub const ALL: [State; 6] = [
        State::InProgress,
        State::WaitingForUserAction,
        State::Succeeded,
        State::Failed,
        State::ValidationFailed,
        State::Canceled,
    ];

    /// No further transitions happen by themselves from here.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Succeeded | State::Failed | State::ValidationFailed | State::Canceled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::InProgress => "InProgress",
            State::WaitingForUserAction => "WaitingForUserAction",
            State::Succeeded => "Succeeded",
            State::Failed => "Failed",
            State::ValidationFailed => "ValidationFailed",
            State::Canceled => "Canceled",
        }
    }
}

impl Substate {
    pub const ALL: [Substate; 9] = [
        Substate::PerformingPrerequisiteSteps,
        Substate::ValidationInProgress,
        Substate::MigratingData,
        Substate::WaitingForCutoverTrigger,
        Substate::CompletingMigration,
        Substate::RollbackAvailable,
        Substate::RollingBack,
        Substate::Completed,
        Substate::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Substate::PerformingPrerequisiteSteps => "PerformingPrerequisiteSteps",
            Substate::ValidationInProgress => "ValidationInProgress",
            Substate::MigratingData => "MigratingData",
            Substate::WaitingForCutoverTrigger => "WaitingForCutoverTrigger",
            Substate::CompletingMigration => "CompletingMigration",
            Substate::RollbackAvailable => "RollbackAvailable",
            Substate::RollingBack => "RollingBack",
            Substate::Completed => "Completed",
            Substate::None => "None",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Substate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A persisted name that is not a state, substate or phase of this version
/// of pgshift (e.g. written by a newer one).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown {what} `{name}`")]
pub struct UnknownName {
    pub what: &'static str,
    pub name: String,
}

/// The variant of `all` whose persisted name is `s`.
fn by_name<T: Copy>(
    all: &[T],
    name: fn(T) -> &'static str,
    s: &str,
    what: &'static str,
) -> Result<T, UnknownName> {
    all.iter()
        .copied()
        .find(|x| name(*x) == s)
        .ok_or_else(|| UnknownName {
            what,
            name: s.to_string(),
        })
}

impl FromStr for State {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<State, UnknownName> {
        by_name(&State::ALL, State::as_str, s, "migration state")
    }
}

impl FromStr for Substate {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Substate, UnknownName> {
        by_name(&Substate::ALL, Substate::as_str, s, "migration substate")
    }
}

/// Where one database is in its own pipeline (persisted, so a restart knows
/// whether to start the copy over or resume streaming).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatabasePhase {
    Pending,
    /// Schema and data copy under way; a restart here starts the copy over cleanly.
    Copying,
    /// The copy is complete and consistent with the slot's consistent point.
    Copied,
    Streaming,
    /// Apply stopped on an error the operator must fix; streaming resumes after it.
    ApplyStopped,
    Switched,
    Failed,
}

impl DatabasePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            DatabasePhase::Pending => "pending",
            DatabasePhase::Copying => "copying",
            DatabasePhase::Copied => "copied",
            DatabasePhase::Streaming => "streaming",
            DatabasePhase::ApplyStopped => "apply_stopped",
            DatabasePhase::Switched => "switched",
            DatabasePhase::Failed => "failed",
        }
    }
}

impl FromStr for DatabasePhase {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<DatabasePhase, UnknownName> {
        use DatabasePhase::*;
        let all = [
            Pending,
            Copying,
            Copied,
            Streaming,
            ApplyStopped,
            Switched,
            Failed,
        ];
        by_name(&all, DatabasePhase::as_str, s, "database phase")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spelled_as_in_design() {
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        for s in Substate::ALL {
            assert_eq!(s.as_str().parse::<Substate>().unwrap(), s);
        }
        assert_eq!(State::ValidationFailed.to_string(), "ValidationFailed");
        assert_eq!(
            Substate::WaitingForCutoverTrigger.to_string(),
            "WaitingForCutoverTrigger"
        );
        assert!("Running".parse::<State>().is_err());
    }
}
