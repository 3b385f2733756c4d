//! One NAME (or keyed slot) in etcd: its keys, reading its result and failure
//! record, taking and waiting for its lock, `status` and `clear`. A taken lock is a
//! [`FleetLock`].

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::Fleet;
use super::lock::FleetLock;
use crate::abort::Abort;
use crate::backend::mirror::{self, Mirror};
use crate::backend::owner;
use crate::backend::{
    Cleared, FENCING_TOKEN_ENV, Files, Held, InFlight, Place, Read, Slots, Snapshot,
};
use crate::entry::{self, Meta};
use crate::etcd::{
    Client, EtcdError, FencingToken, Keys, Lease, LeaseId, LeaseKeeper, Value, Wait, Write,
    default_lead,
};
use crate::exit::{Exit, Status};
use crate::key::SlotId;
use crate::record::{self, Failure};
use crate::say::Say;
use crate::store::Store;
use crate::values::{LeaseHandover, Name, Refresher};

/// How far in the future a result written by another machine may be dated and still
/// count as just written. Clocks kept by NTP agree far better than this; a reader
/// whose clock is behind the writer's must not take every new result for one "from
/// the future" (not fresh) and run the command again.
pub(super) const CLOCK_SKEW: Duration = Duration::from_secs(1);

/// How long `clear` waits for a run in flight between two looks at the lock.
const CLEAR_WAIT: Duration = Duration::from_secs(3600);

/// What one try at a run slot of `--slots` came to.
enum Try {
    /// This slot, with its lease and fencing token.
    Taken(u32, Lease, FencingToken),
    /// Every slot in force is in use, as read at this revision.
    AllInUse(i64),
    /// Another caller took the slot, or changed the N in force, first.
    Raced,
}

/// One slot of a NAME in etcd, with its files in the local cache dir; its held lock
/// keeps a copy.
#[derive(Clone)]
pub(super) struct FleetPlace {
    files: Rc<Files>,
    pub(super) fleet: Fleet,
    /// The slot, for messages and key names: `NAME` or `NAME@<key>`.
    name: SlotId,
    pub(super) keys: Keys,
    /// `<prefix><NAME>/`: every key of the NAME starts with it.
    name_prefix: Vec<u8>,
    /// The result a wait saw stored with the lock's release, for the next read.
    delivered: RefCell<Option<Value>>,
}

impl FleetPlace {
    pub(super) fn new(fleet: Fleet, store: Store, id: &SlotId) -> FleetPlace {
        FleetPlace {
            files: Rc::new(Files {
                paths: store.paths(id),
                store,
            }),
            keys: fleet.prefix.keys(id),
            name_prefix: [fleet.prefix.as_bytes(), id.to_string().as_bytes(), b"/"].concat(),
            name: id.clone(),
            fleet,
            delivered: RefCell::new(None),
        }
    }

    pub(super) fn client(&self) -> &Client {
        &self.fleet.client
    }

    /// An etcd failure before the command ran (a call's look, lock or wait).
    fn not_run(&self, error: EtcdError) -> anyhow::Error {
        let message = format!("{}: {error}; the command was not run", self.name);
        Exit::new(Status::Internal, message).into()
    }

    /// An etcd failure of `status` or `clear`.
    fn failed(&self, error: EtcdError) -> anyhow::Error {
        Exit::new(Status::Internal, format!("{}: {error}", self.name)).into()
    }

    /// The local copy of the result (see `mirror`): `NAME.fleet` in the cache dir, of
    /// this backend (endpoints, prefix) and the result's key.
    fn mirror(&self) -> Mirror {
        Mirror {
            store: self.files.store.clone(),
            name: self.name.name.clone(),
            path: mirror::path(&self.files.paths.result),
            source: mirror::source(&self.fleet.to_string(), &self.keys.result),
            skew: CLOCK_SKEW,
        }
    }

    /// The result, as a wait was handed it with the lock's release or else as etcd
    /// holds it now; either way the local copy is kept of it (or dropped with it).
    fn get_result(&self) -> Result<Read, EtcdError> {
        let value = match self.delivered.take() {
            Some(value) => Some(value),
            None => self.client().get(&self.keys.result)?,
        };
        match &value {
            Some(value) => self.mirror().keep(value.mod_revision, &value.bytes),
            None => self.mirror().forget(),
        }
        Ok(match value {
            None => Read::Missing,
            Some(value) => match entry::from_bytes(value.bytes) {
                Ok(entry) => Read::Found(entry),
                Err(invalid) => Read::Invalid(invalid),
            },
        })
    }

