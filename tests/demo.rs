//! The README's first command: `pgshift demo` runs a whole online migration,
//! cutover, verification and rollback under load on throwaway clusters and
//! reports it. Small scale.

mod common;
use common::*;

#[test]
fn demo_migrates_cuts_over_and_reports_with_no_failed_transaction() {
    let out = std::process::Command::new(pgshift_bin())
        .args([
            "demo",
            "--scale",
            "1",
            "--clients",
            "3",
            "--stream-seconds",
            "3",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run pgshift demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for needle in [
        "pgshift demo report",
        "cutover     succeeded",
        "marker",
        "switch",
        " 0 failed",
        "verify      match",
        "rollback    succeeded",
        "clients saw committed are on the source after the rollback",
        "both clusters are stopped and removed",
    ] {
        assert!(
            stdout.contains(needle),
            "report lacks {needle:?}:\n{stdout}"
        );
    }
    // Everything the demo started is gone: its two servers no longer listen.
    let ports: Vec<u16> = stdout
        .lines()
        .find(|l| l.contains("source cluster on"))
        .expect("the demo names its clusters")
        .split("127.0.0.1:")
        .skip(1)
        .filter_map(|p| p.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    assert_eq!(ports.len(), 2, "{stdout}");
    for p in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", p)).is_err(),
            "a demo cluster still listens on port {p}"
        );
    }
}
