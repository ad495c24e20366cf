//! The leader's side of a fleet cutover, used by the runner's
//! `CutoverHost`: the members taking part, the steps posted to them, and
//! their answers. The leader's own proxy is handled by the runner itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Fleet;

/// How often the leader reads who is alive while it waits for answers.
const POLL: Duration = Duration::from_millis(100);
/// How often the answers are read while the leader waits for them: the
/// drain's and the switch's are inside (or right after) the pause, so
/// every 2 ms at first; a wait that goes on (a member in a long
/// transaction, or stopped) reads every 20 ms.
fn answer_poll(step: &str, waited: Duration) -> Duration {
    match step {
        "drained" | "switched" if waited < Duration::from_millis(250) => Duration::from_millis(2),
        _ => Duration::from_millis(20),
    }
}
/// How long after the switch the `switch` step is posted at the latest.
const SWITCH_STEP_AFTER: Duration = Duration::from_millis(50);

/// One cutover attempt across the fleet.
pub(crate) struct Round {
    pub attempt: String,
    seq: AtomicI32,
    /// Live members other than the leader when the attempt began.
    participants: Vec<String>,
    /// Source backends of each member's sessions, from its latest answer.
    pids: std::sync::Mutex<BTreeMap<String, Vec<i32>>>,
    /// Members that answered `drained`.
    drained: std::sync::Mutex<BTreeSet<String>>,
    /// Members left out because they are gone (heartbeat expired or
    /// control session ended).
    excluded: std::sync::Mutex<BTreeSet<String>>,
}

/// What the members did at the switch.
#[derive(Debug, Default)]
pub(crate) struct FleetSwitch {
    pub moved: u64,
    pub dropped: u64,
    /// Members that did not confirm the switch in time.
    pub late: Vec<String>,
    /// Each confirming member's pause (gate closed → opened), seconds.
    pub pauses: BTreeMap<String, f64>,
}

impl Fleet {
    /// A cutover attempt begins: the live members take part.
    pub(crate) async fn begin_round(&self, attempt: &str) -> Arc<Round> {
        self.read_members().await;
        let participants: Vec<String> = self
            .members()
            .into_iter()
            .filter(|m| m.alive && m.id != self.id)
            .map(|m| m.id)
            .collect();
        let round = Arc::new(Round {
            attempt: attempt.to_string(),
            seq: AtomicI32::new(0),
            participants,
            pids: Default::default(),
            drained: Default::default(),
            excluded: Default::default(),
        });
        *self.round.lock().unwrap_or_else(|e| e.into_inner()) = Some(round.clone());
        round
    }

