//! Which source/target pairs pgshift migrates: any source from
//! [`OLDEST_SOURCE`] to any target from [`OLDEST_TARGET`] of the same or a
//! newer major version, up to [`NEWEST_TESTED`].

use super::Version;

/// The oldest source major version. 10 lacks what the copy and validation
/// rely on (TRUNCATE in pgoutput, procedures, `pubtruncate`) and is not tested.
const OLDEST_SOURCE: i32 = 11;
/// The oldest target major version: apply and validation use functions and
/// privileges of 15 (`pg_current_xact_id`, `has_parameter_privilege`, GRANT SET ON PARAMETER).
const OLDEST_TARGET: i32 = 15;
/// The newest major version tested; newer ones are allowed with a warning.
const NEWEST_TESTED: i32 = 18;

/// Why a pair is not (or not fully) supported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PairIssue {
    /// The source is older than [`OLDEST_SOURCE`]: refused.
    SourceTooOld,
    /// The target is older than [`OLDEST_TARGET`]: refused.
    TargetTooOld,
    /// The target's major version is older than the source's: refused.
    Downgrade,
    /// A server newer than [`NEWEST_TESTED`]: allowed, untested.
    Untested { side: &'static str },
}

impl PairIssue {
    /// Refused pairs fail validation; untested ones only warn.
    pub(crate) fn refuses(&self) -> bool {
        !matches!(self, PairIssue::Untested { .. })
    }

    /// What is wrong, in words.
    pub fn describe(&self, source: Version, target: Version) -> String {
        match self {
            PairIssue::SourceTooOld => format!(
                "source PostgreSQL {} is older than {OLDEST_SOURCE}, the oldest source pgshift migrates",
                label(source)
            ),
            PairIssue::TargetTooOld => format!(
                "target PostgreSQL {} is older than {OLDEST_TARGET}, the oldest target pgshift migrates to",
                label(target)
            ),
            PairIssue::Downgrade => format!(
                "target PostgreSQL {} is an older major version than the source's {}; logical migration only goes to the same or a newer major version",
                label(target),
                label(source)
            ),
            PairIssue::Untested { side } => {
                let v = if *side == "source" { source } else { target };
                format!(
                    "{side} PostgreSQL {} is newer than {NEWEST_TESTED}, the newest version pgshift is tested with",
                    label(v)
                )
            }
        }
    }

    /// The corrective action.
    pub fn action(&self, source: Version) -> String {
        let from = source.major().max(OLDEST_TARGET);
        match self {
            PairIssue::SourceTooOld => format!(
                "upgrade the source in place to PostgreSQL {OLDEST_SOURCE} or newer first (pg_upgrade), then migrate"
            ),
            PairIssue::TargetTooOld | PairIssue::Downgrade => {
                format!("use a target server running PostgreSQL {from} to {NEWEST_TESTED}")
            }
            PairIssue::Untested { .. } => format!(
                "expect catalog differences pgshift does not know; a target of PostgreSQL {NEWEST_TESTED} or older is tested"
            ),
        }
    }
}

/// The problems of migrating from `source` to `target`; empty when supported.
pub(crate) fn check_pair(source: Version, target: Version) -> Vec<PairIssue> {
    let mut out = Vec::new();
    if source.major() < OLDEST_SOURCE {
        out.push(PairIssue::SourceTooOld);
    }
    if target.major() < OLDEST_TARGET {
        out.push(PairIssue::TargetTooOld);
    }
    if target.major() < source.major() {
        out.push(PairIssue::Downgrade);
    }
    if source.major() > NEWEST_TESTED {
        out.push(PairIssue::Untested { side: "source" });
    }
    if target.major() > NEWEST_TESTED {
        out.push(PairIssue::Untested { side: "target" });
    }
    out
}

/// "15", or "9.6" before 10.
fn label(v: Version) -> String {
    if v.0 >= 100_000 {
        v.major().to_string()
    } else {
        format!("{}.{}", v.0 / 10_000, v.0 / 100 % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(m: i32) -> Version {
        Version::major_release(m)
    }

    #[test]
    fn pairs() {
        for s in 11..=18 {
            for t in 15..=18 {
                let issues = check_pair(v(s), v(t));
                assert_eq!(issues.is_empty(), t >= s, "{s} -> {t}: {issues:?}");
            }
        }
        assert_eq!(check_pair(v(10), v(15)), vec![PairIssue::SourceTooOld]);
        assert_eq!(check_pair(v(13), v(14)), vec![PairIssue::TargetTooOld]);
        assert_eq!(check_pair(v(17), v(16)), vec![PairIssue::Downgrade]);
        assert_eq!(
            check_pair(v(18), v(19)),
            vec![PairIssue::Untested { side: "target" }]
        );
        assert!(!PairIssue::Untested { side: "target" }.refuses());
        assert!(
            PairIssue::SourceTooOld
                .describe(Version(90624), v(15))
                .contains("9.6")
        );
        assert!(
            PairIssue::Downgrade
                .action(v(17))
                .contains("PostgreSQL 17 to 18")
        );
    }
}
