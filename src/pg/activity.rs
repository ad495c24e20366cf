//! Sessions: `pg_terminate_backend(pid, timeout)` waits for the session to
//! exit from 14; before, it only signals.

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
const CLIENT_BACKENDS_SQL: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = ANY($1::text[]) AND pid <> pg_backend_pid() AND backend_type = 'client backend'";

pub fn probes(v: Version) -> Vec<Probe> {
    vec![
        Probe::new("activity.client_backends", CLIENT_BACKENDS_SQL),
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
    fn terminate_waits_from_14() {
        let v = Version::major_release;
        assert_eq!(terminate_call(v(13), "pid", 5), "pg_terminate_backend(pid)");
        assert_eq!(
            terminate_call(v(14), "pid", 5),
            "pg_terminate_backend(pid, 5)"
        );
    }
}
