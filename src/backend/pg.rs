//! The PostgreSQL arm of the backend: a NAME's lock is a lease row whose expiry the
//! server judges (`now()`), renewed by the holder's session on a keeper thread; its
//! fencing token comes from a sequence; its result, failure record and key values are
//! a row of their own. Waiters `LISTEN` for the release. A fresh result is kept in a
//! local copy (`NAME.fleet`, see `mirror.rs`) that later calls on this machine serve
//! without asking the server. See docs/fleet.md.

use std::cell::{Cell, RefCell};
use std::ffi::OsString;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_postgres::types::Type;

use super::mirror::{self, Mirror};
use super::owner;
use super::{
    Backend, Cleared, Config, FENCING_TOKEN_ENV, Files, Held, Lock, Place, Read, Slots, Snapshot,
    Unsaved,
};
use crate::abort::Abort;
use crate::entry::{self, Body, EntryWriter, Meta};
use crate::exit::{Exit, Status};
use crate::key::SlotId;
use crate::postgres::{
    Conn, Host, Keeper, Lease, Op, PgError, PgSchema, PgUrl, Settings, Sql, VERSION, find_password,
    tls_config,
};
use crate::record::{self, Failure};
use crate::say::Say;
use crate::store::Store;
use crate::values::{LeaseHandover, Name, Refresher, later};

/// `--backend-timeout` default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// `--lease-ttl` default.
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// The largest result stored (the entry's bytes): a result is read into memory.
const MAX_VALUE: u64 = 64 << 20;
/// See the etcd backend: results written by another machine.
const CLOCK_SKEW: Duration = Duration::from_secs(1);
/// How often a waiter looks where `LISTEN` delivers nothing (a transaction pooler).
const POLL: Duration = Duration::from_millis(500);
/// How long `clear` waits for a run in flight between two looks.
const CLEAR_WAIT: Duration = Duration::from_secs(3600);

/// The session, shared by every slot of a call until a held lock takes it.
struct Shared {
    settings: Settings,
    conn: RefCell<Option<Conn>>,
    /// Whether `LISTEN` is known to deliver (`None`: not tried yet).
    listen_works: Cell<Option<bool>>,
}

/// The PostgreSQL backend as the command line gives it; cheap to clone.
#[derive(Clone)]
pub struct Pg {
    shared: Rc<Shared>,
    sql: Rc<Sql>,
    schema: PgSchema,
    lease_ttl: Duration,
    /// The server, database and schema as a local copy's source names them (see
    /// [`copy_backend`]).
    copy_backend: Rc<str>,
}

/// The user and the database a URL logs in as and to: its own, else as libpq
/// (`PGUSER`, then `USER`, then `postgres`; the database defaults to the user).
fn user_and_dbname(url: &PgUrl) -> (String, String) {
    let user = url
        .user
        .clone()
        .or_else(|| std::env::var("PGUSER").ok())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "postgres".to_owned());
    let dbname = url.dbname.clone().unwrap_or_else(|| user.clone());
    (user, dbname)
}

/// The PostgreSQL of `url` and `schema` as a local copy's source names it: the server
/// (host or unix socket dir, and port), the database and the schema:
/// `postgres://HOST:PORT/DB schema SCHEMA`. Not the user (every user of the database
/// sees the same rows) and never a password (a URL has none: `PgUrl::parse` refuses
/// one; one from `PGPASSWORD` or a password file is never put here).
fn copy_backend(url: &PgUrl, dbname: &str, schema: &PgSchema) -> String {
    let host = match &url.host {
        Host::Tcp(host) if host.contains(':') => format!("[{host}]"),
        Host::Tcp(host) => host.clone(),
        Host::Socket(dir) => dir.display().to_string(),
    };
    format!(
        "postgres://{host}:{}/{dbname} schema {}",
        url.port,
        schema.as_str()
    )
}

/// The local copy of slot `id`'s result in the PostgreSQL of `url` and `schema`, if
/// there is one that checks and is fresh by the result's own TTL (see `mirror.rs`):
/// what a call before clap serves without opening the backend (`hit`). The same copy,
/// by the same path and source, as a `PgSlot` keeps and reads. Neither the password
/// nor a TLS file is read, nothing is sent.
pub fn read_copy(
    store: &Store,
    url: &PgUrl,
    schema: &PgSchema,
    id: &SlotId,
) -> Option<crate::entry::Entry> {
    let (_, dbname) = user_and_dbname(url);
    let source = mirror::source(
        &copy_backend(url, &dbname, schema),
        id.to_string().as_bytes(),
    );
    mirror::read(&mirror::path(&store.result_path(id)), &source, CLOCK_SKEW)
}

