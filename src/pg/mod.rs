//! What differs per PostgreSQL major version: catalog columns, functions,
//! pgoutput protocol versions and options. Callers ask a [`Version`] what the
//! server has instead of comparing numbers themselves, so every version
//! difference lives here, one place per concern.

use tokio_postgres::Client;

pub mod replication;

/// A server's version as `server_version_num` (e.g. 150004 for 15.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub i32);

impl Version {
    /// The major version: 15 for 150004 (and 9 for 9.6's 90600).
    pub fn major(self) -> i32 {
        self.0 / 10000
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
