//! Finding PostgreSQL's programs (postgres, pg_dump, pg_ctl, …): `PG_BIN`,
//! then PATH, then the newest `/usr/lib/postgresql/*/bin`, then what
//! scripts/fetch-pg.sh fetched ([`cache_dir`]).

use std::path::{Path, PathBuf};

/// The directory holding PostgreSQL's server programs, if any.
pub fn server_bin_dir() -> Option<PathBuf> {
    find_dir("postgres")
}

/// The directory holding `program`, searched as described above.
fn find_dir(program: &str) -> Option<PathBuf> {
    if let Ok(d) = std::env::var("PG_BIN") {
        let p = PathBuf::from(d);
        if p.join(program).is_file() {
            return Some(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let cand = dir.join(program);
            if cand.is_file() {
                // Follow symlinks so sibling programs are found in the real bin dir.
                let real = std::fs::canonicalize(&cand).unwrap_or_else(|_| cand.clone());
                // A wrapper (Debian's pg_wrapper) resolves to a directory without
                // the program: then the PATH directory itself is the answer.
                match real.parent() {
                    Some(parent) if parent.join(program).is_file() => {
                        return Some(parent.to_path_buf());
                    }
                    _ => return Some(dir),
                }
            }
        }
    }
    newest_versioned_dir(Path::new("/usr/lib/postgresql"), program).or_else(|| fetched_dir(program))
}

/// The newest fetched installation with `program`: the whole installations
/// (`clients-<major>`, with psql and pgbench) before the server-only ones.
fn fetched_dir(program: &str) -> Option<PathBuf> {
    let cache = cache_dir();
    versioned_dirs(&cache, "clients-")
        .into_iter()
        .chain(versioned_dirs(&cache, ""))
        .find(|d| d.join(program).is_file())
}

/// Why [`fetch`] found no PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{} is not there to fetch PostgreSQL", .script.display())]
    NoScript { script: PathBuf },
    #[error("running {}: {source}", .script.display())]
    Run {
        script: PathBuf,
        source: std::io::Error,
    },
    #[error("{} {args} failed ({status})", .script.display())]
    Failed {
        script: PathBuf,
        args: String,
        status: std::process::ExitStatus,
    },
    #[error("{} printed no directory", .script.display())]
    NoDirectory { script: PathBuf },
}

/// Runs scripts/fetch-pg.sh (of the source tree pgshift was built from)
/// with `args`, returning the last bin directory it prints.
pub fn fetch(args: &[&str]) -> Result<PathBuf, FetchError> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-pg.sh");
    if !script.is_file() {
        return Err(FetchError::NoScript { script });
    }
    let out = match std::process::Command::new("bash")
        .arg(&script)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
    {
        Ok(out) => out,
        Err(source) => return Err(FetchError::Run { script, source }),
    };
    if !out.status.success() {
        return Err(FetchError::Failed {
            script,
            args: args.join(" "),
            status: out.status,
        });
    }
    match String::from_utf8_lossy(&out.stdout).lines().last() {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Err(FetchError::NoDirectory { script }),
    }
}

/// The full path of `program`, or None.
pub fn find(program: &str) -> Option<PathBuf> {
    find_dir(program).map(|d| d.join(program))
}

fn newest_versioned_dir(root: &Path, program: &str) -> Option<PathBuf> {
    let mut best: Option<(u32, PathBuf)> = None;
    for entry in std::fs::read_dir(root).ok()?.flatten() {
        let v: u32 = match entry.file_name().to_string_lossy().parse() {
            Ok(v) => v,
            Err(_) => continue,
        };
        let bin = entry.path().join("bin");
        if bin.join(program).is_file() && best.as_ref().is_none_or(|(bv, _)| v > *bv) {
            best = Some((v, bin));
        }
    }
    best.map(|(_, p)| p)
}

/// The message to show when the server programs are missing.
pub const INSTALL_HINT: &str = "PostgreSQL server programs not found (PG_BIN, PATH, /usr/lib/postgresql/*/bin, the fetch cache); \
install them (Debian/Ubuntu: `apt-get install -y postgresql`), fetch them with `scripts/fetch-pg.sh --clients 18` (needs Python's pip), \
or set PG_BIN to their directory";