    fn get_failure(&self) -> Result<Option<Failure>, EtcdError> {
        let value = self.client().get(&self.keys.failure)?;
        Ok(value.and_then(|value| record::from_bytes(&value.bytes)))
    }

    fn owner(&self) -> Vec<u8> {
        owner::this_process().into_bytes()
    }

    fn take_lock(&self) -> Result<Option<(Lease, FencingToken)>, EtcdError> {
        let client = self.client();
        // Most callers of a herd lose: a look first saves them a grant and a revoke.
        if client.lock_holder(&self.keys.lock)?.is_some() {
            return Ok(None);
        }
        let lease = client.grant(self.fleet.lease_ttl)?;
        match client.try_lock(&self.keys.lock, lease.id, &self.owner()) {
            Ok(Some(token)) => Ok(Some((lease, token))),
            Ok(None) => {
                let _ = client.revoke(lease.id);
                Ok(None)
            }
            Err(e) => {
                let _ = client.revoke(lease.id);
                Err(e)
            }
        }
    }

    /// The key of run slot `index` of `--slots` (0: the NAME's own lock).
    fn slot_key(&self, index: u32) -> Vec<u8> {
        match index {
            0 => self.keys.lock.clone(),
            _ => [self.keys.lock.as_slice(), format!(".{index}").as_bytes()].concat(),
        }
    }

    /// Where the N in force of `--slots` is recorded.
    fn count_key(&self) -> Vec<u8> {
        [self.name_prefix.as_slice(), b"slots"].concat()
    }

    /// The N in force and the revision it was written at (0: none recorded).
    fn recorded_count(&self) -> Result<(Option<u32>, i64), EtcdError> {
        let value = self.client().get(&self.count_key())?;
        Ok(match value {
            Some(value) => {
                let count = std::str::from_utf8(&value.bytes)
                    .ok()
                    .and_then(|text| text.trim().parse().ok())
                    .filter(|n| *n > 0);
                (count, value.mod_revision)
            }
            None => (None, 0),
        })
    }

    /// One try at a run slot: the first free one of the N in force (the recorded N
    /// while any slot is held, else `slots`), taken in a transaction that also checks
    /// the recorded N is as read, with a lease of its own.
    fn try_slot(&self, slots: u32) -> Result<Try, EtcdError> {
        let (count, count_revision) = self.recorded_count()?;
        let (holders, seen) = self.client().holders(&self.keys.lock)?;
        let count = match count {
            Some(count) if !holders.is_empty() => count,
            _ => slots,
        };
        let held = |key: &[u8]| holders.iter().any(|(held, _)| held == key);
        let Some(index) = (0..count).find(|index| !held(&self.slot_key(*index))) else {
            return Ok(Try::AllInUse(seen));
        };
        // A lease of its own for each try: one granted before a long wait would expire.
        let client = self.client();
        let lease = client.grant(self.fleet.lease_ttl)?;
        let taken = client.try_lock_slot(
            &self.slot_key(index),
            lease.id,
            &self.owner(),
            &self.count_key(),
            count_revision,
            format!("{count}\n").as_bytes(),
        );
        match taken {
            Ok(Some(token)) => Ok(Try::Taken(index, lease, token)),
            // Lost a race for the slot or the count: look again at once.
            Ok(None) => {
                let _ = client.revoke(lease.id);
                Ok(Try::Raced)
            }
            Err(e) => {
                let _ = client.revoke(lease.id);
                Err(e)
            }
        }
    }

    /// Holds a taken lock: its lease is renewed from now on, and a loss trips the
    /// run's abort.
    fn hold(&self, lease: Lease, token: FencingToken) -> Result<Held> {
        Ok(Box::new(self.hold_slot(lease, token)?))
    }