impl Pg {
    /// The database of `url`: its password and TLS files are read now (a file that
    /// cannot be used is 125); nothing is sent until a slot needs it.
    pub fn open(url: PgUrl, config: Config) -> Result<Pg> {
        let (user, dbname) = user_and_dbname(&url);
        let (password, warning) = find_password(&url, &user, &dbname);
        if let Some(warning) = warning {
            eprintln!("singleflight: warning: {warning}");
        }
        let tls =
            tls_config(&url).map_err(|e| Exit::new(Status::Internal, format!("{url}: {e}")))?;
        let schema = config.pg_schema.unwrap_or_default();
        let copy_backend = copy_backend(&url, &dbname, &schema).into();
        Ok(Pg {
            copy_backend,
            sql: Rc::new(Sql::new(schema.as_str())),
            shared: Rc::new(Shared {
                settings: Settings {
                    url,
                    user,
                    password,
                    timeout: config.timeout.unwrap_or(DEFAULT_TIMEOUT),
                    tls: Arc::new(tls),
                },
                conn: RefCell::new(None),
                listen_works: Cell::new(None),
            }),
            schema,
            lease_ttl: config.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL),
        })
    }

    fn url(&self) -> &PgUrl {
        &self.shared.settings.url
    }

    /// The session, opened on first use.
    fn with_conn<T>(
        &self,
        work: impl FnOnce(&mut Conn) -> Result<T, PgError>,
    ) -> Result<T, PgError> {
        let mut slot = self.shared.conn.borrow_mut();
        if slot.is_none() {
            *slot = Some(Conn::open(&self.shared.settings, "singleflight")?);
        }
        let conn = slot.as_mut().expect("opened above");
        let done = work(conn);
        if done.as_ref().is_err_and(|e| e.closed) {
            *slot = None;
        }
        done
    }

    /// Takes the session away (for a held lock's keeper); one that listens (this
    /// caller waited first) is left behind, so that the keeper receives no
    /// notifications it would keep unread for the whole run.
    fn take_conn(&self) -> Result<Conn, PgError> {
        match self.shared.conn.borrow_mut().take() {
            Some(conn) if conn.listening.is_empty() => Ok(conn),
            _ => Conn::open(&self.shared.settings, "singleflight"),
        }
    }

    /// One statement; the schema is created on first use and the statement tried again.
    fn query(
        &self,
        sql: &str,
        params: &[(&(dyn tokio_postgres::types::ToSql + Sync), Type)],
    ) -> Result<Vec<tokio_postgres::Row>, PgError> {
        self.with_conn(|conn| match conn.query(sql, params) {
            Err(e) if e.missing_schema => {
                self.create_schema(conn)?;
                conn.query(sql, params)
            }
            other => other,
        })
    }

    fn create_schema(&self, conn: &Conn) -> Result<(), PgError> {
        conn.batch(&self.sql.create).map_err(|e| {
            PgError::new(format!(
                "cannot create the schema {} ({e}); see docs/fleet.md for the privileges it needs",
                self.schema.as_str()
            ))
        })?;
        let rows = conn.query(&self.sql.version, &[])?;
        let version: Option<i32> = rows.first().and_then(|row| row.get(0));
        if version.is_some_and(|v| v > VERSION) {
            return Err(PgError::new(format!(
                "the schema {} is at version {}, newer than this singleflight's {VERSION}: \
                 upgrade singleflight",
                self.schema.as_str(),
                version.unwrap_or_default()
            )));
        }
        Ok(())
    }
}

impl Backend for Pg {
    fn place(&self, store: Store, id: &SlotId) -> Box<dyn Place> {
        Box::new(PgSlot {
            files: Files {
                paths: store.paths(id),
                store,
            },
            pg: self.clone(),
            name: id.name.clone(),
            slot: id.to_string(),
        })
    }

    fn verify(&self, _: &Store) -> Result<bool> {
        Ok(true)
    }

    fn slots(&self, _: &Store) -> Result<Vec<SlotId>> {
        let rows = self
            .query(&self.sql.slots, &[])
            .map_err(|e| Exit::new(Status::Internal, format!("{self}: {e}")))?;
        let mut slots: Vec<SlotId> = rows
            .iter()
            .filter_map(|row| SlotId::parse(row.get::<_, &str>(0)))
            .collect();
        slots.sort();
        slots.dedup();
        Ok(slots)
    }

