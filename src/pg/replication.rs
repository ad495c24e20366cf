//! What the logical replication stream may ask of a source, by version:
//! pgoutput's protocol versions and options, the CREATE_REPLICATION_SLOT
//! syntax, and how a cutover marker reaches apply. Sources from PostgreSQL
//! 11 on are supported.

use super::Version;

/// What a server's pgoutput understands (START_REPLICATION options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pgoutput {
    /// Highest `proto_version`: 1 up to 13, 2 on 14 (streaming), 3 on 15
    /// (two-phase), 4 from 16 (parallel streaming).
    pub max_proto_version: u32,
    /// `messages`: logical decoding messages are sent (as 'M'), 14+.
    pub messages: bool,
    /// `streaming`: large in-progress transactions are sent, 14+ (needs
    /// `proto_version` 2 or more).
    pub streaming: bool,
    /// `binary`: column values in binary, 14+.
    pub binary: bool,
    /// `origin`: changes filtered by replication origin, 16+.
    pub origin: bool,
}

/// How a cutover marker travels from the source to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MarkerTransport {
    /// A transactional logical decoding message (`pg_logical_emit_message`),
    /// which pgoutput delivers from 14 on.
    LogicalMessage,
    /// A row written to a small pgshift-owned table on the source that is in
    /// the publication: pgoutput before 14 drops logical messages, but a
    /// row change is delivered by every version.
    Row,
}

impl Version {
    /// Reads the `server_version` a server reports at startup ("13.4
    /// (Debian 13.4-1)", "16beta1", "9.6.3"): a replication connection has
    /// no `server_version_num`. None if it does not start with a number.
    pub(crate) fn from_server_version(v: &str) -> Option<Version> {
        let mut parts = v
            .split(|c: char| !c.is_ascii_digit())
            .map(|s| s.parse::<i32>().ok());
        let major = parts.next()??;
        let second = parts.next().flatten().unwrap_or(0);
        Some(if major >= 10 {
            Version(major * 10000 + second)
        } else {
            // 9.6.3: major 9.6, minor 3.
            let minor = parts.next().flatten().unwrap_or(0);
            Version(major * 10000 + second * 100 + minor)
        })
    }

    /// What the server's pgoutput understands.
    pub fn pgoutput(self) -> Pgoutput {
        let major = self.major();
        Pgoutput {
            max_proto_version: match major {
                ..=13 => 1,
                14 => 2,
                15 => 3,
                _ => 4,
            },
            messages: major >= 14,
            streaming: major >= 14,
            binary: major >= 14,
            origin: major >= 16,
        }
    }

    /// How this source's cutover markers travel.
    pub(crate) fn marker_transport(self) -> MarkerTransport {
        if self.pgoutput().messages {
            MarkerTransport::LogicalMessage
        } else {
            MarkerTransport::Row
        }
    }

    /// `CREATE_REPLICATION_SLOT` for a pgoutput slot. 15 introduced the
    /// parenthesised option list; before, only the keyword form exists
    /// (still accepted later, but deprecated).
    pub(crate) fn create_slot_command(
        self,
        name: &str,
        temporary: bool,
        export_snapshot: bool,
    ) -> String {
        let temp = if temporary { " TEMPORARY" } else { "" };
        let snap = match (export_snapshot, self.major() >= 15) {
            (true, true) => " (SNAPSHOT 'export')",
            (false, true) => " (SNAPSHOT 'nothing')",
            (true, false) => " EXPORT_SNAPSHOT",
            (false, false) => " NOEXPORT_SNAPSHOT",
        };
        format!("CREATE_REPLICATION_SLOT {name}{temp} LOGICAL pgoutput{snap}")
    }

    /// `DROP_REPLICATION_SLOT`; None when `wait` is asked of a server
    /// without the WAIT option (before 13).
    pub(crate) fn drop_slot_command(self, name: &str, wait: bool) -> Option<String> {
        match (wait, self.major() >= 13) {
            (true, false) => None,
            (true, true) => Some(format!("DROP_REPLICATION_SLOT {name} WAIT")),
            (false, _) => Some(format!("DROP_REPLICATION_SLOT {name}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_versions() {
        let v = |s| Version::from_server_version(s);
        assert_eq!(v("15.4 (Debian 15.4-1.pgdg120+1)"), Some(Version(150004)));
        assert_eq!(v("13.22"), Some(Version(130022)));
        assert_eq!(v("16beta1"), Some(Version(160000)));
        assert_eq!(v("11.0"), Some(Version(110000)));
        assert_eq!(v("9.6.3"), Some(Version(90603)));
        assert_eq!(v("x"), None);
        assert_eq!(v(""), None);
        assert_eq!(v("13.4").map(Version::major), Some(13));
    }

    #[test]
    fn pgoutput_options_by_version() {
        for major in 11..=13 {
            let p = Version(major * 10000).pgoutput();
            assert_eq!(p.max_proto_version, 1);
            assert!(!p.messages && !p.streaming && !p.binary && !p.origin);
            assert_eq!(
                Version(major * 10000).marker_transport(),
                MarkerTransport::Row
            );
        }
        let p = Version(140005).pgoutput();
        assert_eq!(p.max_proto_version, 2);
        assert!(p.messages && p.streaming && p.binary && !p.origin);
        assert_eq!(Version(150000).pgoutput().max_proto_version, 3);
        for major in 16..=18 {
            let p = Version(major * 10000).pgoutput();
            assert_eq!(p.max_proto_version, 4);
            assert!(p.messages && p.origin);
        }
        assert_eq!(
            Version(140000).marker_transport(),
            MarkerTransport::LogicalMessage
        );
    }

    #[test]
    fn slot_commands() {
        assert_eq!(
            Version(130004).create_slot_command("s", false, true),
            "CREATE_REPLICATION_SLOT s LOGICAL pgoutput EXPORT_SNAPSHOT"
        );
        assert_eq!(
            Version(140000).create_slot_command("s", true, false),
            "CREATE_REPLICATION_SLOT s TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT"
        );
        assert_eq!(
            Version(150000).create_slot_command("s", false, true),
            "CREATE_REPLICATION_SLOT s LOGICAL pgoutput (SNAPSHOT 'export')"
        );
        assert_eq!(
            Version(180000).create_slot_command("s", true, false),
            "CREATE_REPLICATION_SLOT s TEMPORARY LOGICAL pgoutput (SNAPSHOT 'nothing')"
        );
        assert_eq!(
            Version(120000).drop_slot_command("s", false).as_deref(),
            Some("DROP_REPLICATION_SLOT s")
        );
        assert_eq!(Version(120000).drop_slot_command("s", true), None);
        assert_eq!(
            Version(130000).drop_slot_command("s", true).as_deref(),
            Some("DROP_REPLICATION_SLOT s WAIT")
        );
    }
}
