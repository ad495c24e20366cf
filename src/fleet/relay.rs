//! Operator commands (`pgshift cutover`, `cancel`, `ddl …`) reach any
//! member's admin API; the leader's runner carries them out. A follower
//! relays a command through the control schema (`pgshift.fleet_request`)
//! and waits for the leader's answer, so members need not reach each
//! other over the network.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Fleet;
use crate::commands::{AdminCommand, CommandError, CommandKind, CommandReceiver};

/// How long a follower waits for the leader's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

impl Fleet {
    /// Serves the admin API's commands for as long as the member lives.
    pub(super) async fn commands(self: Arc<Self>, mut rx: CommandReceiver) {
        while let Some(cmd) = rx.recv().await {
            let f = self.clone();
            tokio::spawn(async move { f.dispatch(cmd).await });
        }
    }

    async fn leader_commands(&self) -> Option<crate::commands::CommandSender> {
        self.term.lock().await.as_ref().map(|t| t.commands())
    }

    async fn dispatch(&self, cmd: AdminCommand) {
        if let Some(tx) = self.leader_commands().await {
            if let Err(e) = tx.send(cmd).await {
                let _ = e.0.reply.send(Err(CommandError::Failed(
                    "this member stopped leading; try again".into(),
                )));
            }
            return;
        }
        let reply = self.relay(&cmd.kind).await;
        let _ = cmd.reply.send(reply);
    }

    /// A follower: the command goes to the leader, the answer comes back.
    async fn relay(&self, kind: &CommandKind) -> Result<Value, CommandError> {
        let Some(leader) = self.members().into_iter().find(|m| m.alive && m.leader) else {
            return Err(CommandError::Conflict(
                "no member of the fleet leads right now (a new leader takes over within a few seconds); try again".into(),
            ));
        };
        let client = self.client().ok_or_else(|| {
            CommandError::Failed(
                "this member has no connection to the control database; send the command to another member".into(),
            )
        })?;
        let st = self.store(&client);
        let id = st
            .request(&kind.to_json())
            .await
            .map_err(|e| CommandError::Failed(crate::db::describe(&e)))?;
        let deadline = Instant::now() + ANSWER_WAIT;
        let mut wake = self.wake.subscribe();
        loop {
            if let Some(answer) = st
                .answer(id)
                .await
                .map_err(|e| CommandError::Failed(crate::db::describe(&e)))?
            {
                return decode_answer(answer, &leader.id);
            }
            if Instant::now() >= deadline {
                return Err(CommandError::Failed(format!(
                    "the leader ({}) did not answer within {ANSWER_WAIT:?}",
                    leader.id
                )));
            }
            self.wait_wake(&mut wake, Duration::from_millis(200), deadline)
                .await;
        }
    }

    /// The leader: carries out the commands other members relayed.
    pub(super) async fn serve_requests(self: &Arc<Self>) {
        let Some(c) = self.client() else { return };
        let Ok(requests) = self.store(&c).pending_requests().await else {
            return;
        };
        for (id, command) in requests {
            if !self
                .serving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id)
            {
                continue;
            }
            let f = self.clone();
            tokio::spawn(async move {
                let answer = f.carry_out(&command).await;
                if let Some(c) = f.client()
                    && let Err(e) = f.store(&c).answer_request(id, &answer).await
                {
                    tracing::warn!(
                        "fleet: cannot answer request {id}: {}",
                        crate::db::describe(&e)
                    );
                }
            });
        }
    }

    async fn carry_out(&self, command: &Value) -> Value {
        let Some(kind) = CommandKind::from_json(command) else {
            return json!({"error": format!("unknown command {command}"), "status": 400});
        };
        let Some(tx) = self.leader_commands().await else {
            return json!({"error": "this member stopped leading; try again", "status": 409});
        };
        let (reply, rx) = tokio::sync::oneshot::channel();
        if tx.send(AdminCommand { kind, reply }).await.is_err() {
            return json!({"error": "the migration runner has stopped", "status": 500});
        }
        match rx.await {
            Ok(Ok(v)) => json!({"ok": v}),
            Ok(Err(CommandError::Conflict(m))) => json!({"error": m, "status": 409}),
            Ok(Err(CommandError::Failed(m))) => json!({"error": m, "status": 500}),
            Err(_) => json!({"error": "the migration runner has stopped", "status": 500}),
        }
    }
}

fn decode_answer(answer: Value, leader: &str) -> Result<Value, CommandError> {
    if let Some(ok) = answer.get("ok") {
        let mut ok = ok.clone();
        if let Value::Object(m) = &mut ok {
            m.insert("leader".into(), json!(leader));
        }
        return Ok(ok);
    }
    let message = answer["error"]
        .as_str()
        .unwrap_or("unknown error")
        .to_string();
    match answer["status"].as_u64() {
        Some(409) => Err(CommandError::Conflict(message)),
        _ => Err(CommandError::Failed(message)),
    }
}
