//! A fleet of sidecars: every `pgshift run` with the same migration name and
//! target control database is a member of one fleet, coordinated through
//! the control schema on the target (no other service).
//!
//! - **Leadership** is the migration's session-level advisory lock, held by
//!   the leader's control-store connection (`migration::control`):
//!   PostgreSQL releases it when that session ends, also when the leader is
//!   killed. Only the leader runs validation, copy, streaming and the
//!   cutover (`migration::runner`); a member that loses the lock's
//!   connection stops its runner at its next heartbeat.
//! - **Never two appliers.** Besides the lock, PostgreSQL itself refuses a
//!   second applier: a logical slot streams to one walsender at a time, and
//!   a replication origin is bound to one session at a time
//!   (`pg_replication_origin_session_setup` fails with 55006 while another
//!   holds it). A new leader streams only once the old leader's walsender
//!   and apply sessions are gone, from the origin's committed position:
//!   exactly once.
//! - **Membership**: each member's row (`store.rs`) with a heartbeat and its
//!   control session's pid; a member is alive while both are current.
//! - **One cutover**: the leader's runner posts each step (`lead.rs`);
//!   every member answers (`follow.rs`). The point of no return is the
//!   leader's committed "switched"; a member holding its gate moves to
//!   the target only after reading it, and reopens on the source only after
//!   reading that the attempt ended without it.

mod follow;
mod lead;
mod relay;
mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use prometheus::{IntGauge, IntGaugeVec};
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::config::FleetRole;
use crate::context::Context;
use crate::migration::runner::{LeaderParts, LeaderTerm};
use crate::proxy::ProxyHandle;
use crate::proxy::route::Route;
pub use store::MemberRow;
use store::{Heartbeat, Store};

pub(crate) use lead::Round;

/// The fleet's metrics (every member exports what it sees).
struct FleetMetrics {
    members: IntGauge,
    leader: IntGaugeVec,
    pause: prometheus::Gauge,
}

impl FleetMetrics {
    fn new(reg: &prometheus::Registry) -> FleetMetrics {
        use crate::telemetry::metrics as m;
        FleetMetrics {
            members: m::int_gauge(
                reg,
                "pgshift_fleet_members",
                "Live members of this migration's fleet (pgshift processes), as this member sees them",
            ),
            leader: m::int_gauge_vec(
                reg,
                "pgshift_fleet_leader",
                "1 for the member that leads the fleet, 0 for the others, by member",
                &["member"],
            ),
            pause: m::gauge(
                reg,
                "pgshift_fleet_member_pause_seconds",
                "This member's write pause in the last fleet cutover (its gate closed to opened), in seconds",
            ),
        }
    }
}

/// This member's gate is closed for a cutover attempt until it reads the
/// attempt's decision.
#[derive(Clone, Debug)]
pub(crate) struct Hold {
    attempt: String,
    since: Instant,
    /// Last time the decision could be read (or the hold began).
    contact: Instant,
    /// The decision could not be read for `decision_timeout`: its sessions
    /// were ended with an error.
    ended: bool,
}

/// A member of the fleet: shared by its tasks, the runner (while it
/// leads) and the admin API.
pub struct Fleet {
    ctx: Arc<Context>,
    proxy: ProxyHandle,
    id: String,
    role: FleetRole,
    migration: String,
    started_at: String,
    /// The member's control connection (None while it is lost).
    conn: ArcSwapOption<Client>,
    /// Bumped at every notification on the fleet's channel.
    wake: watch::Sender<u64>,
    leading: AtomicBool,
    term: Mutex<Option<LeaderTerm>>,
    parts: LeaderParts,
    /// The fleet as last read (status, metrics, the leader's room check).
    members: std::sync::Mutex<Vec<MemberRow>>,
    /// The migration's row as last read, for /status while following.
    row: std::sync::Mutex<Value>,
    hold: std::sync::Mutex<Option<Hold>>,
    /// The last attempt whose decision this member acted on: a step of it
    /// arriving late (after the notification of its outcome) is history.
    decided: std::sync::Mutex<Option<String>>,
    /// The last step this member acted on: (attempt, seq).
    seen: std::sync::Mutex<Option<(String, i32)>>,
    /// The leader's current cutover round.
    round: std::sync::Mutex<Option<Arc<Round>>>,
    posts: mpsc::UnboundedSender<Post>,
    metrics: FleetMetrics,
    /// The last fleet cutover as this member lived it (status).
    last: std::sync::Mutex<Value>,
    /// Relayed requests this leader has taken on.
    serving: std::sync::Mutex<std::collections::HashSet<i64>>,
}

