//! Server programs of a given PostgreSQL major version for tests that need
//! one other than the default (`scripts/fetch-pg.sh` puts them in
//! ~/.cache/pgshift/pg/<major>/bin). A stopgap until the harness picks
//! versions itself: as root the server runs as `postgres`, which cannot read
//! /root, so the installation is copied once to a readable place.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The bin dir of PostgreSQL `major`, or None (with a note on stderr) when
/// it is not installed; with `PGSHIFT_REQUIRE_VERSIONS=1` a missing version
/// fails the test instead.
pub fn server_bin(major: u32) -> Option<PathBuf> {
    let found = find(major);
    if found.is_none() {
        let msg = format!(
            "PostgreSQL {major} server programs not found (run scripts/fetch-pg.sh {major} {major})"
        );
        if std::env::var("PGSHIFT_REQUIRE_VERSIONS").as_deref() == Ok("1") {
            panic!("{msg}; PGSHIFT_REQUIRE_VERSIONS=1");
        }
        eprintln!("SKIPPED: {msg}");
    }
    found
}

fn find(major: u32) -> Option<PathBuf> {
    let readable = std::env::temp_dir()
        .join("pgshift-pg-bins")
        .join(major.to_string());
    if readable.join("bin/postgres").is_file() {
        return Some(readable.join("bin"));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    let cached = home.join(".cache/pgshift/pg").join(major.to_string());
    if !cached.join("bin/postgres").is_file() {
        return None;
    }
    // Copy, then publish by an atomic rename (tests run in parallel).
    let root = readable.parent()?.to_path_buf();
    std::fs::create_dir_all(&root).ok()?;
    let tmp = tempfile::Builder::new()
        .prefix("copy-")
        .tempdir_in(&root)
        .ok()?
        .keep();
    let copy = tmp.join("pg");
    let ok = Command::new("cp")
        .arg("-a")
        .arg(&cached)
        .arg(&copy)
        .status()
        .is_ok_and(|s| s.success());
    let _ = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&tmp)
        .status();
    let _ = Command::new("chmod").arg("a+rx").arg(&root).status();
    if ok && std::fs::rename(&copy, &readable).is_err() {
        // Another test published it first.
    }
    let _ = std::fs::remove_dir_all(&tmp);
    readable
        .join("bin/postgres")
        .is_file()
        .then(|| readable.join("bin"))
}
