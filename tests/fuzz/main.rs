//! Fuzzing on stable Rust: every parser of bytes from the network or a file
//! (`pgshift::fuzzing`) gets structured inputs, damaged ones and noise from a
//! seeded generator; no input may panic, hang, or make an allocation larger
//! than its target's cap.
//!
//! - `cargo test --test fuzz`: a few thousand inputs per target (the suite).
//! - `bench/fuzz.sh`: a million per target in release mode, with peak RSS.
//!
//! Reproduce a failure with the seed it prints (`PGSHIFT_FUZZ_SEED=0x…`),
//! or one input with `PGSHIFT_FUZZ_TARGET=name PGSHIFT_FUZZ_INPUT=<hex>
//! cargo test --test fuzz one_input -- --ignored --nocapture`.

mod inputs;
mod runner;

use runner::{Summary, Target};

#[global_allocator]
static ALLOC: runner::CountingAlloc = runner::CountingAlloc;

/// Allocation caps. The drivers frame messages with a limit of
/// `pgshift::fuzzing::MAX_MESSAGE` (64 KiB), as the proxy does with its
/// configured limit: a buffer up to that size for a declared length is the
/// design; anything beyond must be paid for by input bytes.
fn wire_cap(len: usize) -> usize {
    4 * pgshift::fuzzing::MAX_MESSAGE + 64 * len
}

/// Decoders that only ever slice or copy their input.
fn copy_cap(len: usize) -> usize {
    64 * 1024 + 64 * len
}

/// TOML and the config's checks build strings and tables from the text.
fn config_cap(len: usize) -> usize {
    256 * 1024 + 64 * len
}

static TARGETS: [Target; 7] = [
    Target {
        name: "frontend",
        generate: inputs::frontend,
        run: pgshift::fuzzing::frontend,
        alloc_cap: wire_cap,
    },
    Target {
        name: "backend",
        generate: inputs::backend,
        run: pgshift::fuzzing::backend,
        alloc_cap: wire_cap,
    },
    Target {
        name: "copy_data",
        generate: inputs::copy_data,
        run: pgshift::fuzzing::copy_data,
        alloc_cap: copy_cap,
    },
    Target {
        name: "pgoutput",
        generate: inputs::pgoutput,
        run: pgshift::fuzzing::pgoutput,
        alloc_cap: copy_cap,
    },
    Target {
        name: "sqltext",
        generate: inputs::sqltext,
        run: pgshift::fuzzing::sqltext,
        alloc_cap: copy_cap,
    },
    Target {
        name: "ddl",
        generate: inputs::ddl,
        run: pgshift::fuzzing::ddl,
        alloc_cap: copy_cap,
    },
    Target {
        name: "config",
        generate: inputs::config,
        run: pgshift::fuzzing::config,
        alloc_cap: config_cap,
    },
];

fn target(name: &str) -> &'static Target {
    TARGETS
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

/// The seed the suite uses unless `PGSHIFT_FUZZ_SEED` says otherwise: fixed,
/// so the suite is the same on every run.
const SUITE_SEED: u64 = 0x7067_7368_6966_7431;

fn inputs(default: u64) -> u64 {
    std::env::var("PGSHIFT_FUZZ_INPUTS")
        .ok()
        .and_then(|s| s.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn report(t: &Target, seed: u64, s: &Summary) {
    eprintln!(
        "fuzz {}: seed {seed:#x}: {} inputs, {} panics, {} hangs, {} over-allocations; slowest input {:?} (number {}), largest allocation {} bytes, {:.1?}",
        t.name,
        s.inputs,
        s.panics,
        s.hangs,
        s.over_alloc,
        s.max_input_time,
        s.slowest,
        s.max_alloc,
        s.elapsed
    );
    for f in &s.failures {
        eprintln!("  {f}");
    }
}

fn suite(name: &str) {
    let t = target(name);
    let seed = runner::seed(SUITE_SEED);
    let s = runner::run(t, seed, inputs(3000));
    report(t, seed, &s);
    assert!(
        s.ok(),
        "fuzz {name} failed (seed {seed:#x}); first failures:\n{}",
        s.failures.join("\n")
    );
}

#[test]
fn frontend() {
    suite("frontend");
}

#[test]
fn backend() {
    suite("backend");
}

#[test]
fn copy_data() {
    suite("copy_data");
}

#[test]
fn pgoutput() {
    suite("pgoutput");
}

#[test]
fn sqltext() {
    suite("sqltext");
}

#[test]
fn ddl() {
    suite("ddl");
}

#[test]
fn config() {
    suite("config");
}

/// Inputs that once failed, by target (hex): each must now pass.
const REGRESSIONS: &[(&str, &str)] = &[
    // A duration beyond what `Duration` holds panicked in parse_duration.
    (
        "config",
        "78203d2022393939393939393939393939393939393939393964220a",
    ),
    // A DataRow claiming 32767 columns allocated 786 kB for its 7 bytes.
    ("backend", "44000000067fff"),
];

#[test]
fn regressions() {
    for (name, hex) in REGRESSIONS {
        if let Err(e) = runner::run_one(target(name), &runner::unhex(hex)) {
            panic!("fuzz {name} regression {hex}: {e}");
        }
    }
}

/// `bench/fuzz.sh`: one target (`PGSHIFT_FUZZ_TARGET`), `PGSHIFT_FUZZ_INPUTS`
/// inputs (default a million), from `PGSHIFT_FUZZ_SEED` (default random, and
/// printed). Prints one summary line with the process's peak RSS.
#[test]
#[ignore = "long: run by bench/fuzz.sh"]
fn bench() {
    let Ok(name) = std::env::var("PGSHIFT_FUZZ_TARGET") else {
        eprintln!("fuzz bench: set PGSHIFT_FUZZ_TARGET (bench/fuzz.sh does); nothing run");
        return;
    };
    let t = target(&name);
    let seed = runner::seed(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    let s = runner::run(t, seed, inputs(1_000_000));
    report(t, seed, &s);
    println!(
        "RESULT {} {} {} {} {} {} {} {} {:.1} {seed:#x}",
        t.name,
        s.inputs,
        s.panics,
        s.hangs,
        s.over_alloc,
        s.max_input_time.as_micros(),
        s.max_alloc / 1024,
        runner::peak_rss_kib() / 1024,
        s.elapsed.as_secs_f64()
    );
    assert!(s.ok(), "fuzz {name} failed (seed {seed:#x})");
}

/// Runs one input given as hex (`PGSHIFT_FUZZ_INPUT`) on `PGSHIFT_FUZZ_TARGET`.
#[test]
#[ignore = "reproduces one input"]
fn one_input() {
    let (Ok(name), Ok(hex)) = (
        std::env::var("PGSHIFT_FUZZ_TARGET"),
        std::env::var("PGSHIFT_FUZZ_INPUT"),
    ) else {
        eprintln!("fuzz one_input: set PGSHIFT_FUZZ_TARGET and PGSHIFT_FUZZ_INPUT; nothing run");
        return;
    };
    runner::run_one(target(&name), &runner::unhex(hex.trim())).unwrap();
}