/// A cutover step for the poster task to write, in order; `done` hears
/// when it is committed (and so notified).
struct Post {
    attempt: String,
    seq: i32,
    step: String,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The fleet member's tasks.
pub struct FleetTasks {
    /// Ends the member's life (heartbeats) and makes it leave the fleet.
    leave: tokio_util::sync::CancellationToken,
    member: JoinHandle<()>,
    /// Step poster and command relay: they serve as long as the member.
    helpers: Vec<JoinHandle<()>>,
}

impl FleetTasks {
    /// Leaves the fleet (call after the proxy has drained: a draining
    /// member is still a member, and a cutover meanwhile counts on it).
    pub async fn join(self) {
        self.leave.cancel();
        let _ = self.member.await;
        for h in self.helpers {
            h.abort();
        }
    }
}

/// This member's id: configured, or the host name (a pod's name) and the
/// proxy port, so members on one host differ.
fn member_id(ctx: &Context) -> String {
    if let Some(id) = &ctx.config.fleet().member_id {
        return id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pgshift".into());
    format!("{host}:{}", ctx.config.proxy_listen.port())
}

impl Fleet {
    /// Joins the fleet: connects to the control database (waiting for it
    /// like a single pgshift always did), registers, routes to the target
    /// if the migration has switched (before the proxy serves), and tries
    /// to lead at once (a fleet of one leads from the start, as before).
    pub async fn start(
        ctx: &Arc<Context>,
        proxy: &ProxyHandle,
    ) -> Result<Option<(Arc<Fleet>, FleetTasks)>, crate::migration::ControlError> {
        let Some(cfg) = ctx.config.migration() else {
            return Ok(None);
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (posts, posts_rx) = mpsc::unbounded_channel();
        let fleet = Arc::new(Fleet {
            ctx: ctx.clone(),
            proxy: proxy.clone(),
            id: member_id(ctx),
            role: ctx.config.fleet().role,
            migration: cfg.name.clone(),
            started_at: chrono::Utc::now().to_rfc3339(),
            conn: ArcSwapOption::empty(),
            wake: watch::Sender::new(0),
            leading: AtomicBool::new(false),
            term: Mutex::new(None),
            parts: LeaderParts::new(ctx, cfg),
            members: std::sync::Mutex::new(Vec::new()),
            row: std::sync::Mutex::new(Value::Null),
            hold: std::sync::Mutex::new(None),
            decided: std::sync::Mutex::new(None),
            seen: std::sync::Mutex::new(None),
            round: std::sync::Mutex::new(None),
            posts,
            metrics: FleetMetrics::new(&ctx.registry),
            last: std::sync::Mutex::new(Value::Null),
            serving: std::sync::Mutex::new(Default::default()),
        });
        fleet.connect_first(&tx).await?;
        fleet.check_id_free().await?;
        let f = fleet.clone();
        ctx.status.register("fleet", Arc::new(move || f.report()));
        let f = fleet.clone();
        ctx.status
            .register_top("migration", Arc::new(move || f.follower_view()));
        fleet.beat().await;
        fleet.read_migration().await;
        if fleet.switched() {
            proxy
                .router()
                .swap(Route::from_endpoint("target", &ctx.config.target));
            tracing::info!("migration already switched: every session goes to the target");
        }
        fleet.note_current_step().await;
        if fleet.role.may_lead() {
            fleet.try_lead().await;
        }
        let (cmd_tx, cmd_rx) = crate::commands::channel();
        let _ = ctx.commands.set(cmd_tx);
        let leave = tokio_util::sync::CancellationToken::new();
        let tasks = FleetTasks {
            leave: leave.clone(),
            member: tokio::spawn(fleet.clone().run(tx, rx, leave)),
            helpers: vec![
                tokio::spawn(fleet.clone().poster(posts_rx)),
                tokio::spawn(fleet.clone().commands(cmd_rx)),
            ],
        };
        Ok(Some((fleet, tasks)))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    fn store<'a>(&'a self, client: &'a Client) -> Store<'a> {
        Store {
            client,
            migration: &self.migration,
            member: &self.id,
        }
    }

    fn client(&self) -> Option<Arc<Client>> {
        self.conn.load_full().filter(|c| !c.is_closed())
    }

    fn cfg(&self) -> &crate::config::FleetConfig {
        self.ctx.config.fleet()
    }

    /// The first connection: waited for as long as a single pgshift waits
    /// for its control schema; then the start fails.
    async fn connect_first(
        &self,
        tx: &mpsc::UnboundedSender<(String, String)>,
    ) -> Result<(), crate::migration::ControlError> {
        let deadline = Instant::now() + crate::migration::pipeline::CONTROL_WAIT;
        loop {
            match self.connect(tx).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!("waiting for the target's control schema: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Refuses to join under an id a live member uses. A member restarted
    /// after a crash may find its old session still on the target for a
    /// moment: that one goes within `member_timeout`.
    async fn check_id_free(&self) -> Result<(), crate::migration::ControlError> {
        let deadline = Instant::now() + self.cfg().member_timeout.0;
        loop {
            let Some(client) = self.client() else {
                return Ok(());
            };
            let in_use = self
                .store(&client)
                .id_in_use(self.timeout_ms())
                .await
                .map_err(|source| crate::migration::ControlError::Sql {
                    addr: self.ctx.config.target.display(),
                    source,
                })?;
            if !in_use {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(crate::migration::ControlError::MemberInUse(self.id.clone()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn connect(
        &self,
        tx: &mpsc::UnboundedSender<(String, String)>,
    ) -> Result<(), crate::migration::ControlError> {
        let target = &self.ctx.config.target;
        let client =
            crate::db::connect_listening(target, "target control database (fleet)", tx.clone())
                .await?;
        let sql = |source| crate::migration::ControlError::Sql {
            addr: target.display(),
            source,
        };
        crate::migration::control::ensure_schema(&client)
            .await
            .map_err(sql)?;
        // Heartbeats, steps and answers are messages, not state: a target
        // crash ends the cutover anyway, and the one durable decision
        // ("switched") is committed synchronously on the leader's control
        // connection. Not waiting for a WAL flush at each hop keeps the
        // fleet's pause close to one member's.
        client
            .batch_execute(&format!(
                "SET synchronous_commit = off; LISTEN {}",
                store::CHANNEL
            ))
            .await
            .map_err(sql)?;
        self.conn.store(Some(Arc::new(client)));
        Ok(())
    }

    /// The member's life: heartbeat, following the leader's steps, taking
    /// the lead when no one holds it, relaying commands; until `leave`
    /// (after the proxy drained at shutdown), when it leaves the fleet. A
    /// member shutting down no longer takes the lead.
    async fn run(
        self: Arc<Self>,
        tx: mpsc::UnboundedSender<(String, String)>,
        rx: mpsc::UnboundedReceiver<(String, String)>,
        leave: tokio_util::sync::CancellationToken,
    ) {
        // Notifications are handled as they come, also while a heartbeat's
        // reads are on their way: a step must not wait for a tick.
        let notes = tokio::spawn(self.clone().notes(rx));
        let mut tick = tokio::time::interval(self.cfg().heartbeat_interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = leave.cancelled() => break,
                _ = tick.tick() => self.tick(&tx).await,
            }
        }
        notes.abort();
        self.leave().await;
    }

    /// One heartbeat: reconnect if needed, write the heartbeat, read the
    /// fleet and the migration, act on what changed.
    async fn tick(self: &Arc<Self>, tx: &mpsc::UnboundedSender<(String, String)>) {
        if self.client().is_none() {
            match self.connect(tx).await {
                Ok(()) => tracing::info!("fleet: reconnected to the control database"),
                Err(e) => tracing::debug!("fleet: control database unreachable: {e}"),
            }
        }
        self.step_down_if_lost().await;
        self.beat().await;
        self.read_members().await;
        self.read_migration().await;
        self.react().await;
        if self.role.may_lead()
            && !self.is_leader()
            && !self.ctx.shutdown.is_cancelled()
            && !self.live_leader_elsewhere()
        {
            self.try_lead().await;
        }
    }

    async fn notes(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<(String, String)>) {
        while let Some((_, payload)) = rx.recv().await {
            let Some(note) = store::Note::parse(&payload, &self.migration) else {
                continue;
            };
            self.wake.send_modify(|v| *v += 1);
            self.on_note(note).await;
        }
    }

    /// A notification: only what concerns this member's role is acted on
    /// (answers and relayed commands wake the leader's waits through
    /// `wake`; followers ignore each other's answers).
    async fn on_note(self: &Arc<Self>, note: store::Note) {
        match note {
            store::Note::Step(step) if !self.is_leader() => self.follow_step(step).await,
            store::Note::Attempt if !self.is_leader() => self.check_hold().await,
            store::Note::Switched if !self.is_leader() => self.decided_switched().await,
            store::Note::Request if self.is_leader() => self.serve_requests().await,
            _ => {}
        }
    }

    /// What a notification (or a tick) may have changed: the leader's step,
    /// the decision a held gate waits for, requests for the leader.
    async fn react(self: &Arc<Self>) {
        if self.is_leader() {
            self.serve_requests().await;
        } else {
            self.follow().await;
        }
        self.check_hold().await;
        self.follow_switch().await;
    }

    async fn beat(&self) {
        let Some(client) = self.client() else { return };
        let gate = self.proxy.gate();
        let sessions = i32::try_from(self.proxy.sessions().len()).unwrap_or(i32::MAX);
        let in_tx = i32::try_from(gate.sessions_in_transaction()).unwrap_or(i32::MAX);
        let proxy_addr = self
            .role
            .serves_proxy()
            .then(|| self.ctx.config.proxy_listen.to_string());
        let admin_addr = self.ctx.config.admin_listen.to_string();
        let route = self.proxy.router().current().name.clone();
        let h = Heartbeat {
            role: self.role.as_str(),
            leader: self.is_leader(),
            proxy_addr: proxy_addr.as_deref(),
            admin_addr: Some(&admin_addr),
            started_at: &self.started_at,
            sessions,
            in_transaction: in_tx,
            route: &route,
            paused: gate.is_closed(),
        };
        if let Err(e) = self.store(&client).beat(&h).await {
            tracing::warn!("fleet: heartbeat failed: {}", crate::db::describe(&e));
        }
    }

    fn timeout_ms(&self) -> i64 {
        i64::try_from(self.cfg().member_timeout.0.as_millis()).unwrap_or(i64::MAX)
    }

    async fn read_members(&self) {
        let Some(client) = self.client() else { return };
        match self.store(&client).members(self.timeout_ms()).await {
            Ok(rows) => {
                let live = rows.iter().filter(|m| m.alive).count();
                self.metrics.members.set(live as i64);
                self.metrics.leader.reset();
                for m in &rows {
                    self.metrics
                        .leader
                        .with_label_values(&[&m.id])
                        .set(i64::from(m.leader && m.alive));
                }
                *self.members.lock().unwrap_or_else(|e| e.into_inner()) = rows;
            }
            Err(e) => tracing::debug!("fleet: cannot read members: {}", crate::db::describe(&e)),
        }
    }

    /// The members as last read.
    pub fn members(&self) -> Vec<MemberRow> {
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn live_leader_elsewhere(&self) -> bool {
        self.members()
            .iter()
            .any(|m| m.alive && m.leader && m.id != self.id)
    }

    async fn read_migration(&self) {
        let Some(client) = self.client() else { return };
        if let Ok(Some((state, substate, reason, switched))) =
            self.store(&client).migration_row().await
        {
            *self.row.lock().unwrap_or_else(|e| e.into_inner()) = json!({
                "migration": self.migration,
                "state": state,
                "substate": substate,
                "reason": reason,
                "switched": switched,
            });
        }
        // The leader's last cutover, for `/status` and `cutover --wait` here.
        if !self.is_leader()
            && let Ok(Some(doc)) = self.store(&client).last_attempt().await
            && let Ok(r) = serde_json::from_value(doc)
        {
            self.parts.last_cutover().set(r);
        }
    }

    fn switched(&self) -> bool {
        self.row.lock().unwrap_or_else(|e| e.into_inner())["switched"] == json!(true)
    }

    /// /status's top level while another member leads: the migration as
    /// persisted by the leader.
    fn follower_view(&self) -> Value {
        let mut v = self.row.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if v.is_null() {
            v = json!({"migration": self.migration});
        }
        v
    }

    /// `/status` → `fleet`.
    fn report(&self) -> Value {
        let hold = self
            .hold
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map(|h| {
                json!({"attempt": h.attempt, "seconds": h.since.elapsed().as_secs_f64(),
                       "sessions_ended": h.ended})
            });
        json!({
            "member": self.id,
            "role": self.role.as_str(),
            "leader": self.is_leader(),
            "connected": self.client().is_some(),
            "holding": hold,
            "members": self.members(),
            "last_cutover": self.last.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        })
    }

    /// SIGTERM: the runner stops with the context; the member leaves.
    async fn leave(&self) {
        if let Some(term) = self.term.lock().await.take() {
            term.stop().await;
        }
        if let Some(client) = self.client() {
            match self.store(&client).deregister().await {
                Ok(()) => tracing::info!(member = %self.id, "left the fleet"),
                Err(e) => tracing::warn!("fleet: cannot deregister: {}", crate::db::describe(&e)),
            }
        }
    }

    /// Takes the lead if the migration's lock is free: opens the migration
    /// (its control store takes the lock) and starts the runner.
    async fn try_lead(self: &Arc<Self>) {
        let Some(cfg) = self.ctx.config.migration().cloned() else {
            return;
        };
        let mut term = self.term.lock().await;
        if term.is_some() {
            return;
        }
        match crate::migration::Migration::open_with(&self.ctx, &cfg, self.parts.state_metric())
            .await
        {
            Ok(m) => {
                tracing::info!(member = %self.id, "this member leads the fleet");
                self.leading.store(true, Ordering::SeqCst);
                *term = Some(LeaderTerm::start(
                    &self.ctx,
                    &self.proxy,
                    &self.parts,
                    self,
                    m,
                ));
                drop(term);
                self.beat().await;
            }
            Err(crate::migration::ControlError::Locked(_)) => {
                tracing::debug!("fleet: another member holds the migration's lock");
            }
            Err(e) => tracing::warn!("fleet: cannot take the lead: {e}"),
        }
    }

    /// The leader lost its control store's connection, and with it the
    /// lock: it stops its runner (streams, apply) before another member
    /// can stream — which PostgreSQL would refuse anyway while this
    /// member's walsender or origin session lives.
    async fn step_down_if_lost(self: &Arc<Self>) {
        let mut term = self.term.lock().await;
        let lost = term.as_ref().is_some_and(LeaderTerm::lost);
        if !lost {
            return;
        }
        tracing::error!(member = %self.id, "lost the migration's lock (control connection ended): this member stops leading");
        if let Some(t) = term.take() {
            t.stop().await;
        }
        self.leading.store(false, Ordering::SeqCst);
        let f = self.clone();
        self.ctx
            .status
            .register_top("migration", Arc::new(move || f.follower_view()));
    }

    /// Posts steps in the order the leader's runner asked for them.
    async fn poster(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Post>) {
        while let Some(Post {
            attempt,
            seq,
            step,
            done,
        }) = rx.recv().await
        {
            let mut tries = 0;
            loop {
                tries += 1;
                let r = match self.client() {
                    Some(c) => self
                        .store(&c)
                        .post_step(&attempt, seq, &step)
                        .await
                        .map_err(|e| crate::db::describe(&e)),
                    None => Err("no connection to the control database".into()),
                };
                match r {
                    Ok(()) => {
                        if let Some(done) = done {
                            let _ = done.send(());
                        }
                        break;
                    }
                    Err(e) if tries < 20 => {
                        tracing::warn!("fleet: cannot post cutover step {step}: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        tracing::error!("fleet: cutover step {step} not posted: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// Waits for a notification, `poll` or `deadline`, whichever is first.
    async fn wait_wake(&self, rx: &mut watch::Receiver<u64>, poll: Duration, deadline: Instant) {
        let until = deadline.min(Instant::now() + poll);
        let _ = tokio::time::timeout_at(until.into(), rx.changed()).await;
    }

    /// The proxy's sessions' source backends (the fence spares them).
    fn source_pids(&self) -> Vec<i32> {
        self.proxy.source_backend_pids()
    }

    fn target_route(&self) -> Route {
        Route::from_endpoint("target", &self.ctx.config.target)
    }

    /// How long moving every session may take (as the leader's switch).
    fn move_timeout(&self) -> Duration {
        self.ctx.config.proxy().server_connect_timeout.0 * 2 + Duration::from_secs(1)
    }
}
