//! Finding PostgreSQL's programs (postgres, pg_dump, pg_ctl, …): `PG_BIN`,
//! then PATH, then the newest `/usr/lib/postgresql/*/bin`.

use std::path::{Path, PathBuf};

/// The directory holding PostgreSQL's server programs, if any.
pub fn server_bin_dir() -> Option<PathBuf> {
    find_dir("postgres")
}

/// The directory holding `program`, searched as described above.
pub fn find_dir(program: &str) -> Option<PathBuf> {
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
    newest_versioned_dir(Path::new("/usr/lib/postgresql"), program)
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
pub const INSTALL_HINT: &str = "PostgreSQL server programs not found on PATH or under /usr/lib/postgresql/*/bin; \
install them (Debian/Ubuntu: `apt-get install -y postgresql`) or set PG_BIN to their directory";

/// Where scripts/fetch-pg.sh keeps fetched PostgreSQL versions (one
/// `<major>/bin` per version): `$PGSHIFT_PG_CACHE`; as root
/// `/var/cache/pgshift/pg` (the server runs as the `postgres` user, which
/// cannot enter root's home); else `$XDG_CACHE_HOME/pgshift/pg` or
/// `~/.cache/pgshift/pg`. Keep in step with scripts/fetch-pg.sh.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PGSHIFT_PG_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if crate::localpg::is_root() {
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
/// fetch cache ([`cache_dir`]), `/usr/lib/postgresql/<major>/bin`, or the
/// default installation ([`server_bin_dir`]) when it is that version.
pub fn server_bin_dir_for(major: i32) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os(format!("PG_BIN_{major}")).filter(|d| !d.is_empty()) {
        candidates.push(PathBuf::from(d));
    }
    candidates.push(cache_dir().join(major.to_string()).join("bin"));
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
pub fn program_version(path: &Path) -> Option<i32> {
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
pub fn parse_program_version(text: &str) -> Option<i32> {
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
