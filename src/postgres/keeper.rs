//! The holder's session, kept on a thread of its own while the run holds the lock: it
//! renews the lease row every third of its TTL, does the holder's writes for it (so
//! that they go through the one session that holds the lease), and reports, once, the
//! moment the lock can no longer be counted on:
//!
//! - the session ended (the server closed it, `pg_terminate_backend`, or it broke): at
//!   once, since nothing more can be written through it and the run must not go on
//!   unfenced;
//! - the lease row is gone or expired (the server says so);
//! - no renewal got through and the lease may expire within `lead`, measured on this
//!   machine's monotonic clock from when the last good renewal was *sent* (the server
//!   sets `expires = now() + ttl` when it receives it, later), so the server cannot hand
//!   the lock on before that moment, whatever happens to the session or the server.

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::types::Type;

use super::conn::{Conn, Param, PgError};
use super::sql::Sql;
use crate::threads;
use crate::values::format_duration;

/// How soon a failed renewal is tried again (within what is left of the lease).
const RETRY: Duration = Duration::from_millis(250);

/// A write of the holder.
pub enum Op {
    /// Stores the result and releases the lock (forgetting the failure record or not).
    Result {
        value: Vec<u8>,
        forget: bool,
    },
    Failure(Vec<u8>),
    KeyValues(Vec<u8>),
    /// Releases the lock; the keeper ends.
    Release {
        forget: bool,
    },
}

type Reply = Sender<Result<bool, PgError>>;

/// The thread that keeps a lease; dropping it stops the renewals without releasing.
pub struct Keeper {
    ops: Option<mpsc::UnboundedSender<(Op, Reply)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the keeper needs to know of the lock.
pub struct Lease {
    pub slot: String,
    pub token: i64,
    pub ttl: Duration,
    /// When the statement that took or last renewed it was sent.
    pub sent: Instant,
}

impl Keeper {
    /// Starts keeping `lease` through `conn`. `on_lost` is called at most once, from
    /// the keeper's thread.
    pub fn start(
        conn: Conn,
        sql: Sql,
        lease: Lease,
        lead: Duration,
        on_lost: impl FnOnce(String) + Send + 'static,
    ) -> std::io::Result<Keeper> {
        let (ops, mut received) = mpsc::unbounded_channel();
        let thread = threads::start("pg-lease", move || {
            if let Some(why) = keep(&conn, &sql, &lease, lead, &mut received) {
                on_lost(why);
            }
        })?;
        Ok(Keeper {
            ops: Some(ops),
            thread: Some(thread),
        })
    }

    /// Has the keeper do a write; `Ok(false)` if the lock was no longer held.
    pub fn write(&self, op: Op) -> Result<bool, PgError> {
        let (reply, answer) = std::sync::mpsc::channel();
        let sent = self
            .ops
            .as_ref()
            .is_some_and(|ops| ops.send((op, reply)).is_ok());
        if !sent {
            return Err(PgError::new("the lock was lost"));
        }
        answer
            .recv()
            .unwrap_or_else(|_| Err(PgError::new("the lock was lost")))
    }

    /// Stops renewing (without releasing) and waits for the thread.
    pub fn stop(mut self) {
        self.ops.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Renews and writes until told to stop (`None`) or the lock is lost (`Some(why)`).
fn keep(
    conn: &Conn,
    sql: &Sql,
    lease: &Lease,
    lead: Duration,
    ops: &mut mpsc::UnboundedReceiver<(Op, Reply)>,
) -> Option<String> {
    let client = conn.client();
    let mut ended = conn.ended();
    let ttl_secs = lease.ttl.as_secs_f64();
    let interval = lease.ttl / 3;
    let mut expires = lease.sent + lease.ttl;
    let mut next = lease.sent + interval;
    let mut last_error: Option<PgError> = None;
    conn.block_on(async {
        loop {
            let give_up = expires.checked_sub(lead).unwrap_or(lease.sent);
            let lost_in_time = || match &last_error {
                Some(e) => format!(
                    "no renewal of the {} lease got through ({e})",
                    format_duration(lease.ttl)
                ),
                None => format!(
                    "no renewal of the {} lease got through in time (PostgreSQL did not answer)",
                    format_duration(lease.ttl)
                ),
            };
            tokio::select! {
                biased;
                why = ended.wait_for(Option::is_some) => {
                    let why = why.ok().and_then(|w| w.clone()).unwrap_or_default();
                    return Some(format!("the session holding the lock ended ({why})"));
                }
                _ = tokio::time::sleep_until(give_up.into()) => return Some(lost_in_time()),
                op = ops.recv() => {
                    let (op, reply) = op?;
                    let release = matches!(op, Op::Release { .. } | Op::Result { .. });
                    let limit = give_up.min(Instant::now() + conn.timeout());
                    let done = tokio::time::timeout_at(limit.into(), write(client, sql, lease, op)).await;
                    let done = match done {
                        Ok(Ok(rows)) => Ok(rows > 0),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(PgError::new(format!(
                            "PostgreSQL did not answer within {}",
                            format_duration(conn.timeout())
                        ))),
                    };
                    let failed = done.is_err();
                    let _ = reply.send(done);
                    if release && !failed {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(next.into()) => {
                    let sent = Instant::now();
                    let params: [Param<'_>; 3] = [
                        (&lease.slot, Type::TEXT),
                        (&lease.token, Type::INT8),
                        (&ttl_secs, Type::FLOAT8),
                    ];
                    let renewal = client.query_typed(&sql.renew, &params);
                    match tokio::time::timeout_at(give_up.into(), renewal).await {
                        Ok(Ok(rows)) if !rows.is_empty() => {
                            expires = sent + lease.ttl;
                            next = sent + interval;
                            last_error = None;
                        }
                        Ok(Ok(_)) => {
                            return Some("PostgreSQL says the lease expired or was taken".to_owned());
                        }
                        Ok(Err(e)) => {
                            let e = PgError::of_client(&e);
                            if e.closed {
                                return Some(format!("the session holding the lock ended ({e})"));
                            }
                            next = (Instant::now() + RETRY).min(give_up);
                            last_error = Some(e);
                        }
                        Err(_) => return Some(lost_in_time()),
                    }
                }
            }
        }
    })
}

/// Does one write; the number of rows that say it was done (0: the lock was lost).
async fn write(
    client: &tokio_postgres::Client,
    sql: &Sql,
    lease: &Lease,
    op: Op,
) -> Result<usize, PgError> {
    let (slot, token) = (&lease.slot, &lease.token);
    let rows = match &op {
        Op::Result { value, forget } => {
            client
                .query_typed(
                    &sql.save_result,
                    &[
                        (slot, Type::TEXT),
                        (token, Type::INT8),
                        (value, Type::BYTEA),
                        (forget, Type::BOOL),
                    ],
                )
                .await
        }
        Op::Failure(value) | Op::KeyValues(value) => {
            let statement = match op {
                Op::Failure(_) => &sql.save_failure,
                _ => &sql.save_key_values,
            };
            client
                .query_typed(
                    statement,
                    &[
                        (slot, Type::TEXT),
                        (token, Type::INT8),
                        (value, Type::BYTEA),
                    ],
                )
                .await
        }
        Op::Release { forget } => {
            client
                .query_typed(
                    &sql.release,
                    &[
                        (slot, Type::TEXT),
                        (token, Type::INT8),
                        (forget, Type::BOOL),
                    ],
                )
                .await
        }
    };
    rows.map(|rows| rows.len())
        .map_err(|e| PgError::of_client(&e))
}
