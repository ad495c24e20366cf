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