    /// [`FleetPlace::hold`], unboxed (a run slot of `--slots` is told its number).
    fn hold_slot(&self, lease: Lease, token: FencingToken) -> Result<FleetLock> {
        let abort = Arc::new(Abort::default());
        let mut held = FleetLock {
            client: self.client().clone(),
            keys: self.keys.clone(),
            max_value: self.fleet.max_value,
            mirror: self.mirror(),
            lease: lease.id,
            token,
            keeper: None,
            abort: abort.clone(),
            env: [(FENCING_TOKEN_ENV.into(), token.to_string().into())],
            handed_over: false,
            forgetting_failure: Cell::new(false),
            index: 0,
            run: None,
        };
        let keeper = LeaseKeeper::start(
            self.client().clone(),
            lease,
            default_lead(lease.ttl),
            move |lost| abort.trip(lost.why),
        );
        match keeper {
            Ok(keeper) => held.keeper = Some(keeper),
            Err(e) => {
                let message = format!("{}: cannot start the lease keeper: {e}", self.name);
                return Err(Exit::new(Status::Internal, message).into());
            }
        }
        Ok(held)
    }

    /// The lock of a `--background` caller: still held with the lease and token it
    /// handed over, renewed from now on.
    fn adopt(&self, handover: LeaseHandover) -> Result<Held> {
        let id = LeaseId(handover.lease);
        let token = FencingToken(handover.token);
        let sent = Instant::now();
        let client = self.client();
        let ttl = client.keep_alive(id).map_err(|e| self.not_run(e))?;
        let holder = client
            .lock_holder(&self.keys.lock)
            .map_err(|e| self.not_run(e))?;
        if ttl.is_zero() || holder.is_none_or(|h| (h.lease, h.token) != (id, token)) {
            let message = format!(
                "{}: the etcd lock handed to the refresher is no longer held with lease {id}; \
                 the command was not run",
                self.name
            );
            return Err(Exit::new(Status::Internal, message).into());
        }
        let lease = Lease {
            id,
            ttl,
            granted_at: sent,
        };
        let held = self.hold(lease, token)?;
        // `status` shows who runs it: the refresher now, not the caller that started it.
        let owner = self.owner();
        let rewrite = [Write::PutLeased {
            key: &self.keys.lock,
            value: &owner,
            lease: id,
        }];
        let _ = client.write_if_holder(&self.keys.lock, token, &rewrite);
        Ok(held)
    }
}

impl Place for FleetPlace {
    fn files(&self) -> &Files {
        &self.files
    }

    fn clock_skew(&self) -> Duration {
        CLOCK_SKEW
    }

    fn exists(&self) -> Result<bool> {
        Ok(true)
    }

    fn result_location(&self) -> String {
        format!("etcd key {}", String::from_utf8_lossy(&self.keys.result))
    }

    fn read_mirror(&self) -> Option<entry::Entry> {
        self.mirror().read()
    }

    fn read_result(&self) -> Result<Read> {
        self.get_result().map_err(|e| self.not_run(e))
    }

    fn read_failure(&self) -> Result<Option<Failure>> {
        self.get_failure().map_err(|e| self.not_run(e))
    }

    /// Takes the lock: a lease, then the lock key attached to it if nobody holds it.
    fn try_lock(&self) -> Result<Option<Held>> {
        self.take_lock()
            .map_err(|e| self.not_run(e))?
            .map(|(lease, token)| self.hold(lease, token))
            .transpose()
    }

