//! The migration's state persists in the control schema on the target, and
//! only one pgshift can drive a migration at a time.

mod common;
use common::*;
use pgshift::migration::{ControlError, DatabasePhase, Migration, State, Substate};

const MIGRATION: &str = "[migration]\nname = \"state-test\"\ndatabases = [\"app\", \"billing\"]\n";

#[tokio::test]
async fn state_survives_restart_and_lock_is_exclusive() {
    let source = Cluster::start();
    let target = Cluster::start();
    let config = config_for(&source, &target, MIGRATION);
    let cfg = config.migration().unwrap().clone();

    let ctx = pgshift::Context::new(config.clone());
    let m = Migration::open(&ctx, &cfg).await.unwrap();
    assert_eq!(
        m.state(),
        (State::InProgress, Substate::PerformingPrerequisiteSteps)
    );
    m.transition(State::InProgress, Substate::MigratingData, None)
        .await
        .unwrap();
    m.set_database("app", |d| {
        d.phase = DatabasePhase::Copied;
        d.consistent_point = Some("0/16B3748".into());
    })
    .await
    .unwrap();

    // A second pgshift on the same migration is refused while the first runs.
    let ctx2 = pgshift::Context::new(config.clone());
    match Migration::open(&ctx2, &cfg).await {
        Err(ControlError::Locked(name)) => assert_eq!(name, "state-test"),
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("expected Locked, got a second migration"),
    }

    // The status document has the spelled-out state and per-database rows.
    let doc = ctx.status.render();
    assert_eq!(doc["state"], "InProgress");
    assert_eq!(doc["substate"], "MigratingData");
    assert_eq!(doc["databases"]["app"]["phase"], "copied");
    assert_eq!(doc["databases"]["billing"]["phase"], "pending");
    let metrics = pgshift::telemetry::metrics::render(&ctx.registry).unwrap();
    assert!(
        metrics
            .contains("pgshift_migration_state{state=\"InProgress\",substate=\"MigratingData\"} 1"),
        "{metrics}"
    );

    // "Restart": the first process goes away, a new one sees the persisted state.
    drop(m);
    drop(ctx);
    let ctx3 = pgshift::Context::new(config);
    let m3 = {
        let mut tries = 0;
        loop {
            match Migration::open(&ctx3, &cfg).await {
                Ok(m) => break m,
                // The old connection's lock is released when its task notices the drop.
                Err(ControlError::Locked(_)) if tries < 1200 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(m3.state(), (State::InProgress, Substate::MigratingData));
    let app = m3.database_row("app").unwrap();
    assert_eq!(app.phase, DatabasePhase::Copied);
    assert_eq!(app.consistent_point.as_deref(), Some("0/16B3748"));
    let events = target.psql(
        "postgres",
        "SELECT count(*) FROM pgshift.event WHERE migration = 'state-test'",
    );
    assert_eq!(events, "1");
}
