//! Which tables a migration carries: `[migration] tables` / `exclude_tables`,
//! globs over `schema.table` (`*` any run of characters, `?` one character).
//! The one filter used by validation, the copy, the publication (and so the
//! stream) and verify, so they always agree on the set of tables.

use crate::config::MigrationConfig;

/// The table selection of a migration.
#[derive(Clone, Debug, Default)]
pub struct TableFilter {
    /// Only these; empty means all.
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl TableFilter {
    pub fn new(include: &[String], exclude: &[String]) -> TableFilter {
        TableFilter {
            include: include.to_vec(),
            exclude: exclude.to_vec(),
        }
    }

    pub(crate) fn from_migration(m: &MigrationConfig) -> TableFilter {
        TableFilter::new(&m.tables, &m.exclude_tables)
    }

    /// True when `schema.table` is carried: listed (or no list) and not excluded.
    /// Names are matched as stored in the catalog, unquoted.
    pub(crate) fn includes(&self, schema: &str, table: &str) -> bool {
        let name = format!("{schema}.{table}");
        let listed = self.include.is_empty() || self.include.iter().any(|p| glob_match(p, &name));
        listed && !self.exclude.iter().any(|p| glob_match(p, &name))
    }

    /// True when some tables are left out by configuration.
    pub(crate) fn is_filtered(&self) -> bool {
        !self.include.is_empty() || !self.exclude.is_empty()
    }
}

/// Glob match with `*` and `?`, iterative with backtracking to the last `*`.
fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("public.*", "public.orders"));
        assert!(glob_match("*.orders", "sales.orders"));
        assert!(glob_match("public.ord?rs", "public.orders"));
        assert!(glob_match("*", "a.b"));
        assert!(glob_match("public.a*b*c", "public.axxbyyc"));
        assert!(!glob_match("public.a*b*c", "public.axxbyy"));
        assert!(!glob_match("public.orders", "public.orders2"));
        assert!(!glob_match("public.*", "sales.orders"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a", "ab"));
        assert!(glob_match("p?blic.t*s", "public.tables"));
    }

    #[test]
    fn include_and_exclude() {
        let f = TableFilter::new(&["public.*".into()], &["public.tmp_*".into()]);
        assert!(f.includes("public", "orders"));
        assert!(!f.includes("public", "tmp_x"));
        assert!(!f.includes("sales", "orders"));
        assert!(TableFilter::default().includes("any", "thing"));
        assert!(!TableFilter::default().is_filtered());
        assert!(TableFilter::new(&[], &["a.*".into()]).is_filtered());
    }
}
