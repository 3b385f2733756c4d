//! The etcd client against a real etcd (Debian's etcd-server on loopback ports): the
//! lock is exclusive, fencing tokens only grow, a holder that lost its lease writes
//! nothing, the lease keeper notices a frozen etcd, and no call hangs.
#![cfg(all(unix, feature = "etcd"))]

use crate::common;

use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::PATIENCE;
use common::etcd::{Etcd, Options};
use singleflight::etcd_client as entry;
use singleflight::etcd_client::{
    self as etcd, Client, Credentials, Endpoints, EtcdError, FencingToken, LeaseKeeper, LeaseLost,
    Meta, Name, Prefix, Security, TlsFiles, Value, Wait, Write,
};

const LEASE_TTL: Duration = Duration::from_secs(10);

fn client(url: &str, timeout: Duration) -> Client {
    Client::new(Endpoints::parse(url).expect("a valid URL"), timeout)
}

/// Runs `call` on a thread and fails the test if it does not return within
/// [`PATIENCE`]: a hang is the bug these tests look for.
fn within_patience<T: Send + 'static>(what: &str, call: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let _ = sender.send(call());
    });
    receiver
        .recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("{what} hung"))
}

#[test]
fn of_many_leases_racing_for_a_lock_exactly_one_wins() {
    let Some(etcd) = Etcd::start() else { return };
    let client = client(&etcd.url(), etcd::DEFAULT_TIMEOUT);
    let key = b"/t/race/lock";
    let racers = 8;
    let barrier = Arc::new(Barrier::new(racers));
    let threads: Vec<_> = (0..racers)
        .map(|i| {
            let (client, barrier) = (client.clone(), barrier.clone());
            thread::spawn(move || {
                let lease = client.grant(LEASE_TTL).expect("grant");
                barrier.wait();
                let token = client
                    .try_lock(key, lease.id, format!("racer {i}").as_bytes())
                    .expect("try_lock");
                (lease, token)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<_> = results
        .iter()
        .filter(|(_, token)| token.is_some())
        .collect();
    assert_eq!(winners.len(), 1, "exactly one winner: {results:?}");
    let (lease, token) = winners[0];
    let token = token.unwrap();

    let holder = client.lock_holder(key).unwrap().expect("held");
    assert_eq!((holder.lease, holder.token), (lease.id, token));
    assert!(String::from_utf8_lossy(&holder.owner).starts_with("racer "));

    // Asking again with the winning lease (a retry whose first answer was lost)
    // gives the same token; any other lease still loses.
    assert_eq!(
        client.try_lock(key, lease.id, b"again").unwrap(),
        Some(token)
    );
    for (other, _) in results.iter().filter(|(l, _)| l.id != lease.id) {
        assert_eq!(client.try_lock(key, other.id, b"x").unwrap(), None);
    }
    // Only the holder's token releases it.
    assert!(!client.release(key, FencingToken(token.0 + 1)).unwrap());
    assert!(client.lock_holder(key).unwrap().is_some());
    assert!(client.release(key, token).unwrap());
    assert_eq!(client.lock_holder(key).unwrap(), None);
}

#[test]
fn fencing_tokens_strictly_increase_across_holders() {
    let Some(etcd) = Etcd::start() else { return };
    let client = client(&etcd.url(), etcd::DEFAULT_TIMEOUT);
    let key = b"/t/fence/lock";
    let mut tokens = Vec::new();
    for holder in 0..6 {
        let lease = client.grant(LEASE_TTL).unwrap();
        let token = client
            .try_lock(key, lease.id, b"holder")
            .unwrap()
            .expect("free lock is taken");
        assert_eq!(client.lock_holder(key).unwrap().unwrap().token, token);
        tokens.push(token);
        // Unrelated writes between holders move the revision on; the lock goes by
        // release, by revoking the lease, or by a guarded write that releases it.
        let result = b"/t/fence/result";
        match holder % 3 {
            0 => assert!(client.release(key, token).unwrap()),
            1 => client.revoke(lease.id).unwrap(),
            _ => assert!(
                client
                    .write_if_holder(
                        key,
                        token,
                        &[
                            Write::Put {
                                key: result,
                                value: b"r"
                            },
                            Write::Delete { key }
                        ]
                    )
                    .unwrap()
            ),
        }
        assert_eq!(client.lock_holder(key).unwrap(), None);
    }
    assert!(
        tokens.windows(2).all(|pair| pair[0] < pair[1]),
        "tokens: {tokens:?}"
    );
}

#[test]
fn a_holder_that_lost_its_lease_writes_nothing() {
    let Some(etcd) = Etcd::start() else { return };
    let client = client(&etcd.url(), etcd::DEFAULT_TIMEOUT);
    let (lock, result) = (&b"/t/lost/lock"[..], &b"/t/lost/result"[..]);

    let a = client.grant(LEASE_TTL).unwrap();
    let a_token = client.try_lock(lock, a.id, b"a").unwrap().unwrap();
    assert!(client.put_if_holder(result, b"a1", lock, a_token).unwrap());
    client.revoke(a.id).unwrap();
    assert!(!client.put_if_holder(result, b"a2", lock, a_token).unwrap());
    assert!(!client.delete_if_holder(result, lock, a_token).unwrap());
    assert_eq!(client.get(result).unwrap().unwrap().bytes, b"a1");

    let b = client.grant(LEASE_TTL).unwrap();
    let b_token = client.try_lock(lock, b.id, b"b").unwrap().unwrap();
    assert!(b_token > a_token);
    assert!(client.put_if_holder(result, b"b", lock, b_token).unwrap());
    // A's token is stale while B holds the lock: refused, and B's lock stays.
    assert!(!client.put_if_holder(result, b"a3", lock, a_token).unwrap());
    assert!(!client.release(lock, a_token).unwrap());
    assert_eq!(client.get(result).unwrap().unwrap().bytes, b"b");
    assert_eq!(client.lock_holder(lock).unwrap().unwrap().token, b_token);
    assert!(client.release(lock, b_token).unwrap());

    // A lease that simply expires (nobody keeps it alive) frees the lock as well.
    let c = client.grant(Duration::from_secs(2)).unwrap();
    let c_token = client.try_lock(lock, c.id, b"c").unwrap().unwrap();
    assert!(
        client.wait_released(lock, PATIENCE).unwrap(),
        "the lock of an expired lease is freed"
    );
    assert!(!client.put_if_holder(result, b"c", lock, c_token).unwrap());
    assert_eq!(client.get(result).unwrap().unwrap().bytes, b"b");
    assert_eq!(client.keep_alive(c.id).unwrap(), Duration::ZERO);
}

#[test]
fn the_keeper_keeps_a_lease_alive_and_reports_when_etcd_freezes() {
    let Some(etcd) = Etcd::start() else { return };
    let client = client(&etcd.url(), Duration::from_millis(500));
    let ttl = Duration::from_secs(3);
    let lease = client.grant(ttl).unwrap();
    let lock = b"/t/keeper/lock";
    let token = client.try_lock(lock, lease.id, b"k").unwrap().unwrap();
    let (lost_tx, lost) = mpsc::channel::<(LeaseLost, Instant)>();
    let keeper = LeaseKeeper::start(
        client.clone(),
        lease,
        etcd::default_lead(lease.ttl),
        move |why| {
            let _ = lost_tx.send((why, Instant::now()));
        },
    )
    .unwrap();

    // Three TTLs later the lease and the lock are still there: renewals got through.
    thread::sleep(3 * ttl);
    assert!(lost.try_recv().is_err(), "no loss while etcd answers");
    assert_eq!(client.lock_holder(lock).unwrap().unwrap().token, token);

    etcd.pause(0);
    let frozen_at = Instant::now();
    let (why, at) = lost
        .recv_timeout(ttl + PATIENCE)
        .expect("the keeper reports the loss");
    let after = at.duration_since(frozen_at);
    eprintln!(
        "lease loss reported {after:?} after etcd froze (ttl {ttl:?}): {}",
        why.why
    );
    assert_eq!(why.lease, lease.id);
    assert!(why.why.contains("no renewal"), "{}", why.why);
    etcd.resume(0);
    keeper.stop();
}

#[test]
fn the_keeper_reports_a_revoked_lease_and_a_stopped_keeper_reports_nothing() {
    let Some(etcd) = Etcd::start() else { return };
    let client = client(&etcd.url(), etcd::DEFAULT_TIMEOUT);

    let lease = client.grant(Duration::from_secs(3)).unwrap();
    let (lost_tx, lost) = mpsc::channel();
    let _keeper = LeaseKeeper::start(
        client.clone(),
        lease,
        etcd::default_lead(lease.ttl),
        move |why| {
            let _ = lost_tx.send(why);
        },
    )
    .unwrap();
    client.revoke(lease.id).unwrap();
    let why = lost.recv_timeout(PATIENCE).expect("loss reported");
    assert!(why.why.contains("expired"), "{}", why.why);

    let lease = client.grant(Duration::from_secs(3)).unwrap();
    let (lost_tx, lost) = mpsc::channel::<LeaseLost>();
    let keeper = LeaseKeeper::start(
        client.clone(),
        lease,
        etcd::default_lead(lease.ttl),
        move |why| {
            let _ = lost_tx.send(why);
        },
    )
    .unwrap();
    within_patience("stopping the keeper", move || keeper.stop());
    // The thread ended without calling back: the sender is gone, nothing was sent.
    assert!(matches!(lost.recv(), Err(mpsc::RecvError)));
    assert!(client.keep_alive(lease.id).unwrap() > Duration::ZERO);
}

#[test]
fn a_call_to_a_frozen_or_dead_etcd_ends_with_an_error() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let timeout = Duration::from_millis(500);
    let client = client(&etcd.url(), timeout);
    client.get(b"/t/warm").unwrap();

    etcd.pause(0);
    let frozen = client.clone();
    let (get, grant, lock) = within_patience("calls to a frozen etcd", move || {
        (
            frozen.get(b"/t/x"),
            frozen.grant(LEASE_TTL),
            frozen.try_lock(b"/t/x", etcd::LeaseId(1), b""),
        )
    });
    for error in [get.err(), grant.err(), lock.err()] {
        let error = error.expect("an error, not an answer");
        assert!(matches!(error, EtcdError::Unreachable { .. }), "{error}");
        assert!(
            error.to_string().contains("no answer within 500ms"),
            "{error}"
        );
    }
    etcd.resume(0);
    assert_eq!(client.get(b"/t/x").unwrap(), None, "answers again");

    etcd.kill(0);
    let dead = client.clone();
    let error = within_patience("a call to a dead etcd", move || dead.get(b"/t/x"))
        .expect_err("no etcd, no answer");
    assert!(
        error.to_string().contains(&etcd.addr(0)),
        "names the member: {error}"
    );
}

#[test]
fn the_client_moves_on_when_a_member_of_a_cluster_dies_or_hangs() {
    let Some(mut etcd) = Etcd::cluster(3) else {
        return;
    };
    let leader = etcd.wait_leader();
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;

    // A follower first in the list dies: the next call goes to the next member at once.
    let url = format!(
        "etcd://{},{},{}",
        etcd.addr(follower),
        etcd.addr(leader),
        etcd.addr(other)
    );
    let client = client(&url, etcd::DEFAULT_TIMEOUT);
    let lease = client.grant(LEASE_TTL).unwrap();
    let token = client
        .try_lock(b"/t/fail/lock", lease.id, b"")
        .unwrap()
        .unwrap();
    assert!(
        client
            .put_if_holder(b"/t/fail/result", b"one", b"/t/fail/lock", token)
            .unwrap()
    );
    etcd.kill(follower);
    assert_eq!(
        client.get(b"/t/fail/result").unwrap().unwrap().bytes,
        b"one"
    );
    assert!(
        client
            .put_if_holder(b"/t/fail/result", b"two", b"/t/fail/lock", token)
            .unwrap()
    );
    etcd.restart(follower);

    // A member that hangs (frozen, as behind a partition) costs one timeout, then the
    // next member answers.
    etcd.pause(follower);
    let hung_first = self::client(&url, Duration::from_millis(500));
    let value = within_patience("a call with a hung member first", move || {
        hung_first.get(b"/t/fail/result")
    });
    assert_eq!(value.unwrap().unwrap().bytes, b"two");
    etcd.resume(follower);

    // The leader, first in the list, dies: the others elect a new one; meanwhile a
    // call may fail (no leader), but it fails with an error and soon succeeds.
    let url = format!(
        "etcd://{},{},{}",
        etcd.addr(leader),
        etcd.addr(follower),
        etcd.addr(other)
    );
    let client = self::client(&url, etcd::DEFAULT_TIMEOUT);
    assert_eq!(
        client.get(b"/t/fail/result").unwrap().unwrap().bytes,
        b"two"
    );
    etcd.kill(leader);
    let start = Instant::now();
    let mut failures = Vec::new();
    let value = loop {
        let c = client.clone();
        match within_patience("a call during an election", move || {
            c.get(b"/t/fail/result")
        }) {
            Ok(value) => break value,
            Err(e) => failures.push(e.to_string()),
        }
        assert!(
            start.elapsed() < PATIENCE,
            "no answer after the leader died: {failures:?}"
        );
    };
    eprintln!(
        "after the leader was killed: first answer in {:?}, {} failed calls before",
        start.elapsed(),
        failures.len()
    );
    assert_eq!(value.unwrap().bytes, b"two");
    // Locks and guarded writes go through the new leader.
    let lease = client.grant(LEASE_TTL).unwrap();
    let token = client
        .try_lock(b"/t/fail/lock2", lease.id, b"")
        .unwrap()
        .expect("a free lock is taken");
    assert!(
        client
            .put_if_holder(b"/t/fail/result", b"three", b"/t/fail/lock2", token)
            .unwrap()
    );
    assert_ne!(etcd.wait_leader(), leader);
}

#[test]
fn a_result_up_to_the_limit_round_trips_and_etcd_refuses_far_larger_values() {
    let Some(etcd) = Etcd::start() else { return };
    let client = client(&etcd.url(), etcd::DEFAULT_TIMEOUT);
    let lease = client.grant(LEASE_TTL).unwrap();
    let lock = b"/t/big/lock";
    let token = client.try_lock(lock, lease.id, b"").unwrap().unwrap();

    let meta = Meta {
        argv_digest: entry::argv_digest(&["big".into()]),
        command: "big".into(),
        written_at_ms: entry::now_ms(SystemTime::now()),
        ttl_ms: 30_000,
        exit_code: 0,
        duration_ms: 1,
    };
    let overhead = entry::encoded_len(0, 0, &meta);
    let body: Vec<u8> = (0..etcd::DEFAULT_MAX_VALUE - overhead)
        .map(|i| (i % 251) as u8)
        .collect();
    let bytes = entry::to_bytes(&body, b"", &meta);
    assert_eq!(bytes.len() as u64, etcd::DEFAULT_MAX_VALUE);
    etcd::check_size(bytes.len() as u64, etcd::DEFAULT_MAX_VALUE).unwrap();
    assert!(
        etcd::check_size(bytes.len() as u64 + 1, etcd::DEFAULT_MAX_VALUE).is_err(),
        "one byte more is refused"
    );
    assert!(
        client
            .put_if_holder(b"/t/big/result", &bytes, lock, token)
            .unwrap()
    );
    let read = client.get(b"/t/big/result").unwrap().unwrap();
    let entry = entry::from_bytes(read.bytes).expect("a valid entry");
    let mut printed = Vec::new();
    entry.body.print(&mut printed).unwrap();
    assert!(printed == body, "the body comes back byte for byte");

    // Why the limit: etcd itself refuses a request over 1.5 MiB.
    let huge = vec![b'x'; 1600 << 10];
    let error = client
        .put_if_holder(b"/t/big/huge", &huge, lock, token)
        .expect_err("etcd refuses 1600 KiB");
    assert!(
        error.to_string().contains("request is too large"),
        "{error}"
    );
}

#[test]
fn names_are_listed_from_the_keys_under_the_prefix() {
    let Some(etcd) = Etcd::start() else { return };
    let client = client(&etcd.url(), etcd::DEFAULT_TIMEOUT);
    let prefix = Prefix::parse("/t/list").unwrap();
    let lease = client.grant(LEASE_TTL).unwrap();
    for name in ["b", "a", "c"] {
        let keys = prefix.keys(&Name::parse(name).unwrap());
        let token = client.try_lock(&keys.lock, lease.id, b"").unwrap().unwrap();
        if name != "c" {
            assert!(
                client
                    .put_if_holder(&keys.result, b"r", &keys.lock, token)
                    .unwrap()
            );
            assert!(client.release(&keys.lock, token).unwrap());
        }
    }
    // A neighbour prefix that starts the same way is not listed.
    let other = Prefix::parse("/t/list2")
        .unwrap()
        .keys(&Name::parse("z").unwrap());
    client
        .try_lock(&other.lock, lease.id, b"")
        .unwrap()
        .unwrap();

    let keys = client.list(prefix.as_bytes()).unwrap();
    let names: Vec<String> = prefix
        .slots(keys.iter().map(Vec::as_slice))
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
}

/// A client of a secured etcd: its TLS files and login.
fn secure_client(etcd: &Etcd, password: &str) -> Client {
    let certs = etcd.certs().expect("TLS is on");
    let security = Security {
        tls: TlsFiles {
            cacert: Some(certs.ca.clone()),
            ..TlsFiles::default()
        },
        credentials: Some(Credentials::new("root".into(), password.into())),
    };
    let endpoints = Endpoints::parse(&etcd.url()).expect("a valid URL");
    Client::with_security(endpoints, etcd::DEFAULT_TIMEOUT, &security).expect("TLS files")
}

/// A waiter is woken by a watch on the lock key: it is a watcher in etcd while it
/// waits (none would be if it polled), and returns when the lock is released, by a
/// delete or by the lease's revocation, however long its limit. A value stored in the
/// releasing transaction comes with the wake-up, with that transaction's revision; one
/// stored before the wait began, or deleted with the release, does not (the waiter
/// reads the key then).
#[test]
fn a_waiter_watches_the_lock_and_wakes_when_it_is_released() {
    let Some(etcd) = Etcd::with(1, Options::secure()) else {
        return;
    };
    let client = secure_client(&etcd, common::etcd::PASSWORD);
    let watchers = || etcd.metric(0, "etcd_debugging_mvcc_watcher_total");
    let (key, result): (&[u8], &[u8]) = (b"/t/watch/lock", b"/t/watch/result");
    let setup = client.grant(LEASE_TTL).unwrap();
    let token = client.try_lock(key, setup.id, b"setup").unwrap().unwrap();
    assert!(
        client
            .put_if_holder(result, b"from before the wait", key, token)
            .unwrap()
    );
    assert!(client.release(key, token).unwrap());
    let releases: [(&str, Option<&[u8]>); 4] = [
        ("delete", None),
        ("revoke", None),
        ("store-and-delete", Some(b"stored with the release")),
        ("delete-both", None),
    ];
    for (release, delivered) in releases {
        let lease = client.grant(LEASE_TTL).unwrap();
        let token = client.try_lock(key, lease.id, b"holder").unwrap().unwrap();
        let before = watchers();
        let waiter = client.clone();
        let (sender, woken) = mpsc::channel();
        thread::spawn(move || {
            let wait = waiter.wait_for_release(key, Some(result), Duration::from_secs(3600));
            let _ = sender.send(wait);
        });
        common::wait_until("the waiter watches the lock", || {
            watchers() == before.map(|n| n + 1.0)
        });
        assert!(woken.try_recv().is_err(), "woken while the lock is held");
        let lock_gone = Write::Delete { key };
        let mut stored_at = None;
        match release {
            "delete" => assert!(client.release(key, token).unwrap()),
            "revoke" => client.revoke(lease.id).unwrap(),
            "store-and-delete" => {
                let put = Write::Put {
                    key: result,
                    value: b"stored with the release",
                };
                stored_at = client
                    .write_if_holder_at(key, token, &[put, lock_gone])
                    .unwrap();
                assert!(stored_at.is_some(), "stored with the release");
            }
            _ => {
                let writes = [Write::Delete { key: result }, lock_gone];
                assert!(client.write_if_holder(key, token, &writes).unwrap());
            }
        }
        let wait = woken.recv_timeout(PATIENCE).expect("the waiter woke");
        let value = delivered.map(|bytes| Value {
            bytes: bytes.to_vec(),
            mod_revision: stored_at.expect("the revision it was stored at"),
        });
        assert_eq!(wait.unwrap(), Wait::Released { value }, "{release}");
    }
    // A lock that stays held: the wait ends at its limit, saying so.
    let key = b"/t/watch/held";
    let lease = client.grant(LEASE_TTL).unwrap();
    client.try_lock(key, lease.id, b"holder").unwrap().unwrap();
    let waiter = client.clone();
    let held = within_patience("a wait with a limit", move || {
        waiter.wait_released(key, Duration::from_millis(300))
    });
    assert!(!held.unwrap(), "still held at the limit");
}

/// etcd lets a login token expire (`--auth-token-ttl 2`, unused): the next request is
/// refused for it, and the client logs in again and repeats it, with no error. A
/// wrong password is a login error that names the user.
#[test]
fn an_expired_token_is_renewed_and_a_wrong_password_is_refused() {
    let options = Options {
        token_ttl: Some(2),
        ..Options::secure()
    };
    let Some(etcd) = Etcd::with(1, options) else {
        return;
    };
    let client = secure_client(&etcd, common::etcd::PASSWORD);
    let key = b"/t/token/key";
    assert_eq!(client.get(key).unwrap(), None);
    let expired = || etcd.log_text().matches("deleted a simple token").count();
    let before = expired();
    common::wait_until("etcd let the token expire", || expired() > before);
    let lease = client
        .grant(LEASE_TTL)
        .expect("grant after the token expired");
    let token = client
        .try_lock(key, lease.id, b"x")
        .unwrap()
        .expect("taken");
    assert!(
        client
            .put_if_holder(b"/t/token/v", b"v", key, token)
            .unwrap()
    );
    assert_eq!(client.get(b"/t/token/v").unwrap().unwrap().bytes, b"v");

    let wrong = secure_client(&etcd, "wrong");
    match wrong.get(key) {
        Err(e @ EtcdError::Login { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("\"root\"") && text.contains("authentication failed"),
                "{text}"
            );
        }
        other => panic!("a login error: {other:?}"),
    }
}