/// Where scripts/fetch-pg.sh keeps fetched PostgreSQL versions (one
/// `<major>/bin` per version): `$PGSHIFT_PG_CACHE`; as root
/// `/var/cache/pgshift/pg` (the server runs as the `postgres` user, which
/// cannot enter root's home); else `$XDG_CACHE_HOME/pgshift/pg` or
/// `~/.cache/pgshift/pg`. Keep in step with scripts/fetch-pg.sh.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PGSHIFT_PG_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if is_root() {
        return PathBuf::from("/var/cache/pgshift/pg");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("pgshift").join("pg")
}

/// The server programs of major version `major`: `PG_BIN_<major>`, the
/// fetch cache ([`cache_dir`]: `<major>/bin`, then the whole installation
/// `clients-<major>/bin`), `/usr/lib/postgresql/<major>/bin`, or the
/// default installation ([`server_bin_dir`]) when it is that version.
pub fn server_bin_dir_for(major: i32) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os(format!("PG_BIN_{major}")).filter(|d| !d.is_empty()) {
        candidates.push(PathBuf::from(d));
    }
    candidates.push(cache_dir().join(major.to_string()).join("bin"));
    candidates.push(cache_dir().join(format!("clients-{major}")).join("bin"));
    candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
    candidates.extend(server_bin_dir());
    candidates
        .into_iter()
        .find(|d| d.join("postgres").is_file() && dir_major(d, "postgres") == Some(major))
}

/// The major version of `dir/program`, from its `--version`.
pub fn dir_major(dir: &Path, program: &str) -> Option<i32> {
    program_version(&dir.join(program)).map(|v| v / 10_000)
}

/// The version of a PostgreSQL program as `server_version_num` would say
/// it (150008 for 15.8), from its `--version`.
pub(crate) fn program_version(path: &Path) -> Option<i32> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_program_version(&String::from_utf8_lossy(&out.stdout))
}

/// `pg_dump (PostgreSQL) 15.8 (Debian 15.8-1)` → 150008; `9.6.24` → 90624.
fn parse_program_version(text: &str) -> Option<i32> {
    let v = text
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let nums: Vec<i32> = v
        .split(|c: char| !c.is_ascii_digit())
        .take_while(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect::<Option<Vec<_>>>()?;
    match nums.as_slice() {
        [major, rest @ ..] if *major >= 10 => {
            Some(major * 10_000 + rest.first().copied().unwrap_or(0))
        }
        [major, minor, rest @ ..] => {
            Some(major * 10_000 + minor * 100 + rest.first().copied().unwrap_or(0))
        }
        _ => None,
    }
}

/// A directory with PostgreSQL's client programs (pg_dump, psql, …).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientTools {
    pub dir: PathBuf,
    /// pg_dump's version as `server_version_num` would say it.
    pub version: i32,
    /// Where it was found: `PG_BIN`, `[migration] pg_bin`, `PATH`, …
    pub origin: String,
}

impl ClientTools {
    pub fn major(&self) -> i32 {
        self.version / 10_000
    }

    /// `dir/name`.
    pub(crate) fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// "pg_dump 17 (/usr/lib/postgresql/17/bin, from PATH)".
    pub fn describe(&self) -> String {
        format!(
            "pg_dump {} ({}, from {})",
            self.major(),
            self.dir.display(),
            self.origin
        )
    }
}

