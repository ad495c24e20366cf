//! Names of the objects pgshift creates for one (migration, database):
//! the logical replication slot and publication on the source, and the
//! replication origin on the target.
//!
//! The derivation is part of pgshift's persistent state: a restarted pgshift
//! finds its slot by recomputing the name, so it must never change.

use sha2::{Digest, Sha256};

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1), in bytes.
pub(crate) const MAX_NAME_LEN: usize = 63;

const PREFIX: &str = "pgshift_";
/// Hex digits of the hash suffix; 32 bits keep names of one migration apart.
const HASH_LEN: usize = 8;

/// The names of one (migration, database) pair's replication objects.
///
/// All three are the same string: slots, publications and origins live in
/// separate namespaces, and one name is easiest for an operator to follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationNames {
    /// Logical replication slot on the source (cluster-wide namespace).
    pub slot: String,
    /// Publication in the source database.
    pub publication: String,
    /// Replication origin on the target (cluster-wide namespace).
    pub origin: String,
}

impl ReplicationNames {
    /// `pgshift_<migration>_<database>_<hash>`, lowercase `a-z0-9_` only, at
    /// most 63 bytes. The readable parts are cleaned and shortened; the hash
    /// of the exact (migration, database) pair keeps names unique even when
    /// databases differ only in case or punctuation (`App`, `app`, `a-pp`).
    pub fn new(migration: &str, database: &str) -> ReplicationNames {
        let name = derive_name(migration, database);
        ReplicationNames {
            slot: name.clone(),
            publication: name.clone(),
            origin: name,
        }
    }
}

/// The name the reverse direction (target → source, after a cutover) of
/// `migration` uses for its slot, publication and origin: its own, so the
/// two directions never share an object.
pub fn reverse_migration(migration: &str) -> String {
    format!("{migration}/reverse")
}

fn derive_name(migration: &str, database: &str) -> String {
    let mut h = Sha256::new();
    h.update(migration.as_bytes());
    // The separator keeps ("ab", "c") and ("a", "bc") apart.
    h.update([0u8]);
    h.update(database.as_bytes());
    let digest = h.finalize();
    let hash: String = digest
        .iter()
        .take(HASH_LEN / 2)
        .map(|b| format!("{b:02x}"))
        .collect();

    let mig = clean(migration);
    let db = clean(database);
    // Room for the readable parts: prefix, two underscores and the hash are fixed.
    let budget = MAX_NAME_LEN - PREFIX.len() - 2 - HASH_LEN;
    let mig_len = mig
        .len()
        .min(budget.saturating_sub(db.len()).max(budget / 2));
    let db_len = db.len().min(budget - mig_len);
    format!("{PREFIX}{}_{}_{hash}", &mig[..mig_len], &db[..db_len])
}

/// Lowercase ASCII letters and digits kept, everything else becomes `_`.
/// The result is pure ASCII, so byte slicing it is safe.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Is `name` acceptable as a replication slot name (PostgreSQL allows only
/// lowercase letters, digits and underscores, up to 63 bytes)?
pub(crate) fn is_valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_names_are_readable_and_valid() {
        let n = ReplicationNames::new("move-1", "app");
        assert!(n.slot.starts_with("pgshift_move_1_app_"), "{}", n.slot);
        assert_eq!(n.slot.len(), "pgshift_move_1_app_".len() + HASH_LEN);
        assert!(is_valid_slot_name(&n.slot));
        assert_eq!(n.slot, n.publication);
        assert_eq!(n.slot, n.origin);
    }

    #[test]
    fn names_are_stable() {
        // Persistent state depends on this exact value: never change it.
        assert_eq!(
            ReplicationNames::new("move-1", "App").slot,
            "pgshift_move_1_app_8ea5bcd3"
        );
    }

    #[test]
    fn case_and_punctuation_variants_differ() {
        let dbs = ["App", "app", "a-pp", "a_pp", "a.pp", "APP", "äpp", "app "];
        let mut seen = std::collections::HashSet::new();
        for db in dbs {
            let n = ReplicationNames::new("mig", db).slot;
            assert!(is_valid_slot_name(&n), "{n}");
            assert!(seen.insert(n.clone()), "duplicate name {n} for {db:?}");
        }
        // The same database in another migration gets another name.
        assert_ne!(
            ReplicationNames::new("mig", "app").slot,
            ReplicationNames::new("mig2", "app").slot
        );
        // The separator keeps the split between migration and database.
        assert_ne!(derive_name("ab", "c"), derive_name("a", "bc"));
    }

    #[test]
    fn long_names_are_shortened_to_63_bytes() {
        let long_mig = "m".repeat(40);
        let long_db = "D".repeat(63);
        for (m, d) in [
            (long_mig.as_str(), long_db.as_str()),
            ("x", long_db.as_str()),
            (long_mig.as_str(), "y"),
            ("a", "ü".repeat(31).as_str()),
        ] {
            let n = ReplicationNames::new(m, d).slot;
            assert!(n.len() <= MAX_NAME_LEN, "{n} is {} bytes", n.len());
            assert!(is_valid_slot_name(&n), "{n}");
        }
        // Both readable parts keep something when both are long.
        let n = ReplicationNames::new(&long_mig, &long_db).slot;
        assert!(n.contains("_mmm") && n.contains("_ddd"), "{n}");
        // Names that share a long prefix still differ by the hash.
        let a = ReplicationNames::new("m", &format!("{long_db}1")).slot;
        let b = ReplicationNames::new("m", &format!("{long_db}2")).slot;
        assert_ne!(a, b);
    }

    #[test]
    fn slot_name_validation() {
        assert!(is_valid_slot_name("pgshift_a_b_0123abcd"));
        assert!(!is_valid_slot_name(""));
        assert!(!is_valid_slot_name("Upper"));
        assert!(!is_valid_slot_name("with-dash"));
        assert!(!is_valid_slot_name("quote\"d"));
        assert!(!is_valid_slot_name(&"a".repeat(64)));
    }
}
