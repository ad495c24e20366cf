//! `pg_database` and CREATE / DROP DATABASE: the locale provider columns
//! (15: `datlocprovider`, `daticulocale`; 16: `daticurules`; 17 renames
//! `daticulocale` to `datlocale` and adds the builtin provider) and
//! `DROP DATABASE … WITH (FORCE)` (13+).

use super::{Probe, Version};
use crate::db::{quote_ident, quote_literal};

/// The locale provider and its locale as `pg_database` columns: provider
/// (`c` libc, `i` ICU, `b` builtin), locale, ICU rules; before 15 always libc.
fn provider_columns(v: Version, alias: &str) -> String {
    let a = alias;
    let locale = if v.at_least(17) {
        format!("{a}.datlocale")
    } else {
        format!("{a}.daticulocale")
    };
    let rules = if v.at_least(16) {
        format!("{a}.daticurules")
    } else {
        "NULL::text".into()
    };
    if v.at_least(15) {
        format!(
            "{a}.datlocprovider::text, CASE WHEN {a}.datlocprovider <> 'c' THEN {locale} END, \
             CASE WHEN {a}.datlocprovider = 'i' THEN {rules} END"
        )
    } else {
        "'c'::text, NULL::text, NULL::text".into()
    }
}

/// Every database: name, datallowconn, encoding, collate, ctype, provider,
/// provider locale, ICU rules, and whether the current user owns it.
pub(crate) fn list_databases_sql(v: Version) -> String {
    format!(
        "SELECT d.datname::text, d.datallowconn, pg_encoding_to_char(d.encoding)::text, \
                d.datcollate::text, d.datctype::text, {}, pg_has_role(d.datdba, 'USAGE') \
         FROM pg_database d",
        provider_columns(v, "d")
    )
}

/// Database `$1`: encoding, collate, ctype, owner, provider, provider
/// locale, ICU rules.
pub fn locale_sql(v: Version) -> String {
    format!(
        "SELECT pg_encoding_to_char(d.encoding)::text, d.datcollate::text, d.datctype::text, \
                pg_get_userbyid(d.datdba)::text, {} \
         FROM pg_database d WHERE d.datname = $1",
        provider_columns(v, "d")
    )
}

/// Terminates the other sessions on database `$1` (before DROP DATABASE on
/// servers without FORCE, and so that FORCE has less to do).
pub const TERMINATE_SESSIONS_SQL: &str = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
     WHERE datname = $1 AND pid <> pg_backend_pid()";

/// DROP DATABASE, forcing out late sessions where the server can (13+).
pub fn drop_database_sql(v: Version, db: &str) -> String {
    let force = if v.at_least(13) { " WITH (FORCE)" } else { "" };
    format!("DROP DATABASE {}{force}", quote_ident(db))
}

/// A database's encoding and locale as the target must reproduce them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbLocale {
    pub encoding: String,
    pub collate: String,
    pub ctype: String,
    /// `c` libc, `i` ICU, `b` builtin.
    pub provider: String,
    /// The ICU or builtin locale, when the provider is not libc.
    pub locale: Option<String>,
    /// ICU tailoring rules (16+).
    pub icu_rules: Option<String>,
}

/// Why a locale cannot be created on the target.
#[derive(Debug, thiserror::Error)]
#[error("the {provider} locale provider needs PostgreSQL {needs}; the target runs {target}")]
pub struct LocaleUnsupported {
    pub provider: &'static str,
    pub needs: i32,
    pub target: Version,
}

/// `CREATE DATABASE db TEMPLATE template0 …` with `l`'s encoding and locale,
/// as a target of version `target` spells it (without OWNER).
pub fn create_database_sql(
    target: Version,
    db: &str,
    l: &DbLocale,
) -> Result<String, LocaleUnsupported> {
    let mut sql = format!(
        "CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}",
        quote_ident(db),
        quote_literal(&l.encoding),
        quote_literal(&l.collate),
        quote_literal(&l.ctype)
    );
    let unsupported = |provider, needs| LocaleUnsupported {
        provider,
        needs,
        target,
    };
    match (l.provider.as_str(), &l.locale) {
        ("i", Some(loc)) => {
            if !target.at_least(15) {
                return Err(unsupported("icu", 15));
            }
            sql.push_str(&format!(
                " LOCALE_PROVIDER icu ICU_LOCALE {}",
                quote_literal(loc)
            ));
            if let Some(rules) = l.icu_rules.as_deref().filter(|r| !r.is_empty()) {
                if !target.at_least(16) {
                    return Err(unsupported("icu (with ICU_RULES)", 16));
                }
                sql.push_str(&format!(" ICU_RULES {}", quote_literal(rules)));
            }
        }
        ("b", Some(loc)) => {
            if !target.at_least(17) {
                return Err(unsupported("builtin", 17));
            }
            sql.push_str(&format!(
                " LOCALE_PROVIDER builtin BUILTIN_LOCALE {}",
                quote_literal(loc)
            ));
        }
        _ => {}
    }
    Ok(sql)
}

pub fn probes(v: Version) -> Vec<Probe> {
    vec![
        Probe::new("database.list_databases", list_databases_sql(v)),
        Probe::new("database.locale", locale_sql(v)),
        Probe::new("database.terminate_sessions", TERMINATE_SESSIONS_SQL),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locale(provider: &str, loc: Option<&str>) -> DbLocale {
        DbLocale {
            encoding: "UTF8".into(),
            collate: "C".into(),
            ctype: "C".into(),
            provider: provider.into(),
            locale: loc.map(str::to_string),
            icu_rules: None,
        }
    }

    #[test]
    fn locale_columns_per_version() {
        let v = Version::major_release;
        assert!(list_databases_sql(v(14)).contains("'c'::text"));
        assert!(list_databases_sql(v(15)).contains("daticulocale"));
        assert!(!list_databases_sql(v(15)).contains("daticurules"));
        assert!(list_databases_sql(v(16)).contains("daticurules"));
        assert!(list_databases_sql(v(17)).contains("datlocale"));
        assert!(!locale_sql(v(17)).contains("daticulocale"));
        assert_eq!(drop_database_sql(v(12), "a"), "DROP DATABASE \"a\"");
        assert_eq!(
            drop_database_sql(v(13), "a"),
            "DROP DATABASE \"a\" WITH (FORCE)"
        );
    }

    #[test]
    fn create_database_per_provider() {
        let v = Version::major_release;
        let sql = create_database_sql(v(17), "d", &locale("c", None)).unwrap();
        assert!(!sql.contains("LOCALE_PROVIDER"), "{sql}");
        let sql = create_database_sql(v(16), "d", &locale("i", Some("de-DE"))).unwrap();
        assert!(
            sql.ends_with("LOCALE_PROVIDER icu ICU_LOCALE 'de-DE'"),
            "{sql}"
        );
        let sql = create_database_sql(v(17), "d", &locale("b", Some("C.UTF-8"))).unwrap();
        assert!(sql.ends_with("LOCALE_PROVIDER builtin BUILTIN_LOCALE 'C.UTF-8'"));
        assert!(create_database_sql(v(16), "d", &locale("b", Some("C"))).is_err());
        let mut rules = locale("i", Some("und"));
        rules.icu_rules = Some("&a < b".into());
        assert!(create_database_sql(v(15), "d", &rules).is_err());
        assert!(
            create_database_sql(v(16), "d", &rules)
                .unwrap()
                .ends_with("ICU_RULES '&a < b'")
        );
    }
}
