//! Publications: `publish_via_partition_root` (13+), row filters and column
//! lists and `FOR TABLES IN SCHEMA` (15+), `pubtruncate` (11+).
//!
//! pgshift's publication streams every change under the leaf table's own
//! name (the copy copies leaf partitions), with every column and row: an
//! existing publication that publishes otherwise is not "the same shape".

use super::{Probe, Version};

/// `WITH (…)` for CREATE PUBLICATION: changes under the leaf partition's
/// name, stated where the server has the option (13+; the only behaviour before).
pub(crate) fn create_options(v: Version) -> &'static str {
    if v.at_least(13) {
        " WITH (publish_via_partition_root = false)"
    } else {
        ""
    }
}

/// Publication `$1`: oid, puballtables, and whether it publishes plainly:
/// every action, under leaf names, all rows and columns, no schemas.
pub(crate) fn shape_sql(v: Version) -> String {
    let mut plain = vec!["p.pubinsert", "p.pubupdate", "p.pubdelete"];
    if v.at_least(11) {
        plain.push("p.pubtruncate");
    }
    if v.at_least(13) {
        plain.push("NOT p.pubviaroot");
    }
    if v.at_least(15) {
        plain.push(
            "NOT EXISTS (SELECT 1 FROM pg_publication_rel r WHERE r.prpubid = p.oid \
             AND (r.prqual IS NOT NULL OR r.prattrs IS NOT NULL))",
        );
        plain.push("NOT EXISTS (SELECT 1 FROM pg_publication_namespace s WHERE s.pnpubid = p.oid)");
    }
    format!(
        "SELECT p.oid, p.puballtables, {} FROM pg_publication p WHERE p.pubname = $1",
        plain.join(" AND ")
    )
}

/// The tables of publication oid `$1`: schema and name.
pub(crate) const TABLES_SQL: &str = "SELECT n.nspname::text, c.relname::text FROM pg_publication_rel pr \
     JOIN pg_class c ON c.oid = pr.prrelid \
     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE pr.prpubid = $1";

pub fn probes(v: Version) -> Vec<Probe> {
    vec![
        Probe::new("publication.shape", shape_sql(v)),
        Probe::new("publication.tables", TABLES_SQL),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_per_version() {
        let v = Version::major_release;
        assert_eq!(create_options(v(12)), "");
        assert!(create_options(v(13)).contains("publish_via_partition_root"));
        assert!(!shape_sql(v(12)).contains("pubviaroot"));
        assert!(shape_sql(v(13)).contains("pubviaroot"));
        assert!(!shape_sql(v(14)).contains("prqual"));
        assert!(shape_sql(v(15)).contains("prqual"));
    }
}
