//! A member that does not lead follows the leader's cutover steps with its
//! own proxy, and answers each one (`store::ack`):
//!
//! - `prewarm`: a target backend for each of its sessions;
//! - `gate` (and `cancel`, `terminate`): its gate closes — it *holds* for
//!   that attempt — and it answers `drained` once no session of its own is
//!   inside a transaction, with its sessions' source backends (the fence
//!   spares exactly those);
//! - `switch` / `abort`: nothing by themselves. A held gate opens only on
//!   the decision read from the control schema: the migration switched
//!   (move every session to the target, then open), or the attempt ended
//!   without switching (open on the source). A member that cannot read the
//!   decision for `fleet.decision_timeout` ends its sessions with an error
//!   and keeps holding: it never reopens on the source on a guess.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use super::{Fleet, Hold};

/// What a held session's client is told when the decision cannot be read.
const LOST_DECISION: &str = "pgshift: this proxy lost contact with its fleet's control database during a cutover and cannot tell which server is current; reconnect";

impl Fleet {
    /// At start: a step of an attempt still holding clients is joined (this
    /// member holds too); any other step is history.
    pub(super) async fn note_current_step(&self) {
        let Some(c) = self.client() else { return };
        let st = self.store(&c);
        let Ok(Some(step)) = st.step().await else {
            return;
        };
        let running = matches!(
            st.decision(&step.attempt).await,
            Ok(d) if !d.switched && d.outcome.as_deref().is_none_or(|o| o == "running")
        );
        if !(running && matches!(step.step.as_str(), "gate" | "cancel" | "terminate")) {
            *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some((step.attempt, step.seq));
        }
    }

    /// Acts on a step posted since the last one this member acted on (read
    /// at a heartbeat, should its notification have been missed).
    pub(super) async fn follow(self: &Arc<Self>) {
        let Some(c) = self.client() else { return };
        let Ok(Some(step)) = self.store(&c).step().await else {
            return;
        };
        self.follow_step(step).await;
    }