    fn describe(&self, _: &Store) -> String {
        self.to_string()
    }

    fn is_cache_dir(&self) -> bool {
        false
    }
}

impl std::fmt::Display for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} schema {}", self.url(), self.schema.as_str())
    }
}

/// The N recorded for `--slots`, and each run slot held with its owner.
type SlotRows = (Option<u32>, Vec<(u32, String)>);

/// What one try at a run slot of `--slots` came to.
enum Try {
    /// This slot, with its fencing token, and when it was asked for.
    Taken(u32, i64, Instant),
    /// Every slot of the N in force (this one) is in use.
    AllInUse(u32),
    /// A caller without `--slots` took the NAME's own lock first.
    Raced,
}

/// One slot of a NAME in PostgreSQL.
struct PgSlot {
    files: Files,
    pg: Pg,
    /// The NAME, whose files in the cache dir are named after it.
    name: Name,
    /// The slot's row: `NAME` or `NAME@<key>`.
    slot: String,
}

impl PgSlot {
    /// The local copy of the result (see `mirror.rs`): `NAME.fleet` in the cache dir,
    /// of this server, database and schema, and the slot.
    fn mirror(&self) -> Mirror {
        Mirror {
            store: self.files.store.clone(),
            name: self.name.clone(),
            path: mirror::path(&self.files.paths.result),
            source: mirror::source(&self.pg.copy_backend, self.slot.as_bytes()),
            skew: CLOCK_SKEW,
        }
    }

    /// A result as the server holds it (`None`: none), with the local copy kept of it
    /// (a valid fresh one) or dropped.
    fn found(&self, value: Option<Vec<u8>>) -> Read {
        let mirror = self.mirror();
        match value {
            None => {
                mirror.forget();
                Read::Missing
            }
            Some(bytes) => {
                // PostgreSQL's result row has no version: revision 0 (see `mirror.rs`).
                mirror.keep(0, &bytes);
                match entry::from_bytes(bytes) {
                    Ok(entry) => Read::Found(entry),
                    Err(invalid) => Read::Invalid(invalid),
                }
            }
        }
    }

    fn not_run(&self, error: PgError) -> anyhow::Error {
        let message = format!("{}: {error}; the command was not run", self.slot);
        Exit::new(Status::Internal, message).into()
    }

    fn failed(&self, error: PgError) -> anyhow::Error {
        Exit::new(Status::Internal, format!("{}: {error}", self.slot)).into()
    }

    fn column(&self, sql: &str) -> Result<Option<Vec<u8>>, PgError> {
        let rows = self.pg.query(sql, &[(&self.slot, Type::TEXT)])?;
        Ok(rows
            .first()
            .and_then(|row| row.get::<_, Option<Vec<u8>>>(0)))
    }

    /// Takes the lock row if nobody holds it: the token, and when it was asked for.
    fn take(&self) -> Result<Option<(i64, Instant)>, PgError> {
        let ttl = self.pg.lease_ttl.as_secs_f64();
        let owner = owner::this_process();
        let sent = Instant::now();
        let rows = self.pg.query(
            &self.pg.sql.lock,
            &[
                (&self.slot, Type::TEXT),
                (&ttl, Type::FLOAT8),
                (&owner, Type::TEXT),
            ],
        )?;
        Ok(rows.first().map(|row| (row.get::<_, i64>(0), sent)))
    }

    /// Holds a taken lock: the session goes to a keeper that renews the lease, and a
    /// loss trips the run's abort.
    fn hold(&self, token: i64, sent: Instant) -> Result<Held> {
        Ok(Box::new(self.hold_slot(0, token, sent)?))
    }

    /// [`PgSlot::hold`] of run slot `index` of `--slots` (0: the NAME's own lock).
    fn hold_slot(&self, index: u32, token: i64, sent: Instant) -> Result<PgHeld> {
        let row = self.slot_row(index);
        let conn = self.pg.take_conn().map_err(|e| self.not_run(e))?;
        let abort = Arc::new(Abort::default());
        let tripped = abort.clone();
        let lease = Lease {
            slot: row.clone(),
            token,
            ttl: self.pg.lease_ttl,
            sent,
        };
        let lead = (self.pg.lease_ttl / 10).min(Duration::from_millis(500));
        let keeper = Keeper::start(
            conn,
            Sql::new(self.pg.schema.as_str()),
            lease,
            lead,
            move |why| tripped.trip(why),
        )
        .map_err(|e| {
            let message = format!("{}: cannot start the lease keeper: {e}", self.slot);
            Exit::new(Status::Internal, message)
        })?;
        Ok(PgHeld {
            mirror: self.mirror(),
            slot: row,
            token,
            keeper: Some(keeper),
            abort,
            env: [(FENCING_TOKEN_ENV.into(), token.to_string().into())],
            handed_over: false,
            forgetting_failure: Cell::new(false),
            index,
            run: (index > 0)
                .then(|| crate::backend::semaphore::slot_paths(&self.files.paths, index).run),
        })
    }