    pub(crate) fn round(&self) -> Option<Arc<Round>> {
        self.round.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Posts the round's next step (in order, without waiting).
    pub(crate) fn post(&self, step: &str) {
        self.send_post(step, None);
    }

    /// Posts the round's next step and waits, at most `max`, until it is
    /// committed: the members are being told. Returns at once when no
    /// other member takes part.
    pub(crate) async fn post_and_wait(&self, step: &str, max: Duration) {
        if self.participants() == 0 {
            self.post(step);
            return;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_post(step, Some(tx));
        let _ = tokio::time::timeout(max, rx).await;
    }

    fn send_post(&self, step: &str, done: Option<tokio::sync::oneshot::Sender<()>>) {
        let Some(r) = self.round() else { return };
        let seq = r.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.posts.send(super::Post {
            attempt: r.attempt.clone(),
            seq,
            step: step.to_string(),
            done,
        });
    }

    /// Members that take part.
    pub(crate) fn participants(&self) -> usize {
        self.round().map_or(0, |r| r.participants.len())
    }

    /// Other live members that run a proxy (a rollback does not take
    /// members along yet).
    pub(crate) fn other_proxies(&self) -> usize {
        self.members()
            .iter()
            .filter(|m| m.alive && m.id != self.id && m.role != "replication")
            .count()
    }

    /// Sessions on the other live members (for the target's room).
    pub(crate) fn remote_sessions(&self) -> i32 {
        self.members()
            .iter()
            .filter(|m| m.alive && m.id != self.id)
            .map(|m| m.sessions)
            .sum()
    }

    /// Waits until every participant answered `step` or is gone, at most
    /// `timeout`; returns the answers (also of members that joined), the
    /// participants that did neither, and those gone without answering.
    async fn answers(
        &self,
        r: &Round,
        step: &str,
        timeout: Duration,
    ) -> (BTreeMap<String, Value>, Vec<String>, Vec<String>) {
        let started = Instant::now();
        let deadline = started + timeout;
        // Who is alive (and the answers) is read at the start and at every
        // POLL; in between only the answers, every few ms (answers are not
        // notified, see `store`).
        let mut rows = Vec::new();
        let mut read_at: Option<Instant> = None;
        let mut answers: BTreeMap<String, Value> = BTreeMap::new();
        loop {
            if read_at.is_none_or(|t| t.elapsed() >= POLL) {
                rows = match self.client() {
                    Some(c) => self
                        .store(&c)
                        .answers(&r.attempt, step, self.timeout_ms())
                        .await
                        .unwrap_or_default(),
                    None => Vec::new(),
                };
                read_at = Some(Instant::now());
                answers.extend(
                    rows.iter()
                        .filter_map(|(m, _, a)| a.clone().map(|a| (m.clone(), a))),
                );
            } else if let Some(c) = self.client()
                && let Ok(acks) = self.store(&c).acks(&r.attempt, step).await
            {
                answers.extend(acks);
            }
            let gone = |id: &str| !rows.iter().any(|(m, alive, _)| m == id && *alive);
            let (mut missing, mut departed) = (Vec::new(), Vec::new());
            for p in &r.participants {
                if answers.contains_key(p) {
                    continue;
                }
                if gone(p) {
                    departed.push(p.clone());
                } else {
                    missing.push(p.clone());
                }
            }
            {
                let mut pids = r.pids.lock().unwrap_or_else(|e| e.into_inner());
                for (m, a) in &answers {
                    if let Some(list) = a.get("pids").and_then(Value::as_array) {
                        pids.insert(
                            m.clone(),
                            list.iter()
                                .filter_map(|p| p.as_i64())
                                .filter_map(|p| i32::try_from(p).ok())
                                .collect(),
                        );
                    }
                }
            }
            if missing.is_empty() || Instant::now() >= deadline {
                return (answers, missing, departed);
            }
            let every = answer_poll(step, started.elapsed());
            tokio::time::sleep_until(deadline.min(Instant::now() + every).into()).await;
        }
    }

    /// Every participant prewarmed (or `timeout` passed): backends ready.
    pub(crate) async fn wait_prewarmed(&self, timeout: Duration) -> usize {
        let Some(r) = self.round() else { return 0 };
        let (answers, missing, _) = self.answers(&r, "prewarm", timeout).await;
        if !missing.is_empty() {
            tracing::warn!(cutover = %r.attempt, "fleet: no prewarm answer from {}", missing.join(", "));
        }
        answers
            .values()
            .filter_map(|a| a["prewarmed"].as_u64())
            .sum::<u64>() as usize
    }

    /// Every participant is drained, or gone (then left out): true; false
    /// when one that is alive has not answered within `timeout`.
    pub(crate) async fn wait_drained(&self, timeout: Duration) -> bool {
        let Some(r) = self.round() else { return true };
        let (answers, missing, departed) = self.answers(&r, "drained", timeout).await;
        r.drained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(answers.keys().cloned());
        // Gone before draining: left out, its backends not spared.
        for p in departed {
            if r.excluded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(p.clone())
            {
                tracing::warn!(cutover = %r.attempt, member = %p, "fleet: member is gone (heartbeat expired or disconnected): left out of the cutover; the fence ends its sessions on the source");
            }
        }
        if !missing.is_empty() {
            tracing::warn!(cutover = %r.attempt, "fleet: not drained in time: {}", missing.join(", "));
        }
        missing.is_empty()
    }

    /// Sessions inside a transaction on participants not drained yet.
    pub(crate) fn remote_in_transaction(&self) -> usize {
        let Some(r) = self.round() else { return 0 };
        let drained = r.drained.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.members()
            .iter()
            .filter(|m| r.participants.contains(&m.id) && !drained.contains(&m.id) && m.alive)
            .map(|m| usize::try_from(m.in_transaction).unwrap_or(0))
            .sum()
    }

    /// Members that have not answered `drained` (names, for the reason).
    pub(crate) fn not_drained(&self) -> Vec<String> {
        let Some(r) = self.round() else {
            return vec![];
        };
        let drained = r.drained.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let excluded = r.excluded.lock().unwrap_or_else(|e| e.into_inner()).clone();
        r.participants
            .iter()
            .filter(|p| !drained.contains(*p) && !excluded.contains(*p))
            .cloned()
            .collect()
    }

    /// The other members' sessions' source backends: the fence spares them.
    pub(crate) fn remote_source_pids(&self) -> Vec<i32> {
        let Some(r) = self.round() else {
            return vec![];
        };
        let excluded = r.excluded.lock().unwrap_or_else(|e| e.into_inner()).clone();
        r.pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(m, _)| !excluded.contains(*m))
            .flat_map(|(_, p)| p.iter().copied())
            .collect()
    }

    /// Source backends of `members` (to end them when they miss the switch).
    pub(crate) fn source_pids_of(&self, members: &[String]) -> Vec<i32> {
        let Some(r) = self.round() else {
            return vec![];
        };
        let pids = r.pids.lock().unwrap_or_else(|e| e.into_inner());
        members
            .iter()
            .filter_map(|m| pids.get(m))
            .flat_map(|p| p.iter().copied())
            .collect()
    }

    /// For the drain phase's report: who was left out.
    pub(crate) fn drain_note(&self) -> Option<String> {
        let r = self.round()?;
        if r.participants.is_empty() {
            return None;
        }
        let excluded = r.excluded.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let total = r.participants.len() + 1;
        Some(if excluded.is_empty() {
            format!("{total} member(s) drained")
        } else {
            format!(
                "{} of {total} member(s) drained; left out (gone): {}",
                total - excluded.len(),
                excluded.into_iter().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// After the switch is committed and posted: the participants still
    /// there confirm their move (at most `timeout`).
    pub(crate) async fn wait_switched(&self, timeout: Duration) -> FleetSwitch {
        let Some(r) = self.round() else {
            return FleetSwitch::default();
        };
        // The decision's own notification moves the members; the `switch`
        // step (a record, and a nudge for a member that missed it) follows
        // once they answered or a moment passed, not competing with their
        // moves for the machine.
        let grace = timeout.min(SWITCH_STEP_AFTER);
        let (mut answers, mut late, mut departed) = self.answers(&r, "switched", grace).await;
        self.post("switch");
        if !late.is_empty() {
            (answers, late, departed) = self
                .answers(&r, "switched", timeout.saturating_sub(grace))
                .await;
        }
        // Gone or silent, a member that drained still has spared backends
        // on the source: both are late.
        late.extend(departed);
        let excluded = r.excluded.lock().unwrap_or_else(|e| e.into_inner()).clone();
        late.retain(|m| !excluded.contains(m));
        let mut out = FleetSwitch {
            late,
            ..FleetSwitch::default()
        };
        for (m, a) in &answers {
            out.moved += a["moved"].as_u64().unwrap_or(0);
            out.dropped += a["dropped"].as_u64().unwrap_or(0);
            if let Some(p) = a["pause_seconds"].as_f64() {
                out.pauses.insert(m.clone(), p);
            }
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = json!({
            "attempt": r.attempt,
            "outcome": "succeeded",
            "members": r.participants.len() + 1,
            "pauses_seconds": out.pauses,
            "late": out.late,
            "excluded": r.excluded.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        });
        out
    }

    /// The round is over.
    pub(crate) fn end_round(&self) {
        *self.round.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// A new leader found attempt `attempt` interrupted: members holding
    /// for it open (their decision is now readable; this tells them now).
    pub(crate) async fn announce_interrupted(&self, attempt: &str) {
        if let Some(c) = self.client() {
            let _ = self.store(&c).post_step(attempt, i32::MAX, "abort").await;
        }
    }
}
