//! The fleet's tables in the control schema on the target (created with the
//! rest of it, `migration::control`): one row per member with its
//! heartbeat, the cutover step the leader posted last, each member's
//! answers to it, and commands relayed from a follower to the leader.
//! The leader's steps and decisions are followed by a NOTIFY on
//! [`CHANNEL`] (payload: `<migration>:<kind>[:…]`, see [`Note`]), so the
//! members learn them at once; they poll too, should a notification be
//! lost with a connection. The members' answers are not notified: the
//! leader reads them, often, while it waits for them. PostgreSQL takes one
//! cluster-wide lock for every committing transaction that notifies (so
//! that notifications queue in commit order) and signals every listening
//! backend of the database: eight members answering at once with a
//! notification each queued behind one another (1 → 7 ms on 2 cores),
//! where plain inserts commit side by side.

use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

/// The channel every member LISTENs on.
pub(crate) const CHANNEL: &str = "pgshift_fleet";

/// What a notification on [`CHANNEL`] says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Note {
    /// The leader posted a step (carried whole: followers act without a read).
    Step(Step),
    /// A follower relayed a command / the leader answered one.
    Request,
    Answer,
    /// A cutover attempt's outcome was recorded (`migration::control`).
    Attempt,
    /// The migration's "switched" committed (sent by that very commit).
    Switched,
}

impl Note {
    /// Parses a payload; None when it is another migration's (or unknown).
    pub(crate) fn parse(payload: &str, migration: &str) -> Option<Note> {
        let rest = payload.strip_prefix(migration)?.strip_prefix(':')?;
        let (kind, rest) = rest.split_once(':').unwrap_or((rest, ""));
        Some(match kind {
            "step" => {
                let mut parts = rest.splitn(3, ':');
                let seq = parts.next()?.parse().ok()?;
                let step = parts.next()?.to_string();
                let attempt = parts.next()?.to_string();
                Note::Step(Step { attempt, seq, step })
            }
            "request" => Note::Request,
            "answer" => Note::Answer,
            "attempt" => Note::Attempt,
            "switched" => Note::Switched,
            _ => return None,
        })
    }
}

/// One row of `pgshift.member`, as others see it.
#[derive(Clone, Debug, Serialize)]
pub struct MemberRow {
    pub id: String,
    /// Configured: auto, proxy or replication.
    pub role: String,
    pub leader: bool,
    pub version: String,
    pub proxy_addr: Option<String>,
    pub admin_addr: Option<String>,
    pub started_at: String,
    pub heartbeat_age_seconds: f64,
    pub sessions: i32,
    pub in_transaction: i32,
    pub route: String,
    pub paused: bool,
    /// Its heartbeat is fresh and its control session is connected.
    pub alive: bool,
}

/// What a member writes about itself at every heartbeat.
pub(crate) struct Heartbeat<'a> {
    pub role: &'a str,
    pub leader: bool,
    pub proxy_addr: Option<&'a str>,
    pub admin_addr: Option<&'a str>,
    /// RFC 3339.
    pub started_at: &'a str,
    pub sessions: i32,
    pub in_transaction: i32,
    pub route: &'a str,
    pub paused: bool,
}

/// The step of a fleet cutover the leader posted last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub attempt: String,
    pub seq: i32,
    pub step: String,
}

/// The decision a member holding its gate waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Decision {
    /// The migration has passed the point of no return.
    pub switched: bool,
    /// How the attempt ended (None: still running, or unknown).
    pub outcome: Option<String>,
}

pub(crate) struct Store<'a> {
    pub client: &'a Client,
    pub migration: &'a str,
    pub member: &'a str,
}