    /// The lock row of run slot `index` of `--slots`: the NAME's own for 0, else
    /// `NAME#index`.
    fn slot_row(&self, index: u32) -> String {
        match index {
            0 => self.slot.clone(),
            _ => format!("{}#{index}", self.slot),
        }
    }

    /// Whether a release notification is of one of the NAME's run slots.
    fn is_slot_row(&self, payload: &str) -> bool {
        payload == self.slot
            || payload
                .strip_prefix(self.slot.as_str())
                .and_then(|rest| rest.strip_prefix('#'))
                .is_some_and(|index| index.bytes().all(|b| b.is_ascii_digit()))
    }

    /// The N recorded for `--slots` (`None`: none) and the run slots held now, each
    /// with its owner.
    fn slot_rows(&self, conn: &Conn) -> Result<SlotRows, PgError> {
        let rows = conn.query(&self.pg.sql.slot_rows, &[(&self.slot, Type::TEXT)])?;
        let count_row = format!("{}#slots", self.slot);
        let mut count = None;
        let mut held = Vec::new();
        for row in &rows {
            let slot: &str = row.get(0);
            let owner: String = row.get(1);
            if slot == count_row {
                count = owner.trim().parse().ok().filter(|n: &u32| *n > 0);
            } else if slot == self.slot {
                held.push((0, owner));
            } else if let Some(index) = slot
                .strip_prefix(self.slot.as_str())
                .and_then(|rest| rest.strip_prefix('#'))
                .and_then(|index| index.parse().ok())
            {
                held.push((index, owner));
            }
        }
        held.sort_by_key(|(index, _)| *index);
        Ok((count, held))
    }

    /// One try at a run slot, in one transaction under the NAME's advisory lock: reads
    /// the N recorded and the slots held, takes the first free one of the N in force
    /// (the recorded N while any slot is held, else `slots`, which is then recorded).
    fn try_slot(&self, conn: &Conn, slots: u32) -> Result<Try, PgError> {
        conn.batch("BEGIN")?;
        let tried = (|| {
            conn.query(&self.pg.sql.slot_guard, &[(&self.slot, Type::TEXT)])?;
            let (recorded, held) = self.slot_rows(conn)?;
            let count = match recorded {
                Some(count) if !held.is_empty() => count,
                _ => slots,
            };
            let Some(index) = (0..count).find(|i| !held.iter().any(|(h, _)| h == i)) else {
                return Ok(Try::AllInUse(count));
            };
            if recorded != Some(count) {
                let text = count.to_string();
                conn.query(
                    &self.pg.sql.slot_count,
                    &[(&self.slot, Type::TEXT), (&text, Type::TEXT)],
                )?;
            }
            let ttl = self.pg.lease_ttl.as_secs_f64();
            let owner = owner::this_process();
            let row = self.slot_row(index);
            let sent = Instant::now();
            let rows = conn.query(
                &self.pg.sql.lock,
                &[
                    (&row, Type::TEXT),
                    (&ttl, Type::FLOAT8),
                    (&owner, Type::TEXT),
                ],
            )?;
            // Held by a caller without --slots (which takes no advisory lock): look again.
            Ok(match rows.first() {
                Some(taken) => Try::Taken(index, taken.get(0), sent),
                None => Try::Raced,
            })
        })();
        let end = match &tried {
            Ok(Try::Taken(..)) => "COMMIT",
            _ => "ROLLBACK",
        };
        match conn.batch(end) {
            Ok(()) => tried,
            Err(e) => tried.and(Err(e)),
        }
    }

    /// When a waiter looks again without a notification: at once after `left` (the
    /// holder's lease) ends, or every `POLL` where notifications do not come through.
    fn wake_by(&self, left: Duration) -> Instant {
        if self.pg.shared.listen_works.get() == Some(false) {
            Instant::now() + POLL.min(left)
        } else {
            later(Instant::now(), left + Duration::from_millis(20))
        }
    }

