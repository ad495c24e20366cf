//! What differs per PostgreSQL major version: catalog columns, functions,
//! pgoutput protocol versions and options. Callers ask a [`Version`] what the
//! server has instead of comparing numbers themselves, so every version
//! difference lives here, one place per concern:
//!
//! - `support`: which source/target pairs pgshift migrates
//! - `database`: `pg_database` locale columns, CREATE / DROP DATABASE
//! - `slot`: `pg_replication_slots`
//! - `publication`: publication options and shape
//! - `activity`: `pg_stat_activity`, terminating sessions
//! - `catalog`: relations, columns, sequences, privileges
//! - `settings`: configuration parameters a dump may set
//! - `tables`: the tables a migration carries (copy, verify, publication)
//! - `event_trigger`: whether a user may create event triggers (DDL capture)
//!
//! Each module's `probes` lists its version-dependent read-only queries, so a
//! test can run every one of them against a live server of each version.

pub(crate) mod activity;
pub(crate) mod catalog;
pub mod database;
pub(crate) mod event_trigger;
pub(crate) mod publication;
pub mod settings;
pub(crate) mod slot;
pub(crate) mod support;
pub mod tables;

use tokio_postgres::Client;

pub(crate) mod replication;

/// A server's version as `server_version_num` (e.g. 150004 for 15.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub i32);

impl Version {
    /// The first release of major version `major` (`Version::major_release(17)` is 170000).
    pub const fn major_release(major: i32) -> Version {
        Version(major * 10000)
    }

    /// The major version: 15 for 150004 (and 9 for 9.6's 90600).
    pub fn major(self) -> i32 {
        self.0 / 10000
    }

    /// Is this major version `major` or newer?
    pub fn at_least(self, major: i32) -> bool {
        self.major() >= major
    }

    /// Reads the version of the server behind `client`.
    pub async fn of(client: &Client) -> Result<Version, tokio_postgres::Error> {
        let row = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await?;
        Ok(Version(row.get(0)))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.major())
    }
}

/// A named, read-only, version-dependent query (see [`probes`]).
#[derive(Clone, Debug)]
pub struct Probe {
    pub name: &'static str,
    pub sql: String,
}

impl Probe {
    fn new(name: &'static str, sql: impl Into<String>) -> Probe {
        Probe {
            name,
            sql: sql.into(),
        }
    }
}

/// Every version-dependent read-only query pgshift runs, as it would run
/// them on a server of version `v` (parameters as `$1`…).
pub fn probes(v: Version) -> Vec<Probe> {
    let mut out = Vec::new();
    out.extend(database::probes(v));
    out.extend(slot::probes(v));
    out.extend(publication::probes(v));
    out.extend(activity::probes(v));
    out.extend(catalog::probes(v));
    out.extend(settings::probes(v));
    out
}