/// Every directory holding both pg_dump and psql, in the order pgshift
/// searches them: `PG_BIN`, `configured` (`[migration] pg_bin`), PATH,
/// `/usr/lib/postgresql/*/bin` (newest first), then the fetch cache
/// ([`cache_dir`]: `clients-<major>/bin` and `<major>/bin`). A directory is
/// listed once; Debian's pg_wrapper links on PATH are left out (the
/// directories they lead to are listed).
pub fn client_tool_dirs(configured: Option<&Path>) -> Vec<ClientTools> {
    let mut dirs: Vec<(PathBuf, &str)> = Vec::new();
    if let Some(d) = std::env::var_os("PG_BIN").filter(|d| !d.is_empty()) {
        dirs.push((PathBuf::from(d), "PG_BIN"));
    }
    if let Some(d) = configured {
        dirs.push((d.to_path_buf(), "[migration] pg_bin"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let real = std::fs::canonicalize(dir.join("pg_dump")).ok();
            let wrapper = real
                .as_ref()
                .and_then(|r| r.file_name())
                .is_some_and(|n| n != "pg_dump");
            if !wrapper && let Some(real) = real.and_then(|r| r.parent().map(Path::to_path_buf)) {
                dirs.push((real, "PATH"));
            }
        }
    }
    dirs.extend(
        versioned_dirs(Path::new("/usr/lib/postgresql"), "")
            .into_iter()
            .map(|d| (d, "/usr/lib/postgresql")),
    );
    let cache = cache_dir();
    dirs.extend(
        versioned_dirs(&cache, "clients-")
            .into_iter()
            .map(|d| (d, "the fetch cache")),
    );
    dirs.extend(
        versioned_dirs(&cache, "")
            .into_iter()
            .map(|d| (d, "the fetch cache")),
    );
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (dir, origin) in dirs {
        if !(dir.join("pg_dump").is_file() && dir.join("psql").is_file()) {
            continue;
        }
        let key = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        if !seen.insert(key) {
            continue;
        }
        if let Some(version) = program_version(&dir.join("pg_dump")) {
            out.push(ClientTools {
                dir,
                version,
                origin: origin.to_string(),
            });
        }
    }
    out
}

/// `root/<prefix><major>/bin`, newest major first.
fn versioned_dirs(root: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let v: u32 = name.strip_prefix(prefix)?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// How chosen client programs relate to the target's major version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolsFit {
    /// The target's major version: what pgshift prefers.
    Exact,
    /// Older than the target (and not older than the source): its output
    /// restores on the newer target.
    Older,
    /// Newer than the target: settings the target lacks are left out of
    /// the dump, other new syntax could still fail.
    Newer,
}

/// The client programs for a source of major `source` and a target of
/// major `target`: pg_dump must be at least the source's version (it
/// refuses newer servers); the target's own version is preferred, then the
/// newest older one, then the oldest newer one. None when nothing fits.
pub(crate) fn choose_client_tools(
    candidates: &[ClientTools],
    source: i32,
    target: i32,
) -> Option<(ClientTools, ToolsFit)> {
    let usable = || candidates.iter().filter(|c| c.major() >= source);
    if let Some(c) = usable().find(|c| c.major() == target) {
        return Some((c.clone(), ToolsFit::Exact));
    }
    if let Some(c) = usable()
        .filter(|c| c.major() < target)
        .max_by_key(|c| c.version)
    {
        return Some((c.clone(), ToolsFit::Older));
    }
    usable()
        .filter(|c| c.major() > target)
        .min_by_key(|c| c.version)
        .map(|c| (c.clone(), ToolsFit::Newer))
}

/// What to install when no client programs fit (see [`choose_client_tools`]).
pub(crate) fn client_tools_hint(target: i32) -> String {
    let fetch = if matches!(target, 16 | 18) {
        format!(", or `scripts/fetch-pg.sh --clients {target}`")
    } else {
        String::new()
    };
    format!(
        "install the PostgreSQL {target} client programs (Debian/Ubuntu: apt-get install postgresql-client-{target}{fetch}) \
         and set PG_BIN or [migration] pg_bin to their directory if they are not on PATH"
    )
}

/// Is this process root? (Then the cache is shared, and servers run as
/// the `postgres` user, see `localpg`.)
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(major: i32) -> ClientTools {
        ClientTools {
            dir: PathBuf::from(format!("/pg/{major}/bin")),
            version: major * 10_000 + 1,
            origin: "test".into(),
        }
    }

    #[test]
    fn client_tools_choice() {
        let all: Vec<ClientTools> = [15, 16, 18].into_iter().map(tools).collect();
        let pick = |s, t| choose_client_tools(&all, s, t).map(|(c, fit)| (c.major(), fit));
        assert_eq!(pick(13, 16), Some((16, ToolsFit::Exact)));
        assert_eq!(pick(13, 17), Some((16, ToolsFit::Older)));
        assert_eq!(pick(17, 17), Some((18, ToolsFit::Newer)));
        assert_eq!(pick(11, 15), Some((15, ToolsFit::Exact)));
        assert_eq!(choose_client_tools(&all[..2], 17, 18), None);
        assert!(client_tools_hint(17).contains("postgresql-client-17"));
        assert!(client_tools_hint(18).contains("--clients 18"));
    }

    #[test]
    fn program_versions() {
        assert_eq!(
            parse_program_version("pg_dump (PostgreSQL) 15.8 (Debian 15.8-1.pgdg)"),
            Some(150008)
        );
        assert_eq!(
            parse_program_version("postgres (PostgreSQL) 11.22"),
            Some(110022)
        );
    }
}