    /// Waits for the release of any run slot of the NAME (or the earliest lease of
    /// them to pass), until `deadline`; at once if fewer than `count` are held now.
    fn wait_any_slot(&self, conn: &mut Conn, count: u32, deadline: Instant) -> Result<(), PgError> {
        let probe = self.pg.shared.listen_works.get().is_none();
        let (left, held) = self.look(conn, probe, &self.pg.sql.slots_held)?;
        let Some(left) = left else { return Ok(()) };
        if held < i64::from(count) {
            return Ok(());
        }
        let until = self.wake_by(left).min(deadline);
        while let Some(note) = conn.next_notification(until)? {
            if self.is_slot_row(note.payload()) {
                break;
            }
        }
        Ok(())
    }

    /// Listens for releases, once per session, and finds out whether notifications
    /// arrive (they do not behind a transaction-mode pooler).
    fn lock_remaining(&self, conn: &mut Conn, probe: bool) -> Result<Option<Duration>, PgError> {
        Ok(self.look(conn, probe, &self.pg.sql.held)?.0)
    }

    /// Listens for releases, once per session.
    fn listen(&self, conn: &mut Conn) -> Result<(), PgError> {
        let channel = format!("sfprobe_{}", std::process::id());
        if conn.listening.is_empty() {
            let listen = format!(
                "LISTEN \"{}\"; LISTEN \"{channel}\"; SELECT pg_backend_pid()",
                self.pg.sql.channel
            );
            let answers = conn.run(|client| client.simple_query(&listen))?;
            conn.listener_pid = answers.iter().find_map(|answer| match answer {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0)?.parse().ok(),
                _ => None,
            });
            conn.listening = vec![self.pg.sql.channel.clone(), channel];
        }
        Ok(())
    }

    /// [`PgSlot::listen`], then one look with `sql` (`held` or `slots_held`): how long
    /// the (earliest) lease has left, `None` if nothing is held, and how many are held;
    /// a probe finds out whether notifications arrive (they do not behind a
    /// transaction-mode pooler).
    fn look(
        &self,
        conn: &mut Conn,
        probe: bool,
        sql: &str,
    ) -> Result<(Option<Duration>, i64), PgError> {
        let channel = format!("sfprobe_{}", std::process::id());
        self.listen(conn)?;
        conn.drain_notifications();
        let nonce = if probe {
            format!("{:?}", Instant::now())
        } else {
            String::new()
        };
        let target = if probe {
            channel.as_str()
        } else {
            "sfprobe_none"
        };
        let rows = conn.query(
            sql,
            &[
                (&self.slot, Type::TEXT),
                (&target, Type::TEXT),
                (&nonce, Type::TEXT),
            ],
        )?;
        let left: Option<f64> = rows.first().and_then(|row| row.get(0));
        let pid: Option<i32> = rows.first().and_then(|row| row.get(2));
        let held = rows
            .first()
            .and_then(|row| row.try_get::<_, i64>(3).ok())
            .unwrap_or(i64::from(left.is_some()));
        let moved = conn
            .listener_pid
            .is_some_and(|listener| pid != Some(listener));
        if moved && self.pg.shared.listen_works.get() != Some(false) {
            self.pg.shared.listen_works.set(Some(false));
            self.say_polling("statements are answered by different server processes");
        }
        if probe && !moved {
            let deadline = Instant::now() + conn.timeout();
            let mut heard = false;
            while let Some(note) = conn.next_notification(deadline)? {
                if note.channel() == channel && note.payload() == nonce {
                    heard = true;
                    break;
                }
            }
            self.pg.shared.listen_works.set(Some(heard));
            if !heard {
                self.say_polling("its own notification did not arrive");
            }
        }
        Ok((
            left.map(|secs| Duration::from_secs_f64(secs.max(0.0))),
            held,
        ))
    }

    /// The warning of a waiter that cannot count on LISTEN.
    fn say_polling(&self, why: &str) {
        eprintln!(
            "singleflight: warning: {}: LISTEN gets no notifications here ({why}: a \
             transaction-mode pooler such as PgBouncer?); waiting by looking every {}ms",
            self.pg.url(),
            POLL.as_millis()
        );
    }
}

impl Place for PgSlot {
    fn files(&self) -> &Files {
        &self.files
    }

    fn clock_skew(&self) -> Duration {
        CLOCK_SKEW
    }

    fn exists(&self) -> Result<bool> {
        Ok(true)
    }

