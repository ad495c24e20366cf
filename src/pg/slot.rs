//! `pg_replication_slots`: `wal_status` exists from 13.

use super::{Probe, Version};

/// Slot `$1`: name, plugin, type, database, temporary, active, active_pid,
/// restart_lsn, confirmed_flush_lsn, wal_status (NULL before 13), and the
/// WAL it retains in bytes (needs a primary).
pub(crate) fn slot_state_sql(v: Version) -> String {
    let wal_status = if v.at_least(13) {
        "wal_status"
    } else {
        "NULL::text"
    };
    format!(
        "SELECT slot_name::text, plugin::text, slot_type, database::text, temporary, active, \
                active_pid, restart_lsn::text, confirmed_flush_lsn::text, {wal_status}, \
                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint \
         FROM pg_replication_slots WHERE slot_name = $1"
    )
}

pub fn probes(v: Version) -> Vec<Probe> {
    vec![Probe::new("slot.state", slot_state_sql(v))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_status_from_13() {
        assert!(slot_state_sql(Version::major_release(12)).contains("NULL::text,"));
        assert!(slot_state_sql(Version::major_release(13)).contains(" wal_status,"));
    }
}
