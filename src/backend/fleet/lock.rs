//! A held etcd lock: what only its holder writes (the result, the failure record, the
//! key values), each guarded by its fencing token, and the lease that keeps it.

use std::cell::Cell;
use std::ffi::OsString;
use std::sync::Arc;

use anyhow::Result;

use crate::abort::Abort;
use crate::backend::mirror::Mirror;
use crate::backend::{Lock, Unsaved};
use crate::entry::{self, Body, EntryWriter, Meta};
use crate::etcd::{Client, FencingToken, Keys, LeaseId, LeaseKeeper, Write, check_size};
use crate::record::Failure;
use crate::values::LeaseHandover;

/// A held etcd lock: a lease renewed by a keeper, and the fencing token. Dropping it
/// stops the keeper and revokes the lease, which deletes the lock key if it is still
/// there.
pub(super) struct FleetLock {
    /// What the lock needs of its place, and no more: the client, the NAME's keys, the
    /// largest value etcd takes.
    pub(super) client: Client,
    pub(super) keys: Keys,
    pub(super) max_value: u64,
    /// The local copy of the NAME's result: kept of the result this lock stores, so
    /// that the caller that ran the command does not ask etcd for it at its next call.
    pub(super) mirror: Mirror,
    pub(super) lease: LeaseId,
    pub(super) token: FencingToken,
    pub(super) keeper: Option<LeaseKeeper>,
    pub(super) abort: Arc<Abort>,
    pub(super) env: [(OsString, OsString); 1],
    pub(super) handed_over: bool,
    /// The failure record is to go: with the result, in its transaction, or when the
    /// lock is let go without one.
    pub(super) forgetting_failure: Cell<bool>,
    /// Which run slot of `--slots` (0: the NAME's own lock, `slot.keys.lock` either way).
    pub(super) index: u32,
    /// The local run record of a run slot other than the first (`NAME.run.i`).
    pub(super) run: Option<std::path::PathBuf>,
}

impl Lock for FleetLock {
    /// Stores the result and releases the lock in one transaction, if the lock is
    /// still ours: waiters see the lock gone and the new result at the same revision.
    /// A failure record to forget goes in the same transaction (one round, one fsync,
    /// before the waiters are let go). A stored result is kept in the local copy with
    /// the transaction's revision (its mod_revision); one not stored keeps none.
    /// The output is read back from the local temp file (at most the value limit, see
    /// `Slot::output_cap`).
    /// stderr is stored after stdout in what is left of the value limit, cut short
    /// (with a line that says so) where it does not fit: stdout is the result.
    fn save_result(
        &self,
        stdout: EntryWriter,
        stderr: &[u8],
        meta: &Meta,
    ) -> Result<Body, Unsaved> {
        let bytes = crate::backend::stdout_in_memory(stdout)?;
        let room = self
            .max_value
            .saturating_sub(entry::encoded_len(bytes.len() as u64, 0, meta));
        let stderr = entry::fit_stderr(stderr, room);
        let value = entry::to_bytes(&bytes, &stderr, meta);
        let out = Body::in_memory(bytes);
        if let Err(too_large) = check_size(value.len() as u64, self.max_value) {
            return Err(Unsaved {
                reason: too_large.to_string(),
                body: out,
            });
        }
        let keys = &self.keys;
        let mut writes = vec![Write::Put {
            key: &keys.result,
            value: &value,
        }];
        if self.forgetting_failure.get() {
            writes.push(Write::Delete { key: &keys.failure });
        }
        writes.push(Write::Delete { key: &keys.lock });
        match self
            .client
            .write_if_holder_at(&keys.lock, self.token, &writes)
        {
            Ok(Some(revision)) => {
                self.forgetting_failure.set(false);
                self.mirror.keep(revision, &value);
                Ok(out)
            }
            Ok(None) => Err(Unsaved {
                reason: "the etcd lock was lost before the result could be stored (its lease \
                         expired or was revoked); nothing was stored"
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
        let bytes = crate::record::to_bytes(failure);
        let stored =
            self.client
                .put_if_holder(&self.keys.failure, &bytes, &self.keys.lock, self.token)?;
        if !stored {
            anyhow::bail!("the etcd lock was lost (its lease expired or was revoked)");
        }
        Ok(())
    }

    /// Deferred: done with the result's transaction, or else as the lock is let go.
    fn forget_failure(&self) {
        self.forgetting_failure.set(true);
    }

    /// Records the key values of a keyed slot (best effort: they are for `status`).
    fn save_key_values(&self, bytes: &[u8]) {
        let _ = self
            .client
            .put_if_holder(&self.keys.key, bytes, &self.keys.lock, self.token);
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
            lease: self.lease.0,
            token: self.token.0,
        };
        format!("--refresher-lease={handover}").into()
    }

    /// Stops renewing without revoking: the refresher renews the lease from now on.
    fn hand_over(mut self: Box<Self>, _: std::process::Child) {
        if let Some(keeper) = self.keeper.take() {
            keeper.stop();
        }
        self.handed_over = true;
    }
}

impl Drop for FleetLock {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.stop();
        }
        // A lease reported lost is gone, or etcd cannot be reached to revoke it.
        if !self.handed_over && self.abort.reason().is_none() {
            let client = &self.client;
            if self.forgetting_failure.get() {
                let keys = &self.keys;
                let _ = client.delete_if_holder(&keys.failure, &keys.lock, self.token);
            }
            let _ = client.revoke(self.lease);
        }
    }
}