    /// Reads the result, and keeps the local copy of it (or drops the copy when the
    /// server holds none). A waiter woken by the release reads here too.
    fn read_result(&self) -> Result<Read> {
        let value = self
            .column(&self.pg.sql.read_result)
            .map_err(|e| self.not_run(e))?;
        Ok(self.found(value))
    }

    fn read_mirror(&self) -> Option<entry::Entry> {
        self.mirror().read()
    }

    fn result_location(&self) -> String {
        format!("{} slot {}", self.pg, self.slot)
    }

    fn read_failure(&self) -> Result<Option<Failure>> {
        let value = self
            .column(&self.pg.sql.read_failure)
            .map_err(|e| self.not_run(e))?;
        Ok(value.and_then(|bytes| record::from_bytes(&bytes)))
    }

    fn try_lock(&self) -> Result<Option<Held>> {
        match self.take().map_err(|e| self.not_run(e))? {
            Some((token, sent)) => self.hold(token, sent).map(Some),
            None => Ok(None),
        }
    }

    /// Listens first, then tries the slots; while all are in use, waits for any of
    /// them to be released or for the earliest lease of them to pass.
    fn lock_slot_within(&self, slots: u32, limit: Duration) -> Result<Option<Held>> {
        let deadline = later(Instant::now(), limit);
        let taken = self.pg.with_conn(|conn| {
            loop {
                self.listen(conn)?;
                let tried = match self.try_slot(conn, slots) {
                    Err(e) if e.missing_schema => {
                        self.pg.create_schema(conn)?;
                        self.try_slot(conn, slots)
                    }
                    other => other,
                };
                let count = match tried? {
                    Try::Taken(index, token, sent) => return Ok(Some((index, token, sent))),
                    Try::AllInUse(count) => Some(count),
                    Try::Raced => None,
                };
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                if let Some(count) = count {
                    self.wait_any_slot(conn, count, deadline)?;
                }
            }
        });
        match taken.map_err(|e| self.not_run(e))? {
            Some((index, token, sent)) => Ok(Some(Box::new(self.hold_slot(index, token, sent)?))),
            None => Ok(None),
        }
    }

    /// Waits for the release's notification, or for the holder's lease to pass (a
    /// holder that died notifies nobody), whichever comes first.
    fn wait_released(&self, limit: Duration) -> Result<bool> {
        let deadline = later(Instant::now(), limit);
        let waited = self.pg.with_conn(|conn| {
            loop {
                let probe = self.pg.shared.listen_works.get().is_none();
                let Some(left) = self.lock_remaining(conn, probe)? else {
                    return Ok(true);
                };
                let until = self.wake_by(left).min(deadline);
                loop {
                    match conn.next_notification(until)? {
                        Some(note) if note.payload() == self.slot => return Ok(true),
                        Some(_) => continue,
                        None => break,
                    }
                }
                if Instant::now() >= deadline {
                    return Ok(false);
                }
            }
        });
        waited.map_err(|e| self.not_run(e))
    }

    unsafe fn take_handed(&self, handover: Refresher) -> Result<Option<Held>> {
        let Refresher::Lease(LeaseHandover { token, .. }) = handover else {
            return Err(Exit::new(
                Status::Internal,
                "--refresher (internal): a lock file is handed over only with the cache dir backend",
            )
            .into());
        };
        let ttl = self.pg.lease_ttl.as_secs_f64();
        let owner = owner::this_process();
        let sent = Instant::now();
        let rows = self
            .pg
            .query(
                &self.pg.sql.adopt,
                &[
                    (&self.slot, Type::TEXT),
                    (&token, Type::INT8),
                    (&ttl, Type::FLOAT8),
                    (&owner, Type::TEXT),
                ],
            )
            .map_err(|e| self.not_run(e))?;
        if rows.is_empty() {
            let message = format!(
                "{}: the PostgreSQL lock handed to the refresher is no longer held with token \
                 {token}; the command was not run",
                self.slot
            );
            return Err(Exit::new(Status::Internal, message).into());
        }
        self.hold(token, sent).map(Some)
    }

    fn room_for_body(&self, meta: &Meta) -> Option<u64> {
        Some(MAX_VALUE.saturating_sub(entry::encoded_len(0, 0, meta)))
    }

    fn value_limit(&self) -> Option<u64> {
        Some(MAX_VALUE)
    }