    /// Takes a lease, then tries the slots; while all are in use, watches them all
    /// for a release (see [`Client::wait_any_released`]).
    fn lock_slot_within(&self, slots: u32, limit: Duration) -> Result<Option<Held>> {
        let deadline = crate::values::later(Instant::now(), limit);
        let client = self.client();
        let (index, lease, token) = loop {
            let seen = match self.try_slot(slots).map_err(|e| self.not_run(e))? {
                Try::Taken(index, lease, token) => break (index, lease, token),
                Try::AllInUse(seen) => Some(seen),
                Try::Raced => None,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            if let Some(seen) = seen {
                client
                    .wait_any_released(&self.keys.lock, seen, left)
                    .map_err(|e| self.not_run(e))?;
            }
        };
        let mut slot = self.clone();
        slot.keys.lock = self.slot_key(index);
        let mut held = slot.hold_slot(lease, token)?;
        held.index = index;
        if index > 0 {
            let paths = crate::backend::semaphore::slot_paths(&self.files.paths, index);
            held.run = Some(paths.run);
        }
        Ok(Some(Box::new(held)))
    }

    /// Watches the result too: a run's result comes with its release, and the read
    /// that follows takes it from there.
    fn wait_released(&self, limit: Duration) -> Result<bool> {
        let wait = self
            .client()
            .wait_for_release(&self.keys.lock, Some(&self.keys.result), limit)
            .map_err(|e| self.not_run(e))?;
        Ok(match wait {
            Wait::Held => false,
            Wait::Released { value } => {
                self.delivered.replace(value);
                true
            }
        })
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let result = self.get_result().map_err(|e| self.failed(e))?;
        let failure = self.get_failure().map_err(|e| self.failed(e))?;
        let holder = self
            .client()
            .lock_holder(&self.keys.lock)
            .map_err(|e| self.failed(e))?;
        let in_flight = holder.map(|holder| owner::in_flight(&holder.owner));
        let slots = match self.recorded_count().map_err(|e| self.failed(e))?.0 {
            Some(count) => {
                let (holders, _) = self
                    .client()
                    .holders(&self.keys.lock)
                    .map_err(|e| self.failed(e))?;
                let mut in_use: Vec<(u32, InFlight)> = (0..count)
                    .filter_map(|index| {
                        let key = self.slot_key(index);
                        let (_, holder) = holders.iter().find(|(held, _)| *held == key)?;
                        Some((index, owner::in_flight(&holder.owner)))
                    })
                    .collect();
                in_use.sort_by_key(|(index, _)| *index);
                Some(Slots {
                    count,
                    in_use,
                    waiters: None,
                })
            }
            None => None,
        };
        let key_values = self
            .client()
            .get(&self.keys.key)
            .map_err(|e| self.failed(e))?
            .and_then(|value| serde_json::from_slice(&value.bytes).ok());
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

    /// Takes the lock (waiting for a run in flight), then deletes the result, the
    /// failure record and the lock in one guarded transaction.
    fn clear(&self, _: &Name, say: &Say) -> Result<Cleared> {
        self.mirror().forget();
        let client = self.client();
        let fail = |e| self.failed(e);
        if client.list(&self.name_prefix).map_err(fail)?.is_empty() {
            return Ok(Cleared::Nothing);
        }
        let mut said = false;
        let (lease, token) = loop {
            if let Some(taken) = self.take_lock().map_err(fail)? {
                break taken;
            }
            if !said {
                say.warn(format_args!(
                    "{}: a run is in flight; waiting for it to end before clearing",
                    self.name
                ));
                said = true;
            }
            client
                .wait_released(&self.keys.lock, CLEAR_WAIT)
                .map_err(fail)?;
        };
        let cleared = (|| {
            let keys = client.list(&self.name_prefix)?;
            let removed: Vec<&'static str> = [
                (&self.keys.result, "result"),
                (&self.keys.failure, "failure record"),
                (&self.keys.key, "key values"),
            ]
            .into_iter()
            .filter(|(key, _)| keys.contains(key))
            .map(|(_, what)| what)
            .collect();
            let writes = [
                Write::Delete {
                    key: &self.keys.result,
                },
                Write::Delete {
                    key: &self.keys.failure,
                },
                Write::Delete {
                    key: &self.keys.key,
                },
                Write::Delete {
                    key: &self.keys.lock,
                },
            ];
            let done = client.write_if_holder(&self.keys.lock, token, &writes)?;
            Ok((done, removed))
        })();
        let _ = client.revoke(lease.id);
        let (done, removed) = cleared.map_err(fail)?;
        if !done {
            let message = format!(
                "{}: the etcd lock was lost while clearing (its lease expired); try again",
                self.name
            );
            return Err(Exit::new(Status::Internal, message).into());
        }
        Ok(if removed.is_empty() {
            Cleared::Nothing
        } else {
            Cleared::Removed(removed)
        })
    }

    unsafe fn take_handed(&self, handover: Refresher) -> Result<Option<Held>> {
        match handover {
            Refresher::Lease(lease) => self.adopt(lease).map(Some),
            Refresher::Fd(fd) => Err(Exit::new(
                Status::Internal,
                format!("--refresher={fd} (internal): a lock file is handed over only with the cache dir backend"),
            )
            .into()),
        }
    }

    /// How much stdout fits in one value next to the header and `meta`.
    fn room_for_body(&self, meta: &Meta) -> Option<u64> {
        Some(
            self.fleet
                .max_value
                .saturating_sub(entry::encoded_len(0, 0, meta)),
        )
    }

    fn value_limit(&self) -> Option<u64> {
        Some(self.fleet.max_value)
    }

    fn results_in_cache_dir(&self) -> bool {
        false
    }
}