impl Store<'_> {
    /// Writes this member's row (inserted on the first beat, and again
    /// should someone have removed it), with its control session's
    /// identity so others can tell a dead member at once.
    pub(crate) async fn beat(&self, h: &Heartbeat<'_>) -> Result<(), tokio_postgres::Error> {
        self.client
            .execute(
                "INSERT INTO pgshift.member (migration, id, role, leader, version, proxy_addr, admin_addr,
                    started_at, heartbeat_at, backend_pid, backend_start, sessions, in_transaction, route, paused)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8::text::timestamptz, now(), pg_backend_pid(), a.backend_start, $9, $10, $11, $12
                   FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()
                 ON CONFLICT (migration, id) DO UPDATE SET role = $3, leader = $4, version = $5,
                    proxy_addr = $6, admin_addr = $7, started_at = $8::text::timestamptz, heartbeat_at = now(),
                    backend_pid = excluded.backend_pid, backend_start = excluded.backend_start,
                    sessions = $9, in_transaction = $10, route = $11, paused = $12",
                &[
                    &self.migration,
                    &self.member,
                    &h.role,
                    &h.leader,
                    &env!("CARGO_PKG_VERSION"),
                    &h.proxy_addr,
                    &h.admin_addr,
                    &h.started_at,
                    &h.sessions,
                    &h.in_transaction,
                    &h.route,
                    &h.paused,
                ],
            )
            .await?;
        Ok(())
    }

    /// Another live session registered this member's id (two processes
    /// configured with the same `member_id`).
    pub(crate) async fn id_in_use(&self, timeout_ms: i64) -> Result<bool, tokio_postgres::Error> {
        let row = self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pgshift.member m
                   WHERE m.migration = $1 AND m.id = $2 AND m.backend_pid <> pg_backend_pid()
                     AND m.heartbeat_at > now() - make_interval(secs => $3::float8 / 1000)
                     AND EXISTS (SELECT 1 FROM pg_stat_activity a
                                  WHERE a.pid = m.backend_pid AND a.backend_start = m.backend_start))",
                &[&self.migration, &self.member, &(timeout_ms as f64)],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Leaves the fleet (SIGTERM).
    pub(crate) async fn deregister(&self) -> Result<(), tokio_postgres::Error> {
        self.client
            .execute(
                "DELETE FROM pgshift.member WHERE migration = $1 AND id = $2",
                &[&self.migration, &self.member],
            )
            .await?;
        Ok(())
    }

    /// Every registered member; `timeout_ms`: how old a heartbeat may be
    /// for its member to count as alive. Members gone for long (ten
    /// timeouts) are removed on the way.
    pub(crate) async fn members(
        &self,
        timeout_ms: i64,
    ) -> Result<Vec<MemberRow>, tokio_postgres::Error> {
        self.client
            .execute(
                "DELETE FROM pgshift.member WHERE migration = $1
                   AND heartbeat_at < now() - make_interval(secs => $2::float8 / 100)",
                &[&self.migration, &(timeout_ms as f64)],
            )
            .await?;
        let rows = self
            .client
            .query(
                "SELECT m.id, m.role, m.leader, m.version, m.proxy_addr, m.admin_addr,
                        to_char(m.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                        extract(epoch FROM now() - m.heartbeat_at)::float8,
                        m.sessions, m.in_transaction, m.route, m.paused,
                        m.heartbeat_at > now() - make_interval(secs => $2::float8 / 1000)
                          AND EXISTS (SELECT 1 FROM pg_stat_activity a
                                       WHERE a.pid = m.backend_pid AND a.backend_start = m.backend_start)
                   FROM pgshift.member m WHERE m.migration = $1 ORDER BY m.id",
                &[&self.migration, &(timeout_ms as f64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| MemberRow {
                id: r.get(0),
                role: r.get(1),
                leader: r.get(2),
                version: r.get(3),
                proxy_addr: r.get(4),
                admin_addr: r.get(5),
                started_at: r.get(6),
                heartbeat_age_seconds: r.get(7),
                sessions: r.get(8),
                in_transaction: r.get(9),
                route: r.get(10),
                paused: r.get(11),
                alive: r.get(12),
            })
            .collect())
    }

    /// Posts the next step of attempt `attempt` and tells every member.
    pub(crate) async fn post_step(
        &self,
        attempt: &str,
        seq: i32,
        step: &str,
    ) -> Result<(), tokio_postgres::Error> {
        self.client
            .execute(
                "WITH s AS (
                   INSERT INTO pgshift.fleet_step (migration, attempt, seq, step) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (migration) DO UPDATE SET attempt = $2, seq = $3, step = $4, at = now()
                   RETURNING 1)
                 SELECT pg_notify($5, $1 || ':step:' || $3 || ':' || $4 || ':' || $2) FROM s",
                &[&self.migration, &attempt, &seq, &step, &CHANNEL],
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn step(&self) -> Result<Option<Step>, tokio_postgres::Error> {
        let row = self
            .client
            .query_opt(
                "SELECT attempt, seq, step FROM pgshift.fleet_step WHERE migration = $1",
                &[&self.migration],
            )
            .await?;
        Ok(row.map(|r| Step {
            attempt: r.get(0),
            seq: r.get(1),
            step: r.get(2),
        }))
    }

    /// Answers `step` of `attempt` (replacing an earlier answer to it).
    /// One round trip, no notification (see the module's note).
    pub(crate) async fn ack(
        &self,
        attempt: &str,
        step: &str,
        detail: &Value,
    ) -> Result<(), tokio_postgres::Error> {
        let detail = detail.to_string();
        self.client
            .query_typed(
                "INSERT INTO pgshift.fleet_ack (migration, attempt, member, step, detail)
                 VALUES ($1, $2, $3, $4, $5::jsonb)
                 ON CONFLICT (migration, attempt, member, step) DO UPDATE SET detail = $5::jsonb, at = now()",
                &[
                    (&self.migration, Type::TEXT),
                    (&attempt, Type::TEXT),
                    (&self.member, Type::TEXT),
                    (&step, Type::TEXT),
                    (&detail, Type::TEXT),
                ],
            )
            .await?;
        Ok(())
    }

    /// The answers to `step` of `attempt` so far, by member (one round
    /// trip: the leader asks every few ms while it waits).
    pub(crate) async fn acks(
        &self,
        attempt: &str,
        step: &str,
    ) -> Result<Vec<(String, Value)>, tokio_postgres::Error> {
        let rows = self
            .client
            .query_typed(
                "SELECT member, detail::text FROM pgshift.fleet_ack
                  WHERE migration = $1 AND attempt = $2 AND step = $3",
                &[
                    (&self.migration, Type::TEXT),
                    (&attempt, Type::TEXT),
                    (&step, Type::TEXT),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let d: String = r.get(1);
                (r.get(0), serde_json::from_str(&d).unwrap_or(Value::Null))
            })
            .collect())
    }

    /// Every registered member with whether it is alive and its answer to
    /// `step` of `attempt` (one round trip: the leader asks often during
    /// a drain), and answers of members no longer registered.
    pub(crate) async fn answers(
        &self,
        attempt: &str,
        step: &str,
        timeout_ms: i64,
    ) -> Result<Vec<(String, bool, Option<Value>)>, tokio_postgres::Error> {
        let rows = self
            .client
            .query(
                "SELECT coalesce(m.id, a.member),
                        coalesce(m.heartbeat_at > now() - make_interval(secs => $4::float8 / 1000)
                          AND EXISTS (SELECT 1 FROM pg_stat_activity s
                                       WHERE s.pid = m.backend_pid AND s.backend_start = m.backend_start), false),
                        a.detail::text
                   FROM (SELECT * FROM pgshift.member WHERE migration = $1) m
                   FULL JOIN (SELECT * FROM pgshift.fleet_ack WHERE migration = $1 AND attempt = $2 AND step = $3) a
                     ON a.member = m.id",
                &[&self.migration, &attempt, &step, &(timeout_ms as f64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let d: Option<String> = r.get(2);
                (
                    r.get(0),
                    r.get(1),
                    d.map(|d| serde_json::from_str(&d).unwrap_or(Value::Null)),
                )
            })
            .collect())
    }

    /// Whether the migration has switched, and how `attempt` ended.
    pub(crate) async fn decision(&self, attempt: &str) -> Result<Decision, tokio_postgres::Error> {
        let row = self
            .client
            .query_one(
                "SELECT coalesce((SELECT switched FROM pgshift.migration WHERE name = $1), false),
                        (SELECT outcome FROM pgshift.cutover_attempt WHERE migration = $1 AND id = $2)",
                &[&self.migration, &attempt],
            )
            .await?;
        Ok(Decision {
            switched: row.get(0),
            outcome: row.get(1),
        })
    }

    /// The migration's persisted row, for a member that does not lead:
    /// (state, substate, reason, switched).
    pub(crate) async fn migration_row(
        &self,
    ) -> Result<Option<(String, String, Option<String>, bool)>, tokio_postgres::Error> {
        let row = self
            .client
            .query_opt(
                "SELECT state, substate, reason, switched FROM pgshift.migration WHERE name = $1",
                &[&self.migration],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
    }

    /// The latest cutover attempt's report (as the leader persisted it).
    pub(crate) async fn last_attempt(&self) -> Result<Option<Value>, tokio_postgres::Error> {
        let row = self
            .client
            .query_opt(
                "SELECT report::text FROM pgshift.cutover_attempt WHERE migration = $1
                  ORDER BY started_at DESC LIMIT 1",
                &[&self.migration],
            )
            .await?;
        Ok(row
            .and_then(|r| r.get::<_, Option<String>>(0))
            .and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// A follower hands an operator command to the leader; returns its id.
    pub(crate) async fn request(&self, command: &Value) -> Result<i64, tokio_postgres::Error> {
        let command = command.to_string();
        let row = self
            .client
            .query_one(
                "WITH r AS (
                   INSERT INTO pgshift.fleet_request (migration, member, command)
                   VALUES ($1, $2, $3::text::jsonb) RETURNING id)
                 SELECT id, pg_notify($4, $1 || ':request') FROM r",
                &[&self.migration, &self.member, &command, &CHANNEL],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The leader's answer to request `id`, once there is one.
    pub(crate) async fn answer(&self, id: i64) -> Result<Option<Value>, tokio_postgres::Error> {
        let row = self
            .client
            .query_opt(
                "SELECT answer::text FROM pgshift.fleet_request WHERE id = $1 AND answer IS NOT NULL",
                &[&id],
            )
            .await?;
        Ok(row.map(|r| {
            let a: String = r.get(0);
            serde_json::from_str(&a).unwrap_or(Value::Null)
        }))
    }

    /// Requests not answered yet (the leader's side), oldest first. Old
    /// ones (the follower gave up) are answered as expired on the way.
    pub(crate) async fn pending_requests(
        &self,
    ) -> Result<Vec<(i64, Value)>, tokio_postgres::Error> {
        self.client
            .execute(
                "UPDATE pgshift.fleet_request SET answer = '{\"error\": \"expired\", \"status\": 504}', answered_at = now()
                  WHERE migration = $1 AND answer IS NULL AND at < now() - interval '1 minute'",
                &[&self.migration],
            )
            .await?;
        let rows = self
            .client
            .query(
                "SELECT id, command::text FROM pgshift.fleet_request
                  WHERE migration = $1 AND answer IS NULL ORDER BY id",
                &[&self.migration],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let c: String = r.get(1);
                (r.get(0), serde_json::from_str(&c).unwrap_or(Value::Null))
            })
            .collect())
    }

    pub(crate) async fn answer_request(
        &self,
        id: i64,
        answer: &Value,
    ) -> Result<(), tokio_postgres::Error> {
        let answer = answer.to_string();
        self.client
            .execute(
                "WITH a AS (
                   UPDATE pgshift.fleet_request SET answer = $2::text::jsonb, answered_at = now()
                    WHERE id = $1 RETURNING migration)
                 SELECT pg_notify($3, migration || ':answer') FROM a",
                &[&id, &answer, &CHANNEL],
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_parse_and_keep_to_their_migration() {
        assert_eq!(
            Note::parse("cut:step:3:gate:20261207T1-5", "cut"),
            Some(Note::Step(Step {
                attempt: "20261207T1-5".into(),
                seq: 3,
                step: "gate".into()
            }))
        );
        // Another migration whose name starts with this one's.
        assert_eq!(Note::parse("cutover:step:3:gate:a", "cut"), None);
        assert_eq!(Note::parse("other:attempt", "cut"), None);
        assert_eq!(Note::parse("cut:attempt", "cut"), Some(Note::Attempt));
        assert_eq!(Note::parse("cut:step:x:gate:a", "cut"), None);
        assert_eq!(Note::parse("cut:nonsense", "cut"), None);
    }
}