    fn results_in_cache_dir(&self) -> bool {
        false
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let rows = self
            .pg
            .query(&self.pg.sql.snapshot, &[(&self.slot, Type::TEXT)])
            .map_err(|e| self.failed(e))?;
        let row = rows.first();
        let bytes = |i| row.and_then(|row| row.get::<_, Option<Vec<u8>>>(i));
        let result = self.found(bytes(0));
        let failure = bytes(1).and_then(|b| record::from_bytes(&b));
        let key_values = bytes(2).and_then(|b| serde_json::from_slice(&b).ok());
        let in_flight = row
            .and_then(|row| row.get::<_, Option<String>>(3))
            .map(|owner| owner::in_flight(owner.as_bytes()));
        let (count, held) = self
            .pg
            .with_conn(|conn| self.slot_rows(conn))
            .map_err(|e| self.failed(e))?;
        let slots = count.map(|count| Slots {
            count,
            in_use: held
                .iter()
                .filter(|(index, _)| *index < count)
                .map(|(index, owner)| (*index, owner::in_flight(owner.as_bytes())))
                .collect(),
            waiters: None,
        });
        Ok(Snapshot {
            result,
            in_flight,
            failure,
            key_values,
            service: None,
            slots,
            last_exclusive: None,
        })
    }

    /// Drops this machine's local copy first, then takes the lock (waiting for a run
    /// in flight) and deletes the slot's row.
    fn clear(&self, _: &Name, say: &Say) -> Result<Cleared> {
        self.mirror().forget();
        let fail = |e| self.failed(e);
        let mut said = false;
        let token = loop {
            if let Some((token, _)) = self.take().map_err(fail)? {
                break token;
            }
            if !said {
                say.warn(format_args!(
                    "{}: a run is in flight; waiting for it to end before clearing",
                    self.slot
                ));
                said = true;
            }
            self.wait_released(CLEAR_WAIT)?;
        };
        let rows = self
            .pg
            .query(
                &self.pg.sql.clear,
                &[(&self.slot, Type::TEXT), (&token, Type::INT8)],
            )
            .map_err(fail)?;
        let row = rows.first();
        let held = row.is_some_and(|row| row.get::<_, i64>(0) > 0);
        if !held {
            let message = format!(
                "{}: the PostgreSQL lock was lost while clearing (its lease expired); try again",
                self.slot
            );
            return Err(Exit::new(Status::Internal, message).into());
        }
        let flag = |i| {
            row.and_then(|row| row.get::<_, Option<bool>>(i))
                .unwrap_or(false)
        };
        let removed: Vec<&'static str> = [(1, "result"), (2, "failure record"), (3, "key values")]
            .into_iter()
            .filter(|(i, _)| flag(*i))
            .map(|(_, what)| what)
            .collect();
        Ok(if removed.is_empty() {
            Cleared::Nothing
        } else {
            Cleared::Removed(removed)
        })
    }

    /// Removes the slot's row when nothing was written to it for `older_than` (by the
    /// server's clock) and no run holds its lock.
    fn clear_older(&self, name: &Name, older_than: Duration, say: &Say) -> Result<Cleared> {
        let _ = (name, say);
        let secs = older_than.as_secs_f64();
        let rows = self
            .pg
            .query(
                &self.pg.sql.clear_older,
                &[(&self.slot, Type::TEXT), (&secs, Type::FLOAT8)],
            )
            .map_err(|e| self.failed(e))?;
        let Some(row) = rows.first() else {
            return Ok(Cleared::Nothing);
        };
        // The server holds no result now: nor does this machine's copy.
        self.mirror().forget();
        let removed: Vec<&'static str> = [(0, "result"), (1, "failure record"), (2, "key values")]
            .into_iter()
            .filter(|(i, _)| row.get::<_, bool>(*i))
            .map(|(_, what)| what)
            .collect();
        Ok(Cleared::Removed(removed))
    }
}

/// A held lock: its session is the keeper's, which does the writes.
struct PgHeld {
    /// The slot's local copy, kept of a result stored under this lock.
    mirror: Mirror,
    slot: String,
    token: i64,
    keeper: Option<Keeper>,
    abort: Arc<Abort>,
    env: [(OsString, OsString); 1],
    handed_over: bool,
    forgetting_failure: Cell<bool>,
    /// Which run slot of `--slots` (0: the NAME's own lock).
    index: u32,
    /// The run record of a run slot other than the first.
    run: Option<std::path::PathBuf>,
}

impl PgHeld {
    fn write(&self, op: Op) -> Result<bool, PgError> {
        match &self.keeper {
            Some(keeper) => keeper.write(op),
            None => Err(PgError::new("the lock was let go")),
        }
    }
}