    /// Acts on `step` unless it was acted on already.
    pub(super) async fn follow_step(self: &Arc<Self>, step: super::store::Step) {
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((a, s)) = seen.as_ref()
                && *a == step.attempt
                && *s >= step.seq
            {
                return;
            }
            *seen = Some((step.attempt.clone(), step.seq));
        }
        let attempt = step.attempt;
        tracing::info!(cutover = %attempt, step = %step.step, "fleet: cutover step from the leader");
        match step.step.as_str() {
            "prewarm" => {
                let f = self.clone();
                tokio::spawn(async move { f.prewarm(attempt).await });
            }
            "gate" => self.hold_for(&attempt),
            // The leader posts `switch` only after its "switched" has
            // committed: the step is the decision itself.
            "switch" => {
                self.hold_for(&attempt);
                let h = self.hold.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(h) = h.filter(|h| h.attempt == attempt) {
                    self.switch_over(&h).await;
                }
                return;
            }
            "cancel" => {
                self.hold_for(&attempt);
                let n = self.proxy.cancel_busy_sessions().await;
                tracing::info!(cutover = %attempt, "fleet: canceled {n} running query(ies) for the drain");
            }
            "terminate" => {
                self.hold_for(&attempt);
                let n = self.proxy.terminate_busy_sessions(
                    "terminating connection: pgshift cutover could not wait for this transaction",
                );
                tracing::info!(cutover = %attempt, "fleet: terminated {n} session(s) for the drain");
            }
            "abort" => {
                self.proxy.discard_prewarm();
            }
            other => tracing::warn!("fleet: unknown cutover step {other}"),
        }
        self.check_hold().await;
    }

    async fn prewarm(self: Arc<Self>, attempt: String) {
        let n = self.proxy.prewarm(self.target_route()).await;
        let detail = json!({
            "prewarmed": n,
            "sessions": self.proxy.sessions().len(),
            "pids": self.source_pids(),
        });
        self.ack(&attempt, "prewarm", &detail).await;
    }

    async fn ack(&self, attempt: &str, step: &str, detail: &serde_json::Value) {
        let Some(c) = self.client() else {
            tracing::warn!(cutover = %attempt, "fleet: cannot answer {step}: no connection to the control database");
            return;
        };
        match self.store(&c).ack(attempt, step, detail).await {
            Ok(()) => tracing::debug!(cutover = %attempt, "fleet: answered {step}"),
            Err(e) => {
                tracing::warn!(cutover = %attempt, "fleet: cannot answer {step}: {}", crate::db::describe(&e))
            }
        }
    }

    /// Closes the gate for `attempt` (once) and answers `drained` when
    /// this member's sessions are out of their transactions.
    fn hold_for(self: &Arc<Self>, attempt: &str) {
        if self
            .decided
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            == Some(attempt)
        {
            return;
        }
        {
            let mut hold = self.hold.lock().unwrap_or_else(|e| e.into_inner());
            if hold.as_ref().is_some_and(|h| h.attempt == attempt) {
                return;
            }
            let now = Instant::now();
            *hold = Some(Hold {
                attempt: attempt.to_string(),
                since: now,
                contact: now,
                ended: false,
            });
        }
        self.proxy.gate().close();
        let f = self.clone();
        let attempt = attempt.to_string();
        tokio::spawn(async move {
            loop {
                if !f.holding(&attempt) {
                    return;
                }
                let drained = tokio::time::timeout(
                    std::time::Duration::from_millis(200),
                    f.proxy.gate().drained(),
                )
                .await;
                if drained.is_ok() {
                    break;
                }
            }
            let detail = json!({
                "pids": f.source_pids(),
                "sessions": f.proxy.sessions().len(),
            });
            tracing::debug!(cutover = %attempt, "fleet: drained");
            f.ack(&attempt, "drained", &detail).await;
        });
    }

    fn holding(&self, attempt: &str) -> bool {
        self.hold
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|h| h.attempt == attempt)
    }

    /// A held gate waits for the attempt's decision.
    pub(super) async fn check_hold(self: &Arc<Self>) {
        let Some(h) = self.hold.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return;
        };
        let decision = match self.client() {
            Some(c) => self.store(&c).decision(&h.attempt).await.ok(),
            None => None,
        };
        let Some(d) = decision else {
            self.decision_unreadable(&h);
            return;
        };
        if let Some(held) = self.hold.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            held.contact = Instant::now();
        }
        if d.switched {
            self.switch_over(&h).await;
        } else if let Some(outcome) = d.outcome.filter(|o| o != "running") {
            // Ended without the switch: back to the source, whose fence
            // the leader has lifted (or lifts when it starts again).
            self.release(&h, &outcome);
        }
    }

    fn decision_unreadable(&self, h: &Hold) {
        if h.ended || h.contact.elapsed() < self.cfg().decision_timeout.0 {
            return;
        }
        let n = self.proxy.terminate_all(LOST_DECISION);
        tracing::error!(
            cutover = %h.attempt,
            sessions = n,
            "fleet: the cutover's decision could not be read for {:?}: sessions ended with an error; the gate stays closed until it can be read",
            self.cfg().decision_timeout.0
        );
        if let Some(held) = self.hold.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            held.ended = true;
        }
    }

    /// Ends the hold on `attempt`'s decision; later steps of it change nothing.
    fn take_hold(&self, attempt: &str) -> bool {
        let mut hold = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        if hold.as_ref().is_some_and(|h| h.attempt == attempt) {
            *hold = None;
            *self.decided.lock().unwrap_or_else(|e| e.into_inner()) = Some(attempt.to_string());
            return true;
        }
        false
    }

    fn release(&self, h: &Hold, outcome: &str) {
        if !self.take_hold(&h.attempt) {
            return;
        }
        self.proxy.discard_prewarm();
        self.proxy.gate().open();
        let pause = h.since.elapsed().as_secs_f64();
        self.metrics.pause.set(pause);
        tracing::info!(cutover = %h.attempt, outcome, pause_seconds = format!("{pause:.3}"), "fleet: the cutover ended without the switch; gate opened on the source");
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = json!({
            "attempt": h.attempt, "outcome": outcome, "pause_seconds": pause,
        });
    }

    /// The migration switched: every session moves to the target, then
    /// the gate opens; the leader gets the counts.
    async fn switch_over(&self, h: &Hold) {
        if !self.take_hold(&h.attempt) {
            return;
        }
        let (moved, dropped) = self
            .proxy
            .switch_to(self.target_route(), self.move_timeout())
            .await;
        self.proxy.gate().open();
        let pause = h.since.elapsed().as_secs_f64();
        self.metrics.pause.set(pause);
        tracing::info!(cutover = %h.attempt, moved, dropped, pause_seconds = format!("{pause:.3}"), "fleet: switched to the target");
        let detail = json!({"moved": moved, "dropped": dropped, "pause_seconds": pause});
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = json!({
            "attempt": h.attempt, "outcome": "succeeded", "pause_seconds": pause,
            "moved": moved, "dropped": dropped,
        });
        self.ack(&h.attempt, "switched", &detail).await;
    }

    /// The notification sent by the commit of "switched": the decision.
    pub(super) async fn decided_switched(&self) {
        if let Some(row) = self
            .row
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_object_mut()
        {
            row.insert("switched".into(), serde_json::Value::Bool(true));
        }
        let h = self.hold.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match h {
            Some(h) => self.switch_over(&h).await,
            None => self.follow_switch().await,
        }
    }

    /// A member that was not holding when the migration switched (it
    /// joined, or missed the cutover): its sessions go to the target now.
    /// Their source backends were ended by the fence unless spared, so a
    /// session that cannot move is closed with an error.
    pub(super) async fn follow_switch(&self) {
        if self.is_leader()
            || !self.switched()
            || self.proxy.router().current().name == "target"
            || self
                .hold
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
        {
            return;
        }
        tracing::warn!(
            "fleet: the migration has switched: moving this member's sessions to the target"
        );
        self.proxy.gate().close();
        let (moved, dropped) = self
            .proxy
            .switch_to(self.target_route(), self.move_timeout())
            .await;
        self.proxy.gate().open();
        tracing::info!(moved, dropped, "fleet: on the target");
    }
}
