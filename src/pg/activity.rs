//! Sessions: `pg_terminate_backend(pid, timeout)` waits for the session to
//! exit from 14; before, it only signals.

use tokio_postgres::Client;

use super::{Probe, Version};

impl Version {
    /// Can `pg_terminate_backend` wait for the session to exit (14+)?
    pub(crate) fn terminate_can_wait(self) -> bool {
        self.at_least(14)
    }
}

/// `pg_terminate_backend(pid_expr[, wait_ms])`: waiting where the server can.
fn terminate_call(v: Version, pid_expr: &str, wait_ms: u32) -> String {
    if v.terminate_can_wait() {
        format!("pg_terminate_backend({pid_expr}, {wait_ms})")
    } else {
        format!("pg_terminate_backend({pid_expr})")
    }
}

/// pgshift's sessions on `pg_stat_activity`: client backends of other
/// databases than its own are what the fence terminates (`backend_type`
/// exists from 10).
pub(crate) const CLIENT_BACKENDS_SQL: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = ANY($1::text[]) AND pid <> pg_backend_pid() AND backend_type = 'client backend'";

/// A server's connection slots for ordinary roles: `max_connections` less
/// the slots kept for superusers (`superuser_reserved_connections`, and
/// `reserved_connections` from 16), and the backends using them (client
/// backends; walsenders too before 12, when they came out of
/// `max_connections`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    pub max_connections: i32,
    pub reserved: i32,
    pub used: i32,
}

fn slots_sql(v: Version) -> String {
    let reserved = if v.at_least(16) {
        "current_setting('superuser_reserved_connections')::int \
         + current_setting('reserved_connections')::int"
    } else {
        "current_setting('superuser_reserved_connections')::int"
    };
    let kinds = if v.at_least(12) {
        "'client backend'"
    } else {
        "'client backend', 'walsender'"
    };
    format!(
        "SELECT current_setting('max_connections')::int, {reserved}, \
         (SELECT count(*)::int FROM pg_stat_activity WHERE backend_type IN ({kinds}))"
    )
}

impl Slots {
    /// Reads the slots of the server behind `c` (the reading session counts as used).
    pub async fn of(c: &Client, v: Version) -> Result<Slots, tokio_postgres::Error> {
        let row = c.query_one(&slots_sql(v), &[]).await?;
        Ok(Slots {
            max_connections: row.get(0),
            reserved: row.get(1),
            used: row.get(2),
        })
    }

    /// How many more connections ordinary roles can open now.
    pub fn free(&self) -> i32 {
        (self.max_connections - self.reserved - self.used).max(0)
    }

    /// The `max_connections` that leaves room for `more` connections on
    /// top of those open now (and a tenth to spare).
    pub fn max_connections_for(&self, more: i32) -> i32 {
        let needed = self.reserved + self.used + more;
        needed + needed / 10 + 1
    }

    /// What the numbers are, in words.
    pub fn describe(&self) -> String {
        format!(
            "{} more connection(s) (max_connections {}, {} reserved, {} in use)",
            self.free(),
            self.max_connections,
            self.reserved,
            self.used
        )
    }
}

pub fn probes(v: Version) -> Vec<Probe> {
    vec![
        Probe::new("activity.client_backends", CLIENT_BACKENDS_SQL),
        Probe::new("activity.slots", slots_sql(v)),
        // Terminating nobody (pid 0 is never a backend) checks the signature.
        Probe::new(
            "activity.terminate",
            format!("SELECT {} WHERE false", terminate_call(v, "0", 1)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_slots_and_the_setting_that_makes_room() {
        let s = Slots {
            max_connections: 100,
            reserved: 3,
            used: 90,
        };
        assert_eq!(s.free(), 7);
        // 3 + 90 + 20 = 113, and a tenth to spare.
        assert_eq!(s.max_connections_for(20), 125);
        let full = Slots { used: 99, ..s };
        assert_eq!(full.free(), 0);
        assert!(slots_sql(Version::major_release(11)).contains("walsender"));
        assert!(!slots_sql(Version::major_release(12)).contains("walsender"));
        assert!(slots_sql(Version::major_release(16)).contains("reserved_connections')::int +"));
        assert!(!slots_sql(Version::major_release(15)).contains("+ current_setting"));
    }

    #[test]
    fn terminate_waits_from_14() {
        let v = Version::major_release;
        assert_eq!(terminate_call(v(13), "pid", 5), "pg_terminate_backend(pid)");
        assert_eq!(
            terminate_call(v(14), "pid", 5),
            "pg_terminate_backend(pid, 5)"
        );
    }
}