impl Lock for PgHeld {
    /// Stores the result and releases the lock in one statement, if the lease is still
    /// ours; the release notifies the waiters.
    fn save_result(
        &self,
        stdout: EntryWriter,
        stderr: &[u8],
        meta: &Meta,
    ) -> Result<Body, Unsaved> {
        let bytes = crate::backend::stdout_in_memory(stdout)?;
        // The run's stderr, cut to what is left of the limit after stdout.
        let room = MAX_VALUE.saturating_sub(entry::encoded_len(bytes.len() as u64, 0, meta));
        let stderr = entry::fit_stderr(stderr, room);
        let value = entry::to_bytes(&bytes, &stderr, meta);
        let out = Body::in_memory(bytes);
        if value.len() as u64 > MAX_VALUE {
            return Err(Unsaved {
                reason: format!(
                    "the result is {} bytes, over the PostgreSQL backend's limit of {MAX_VALUE}",
                    value.len()
                ),
                body: out,
            });
        }
        let op = Op::Result {
            value: value.clone(),
            forget: self.forgetting_failure.get(),
        };
        match self.write(op) {
            Ok(true) => {
                self.forgetting_failure.set(false);
                // Stored: the copy is of the result as the server now holds it.
                self.mirror.keep(0, &value);
                Ok(out)
            }
            Ok(false) => Err(Unsaved {
                reason: "the PostgreSQL lock was lost before the result could be stored (its \
                         lease expired); nothing was stored"
                    .to_owned(),
                body: out,
            }),
            Err(e) => Err(Unsaved {
                reason: format!("{e}; nothing was stored"),
                body: out,
            }),
        }
    }

    fn save_failure(&self, failure: &Failure) -> Result<()> {
        let stored = self
            .write(Op::Failure(record::to_bytes(failure)))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if !stored {
            anyhow::bail!("the PostgreSQL lock was lost (its lease expired)");
        }
        Ok(())
    }

    fn forget_failure(&self) {
        self.forgetting_failure.set(true);
    }

    fn save_key_values(&self, bytes: &[u8]) {
        let _ = self.write(Op::KeyValues(bytes.to_vec()));
    }

    fn run_record(&self) -> Option<&std::path::Path> {
        self.run.as_deref()
    }

    fn slot_index(&self) -> u32 {
        self.index
    }

    fn env(&self) -> &[(OsString, OsString)] {
        &self.env
    }

    fn abort(&self) -> Option<&Abort> {
        Some(&self.abort)
    }

    fn refresher_arg(&self) -> OsString {
        let handover = LeaseHandover {
            lease: self.token,
            token: self.token,
        };
        format!("--refresher-lease={handover}").into()
    }

    fn hand_over(mut self: Box<Self>, _: std::process::Child) {
        if let Some(keeper) = self.keeper.take() {
            keeper.stop();
        }
        self.handed_over = true;
    }
}

impl Drop for PgHeld {
    fn drop(&mut self) {
        if !self.handed_over && self.abort.reason().is_none() {
            let forget = self.forgetting_failure.get();
            let _ = self.write(Op::Release { forget });
        }
        let _ = &self.slot;
        if let Some(keeper) = self.keeper.take() {
            keeper.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy's source names the server, database and schema, whatever the URL's user
    /// or TLS parameters, and no password can be in it (a URL with one is refused).
    #[test]
    fn a_copys_source_names_the_server_database_and_schema_only() {
        let source = |url: &str, schema: &str| {
            let url = PgUrl::parse(url).unwrap();
            let (_, dbname) = user_and_dbname(&url);
            copy_backend(&url, &dbname, &PgSchema::parse(schema).unwrap())
        };
        assert_eq!(
            source(
                "postgres://app@db.example:6543/jobs?sslmode=verify-full&sslrootcert=/ca.pem",
                "team"
            ),
            "postgres://db.example:6543/jobs schema team"
        );
        assert_eq!(
            source("postgres://other@db.example:6543/jobs", "team"),
            source(
                "postgres://app@db.example:6543/jobs?sslmode=disable",
                "team"
            ),
        );
        assert_eq!(
            source("postgres://app@[::1]/app?host=%2Frun%2Fpg", "s"),
            "postgres:///run/pg:5432/app schema s"
        );
        assert_eq!(
            source("postgres://app@[::1]:7/x", "s"),
            "postgres://[::1]:7/x schema s"
        );
        assert!(PgUrl::parse("postgres://app:secret@h/db").is_err());
    }
}
