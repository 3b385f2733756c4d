//! The decision of every call, as pure functions of what is cached, whether the lock
//! was won and the options: no I/O, no clock. `flight` does what they say.

use std::time::Duration;

/// What the cache holds for this NAME and this argv, at the moment of looking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cached {
    /// No valid result of this argv (none, corrupt, or another command's).
    Missing,
    /// Younger than `--ttl`.
    Fresh,
    /// Older than `--ttl`; `age` is `None` when the result claims to be from the future.
    Stale { age: Option<Duration> },
}

impl Cached {
    /// A result of this argv that is present: fresh while younger than `ttl`.
    /// `age` is `None` when it claims to be from the future.
    pub fn of_present(age: Option<Duration>, ttl: Duration) -> Cached {
        match age {
            Some(age) if age < ttl => Cached::Fresh,
            age => Cached::Stale { age },
        }
    }

    /// Whether a caller that will not run the command may be served this result.
    fn servable_stale(self, max_stale: Option<Duration>) -> bool {
        match (self, max_stale) {
            (Cached::Fresh, _) => true,
            (Cached::Missing, _) => false,
            (Cached::Stale { .. }, None) => true,
            (Cached::Stale { age: Some(age) }, Some(max)) => age <= max,
            (Cached::Stale { age: None }, Some(_)) => false,
        }
    }
}

/// The options the decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub max_stale: Option<Duration>,
    pub retry_after: Duration,
}

/// Before any lock: a fresh hit is served, anything else goes for the lock.
#[derive(Debug, PartialEq, Eq)]
pub enum OnArrival {
    ServeFresh,
    TryLock,
    /// `--background`: make sure one detached refresher runs, then as `OnLost`.
    StartRefresher,
}

pub fn on_arrival(cached: Cached, background: bool) -> OnArrival {
    match (cached, background) {
        (Cached::Fresh, _) => OnArrival::ServeFresh,
        (_, false) => OnArrival::TryLock,
        (_, true) => OnArrival::StartRefresher,
    }
}

/// Holding the lock.
#[derive(Debug, PartialEq, Eq)]
pub enum OnWon {
    Run,
    /// No run: the lock is let go at once.
    Serve(NoRun),
}

/// Why a caller holding the lock runs nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum NoRun {
    /// Somebody refreshed it between our first look and the lock.
    Fresh,
    /// A run failed less than `--retry-after` ago: no new run. Serve the last good
    /// result if there is one, else give up.
    BackOff { serve: bool },
}

/// `failed_ago`: how long ago the last failed run of this argv ended, if any run since
/// the last good result failed.
pub fn on_won(cached: Cached, failed_ago: Option<Duration>, policy: Policy) -> OnWon {
    match (cached, failed_ago) {
        (Cached::Fresh, _) => OnWon::Serve(NoRun::Fresh),
        (_, Some(ago)) if ago < policy.retry_after => OnWon::Serve(NoRun::BackOff {
            serve: cached != Cached::Missing,
        }),
        _ => OnWon::Run,
    }
}

/// How far jitter moves a grown back-off: ±10%.
const JITTER: f64 = 0.1;

/// How long no run starts after the last of `consecutive` failed runs in a row.
/// Without `--retry-max`: `--retry-after`, as it always was. With it: `--retry-after`
/// doubled for each failure in a row after the first, capped at `retry_max`, moved by
/// `jitter` (in -1..=1, drawn once per failure and kept in its record, so that every
/// caller judges the same failure alike) times ±10%, and never past `retry_max`.
pub fn backoff(
    retry_after: Duration,
    retry_max: Option<Duration>,
    consecutive: u32,
    jitter: f64,
) -> Duration {
    let Some(max) = retry_max else {
        return retry_after;
    };
    let doublings = consecutive.saturating_sub(1);
    let grown = match 1u32.checked_shl(doublings) {
        Some(times) => retry_after.checked_mul(times).unwrap_or(max).min(max),
        None => max,
    };
    let factor = 1.0 + JITTER * jitter.clamp(-1.0, 1.0);
    grown.mul_f64(factor).min(max)
}

/// What the last `--service` instance did, as judged by the caller that holds the free
/// lock and found `--ready` not passing.
#[derive(Clone, Copy, Debug)]
pub struct ServiceHistory {
    /// Whether any instance was started before.
    pub started_before: bool,
    /// The last instance was up: passed `--ready` (without one: lived [`UP_AFTER`]).
    pub was_up: bool,
    /// How many instances started within `--start-window`.
    pub starts_in_window: usize,
    /// How long ago the crash loop's back-off began (the last failure; without one,
    /// the last start), if it did.
    pub since: Option<Duration>,
    /// The back-off from then.
    pub backoff: Duration,
}

/// An instance without `--ready` that lived this long was up: its end is a crash to
/// restart from at once, not a crash loop (supervisord's `startsecs` default).
pub const UP_AFTER: Duration = Duration::from_secs(1);

/// Why a `--service` NAME is in a crash loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashLoop {
    /// The last instance ended before it was up.
    NotUp,
    /// `--start-limit` instances started within `--start-window` already.
    TooManyStarts,
}

#[derive(Debug, PartialEq, Eq)]
pub enum OnServiceStart {
    /// The first instance.
    Start,
    /// The last instance was up and then ended: a new one at once.
    Restart,
    /// A crash loop whose back-off has passed: one more try.
    Retry(CrashLoop),
    /// A crash loop still backing off for this long.
    BackOff { left: Duration, why: CrashLoop },
}

/// systemd's `Restart=` with `StartLimitBurst=`/`StartLimitIntervalSec=`, on demand: an
/// instance that was up and ended is started again at once; one that ended before it
/// was up, or one more than `start_limit` within the window, is a crash loop, backed
/// off as a failed run is.
pub fn on_service_start(history: ServiceHistory, start_limit: u32) -> OnServiceStart {
    if !history.started_before {
        return OnServiceStart::Start;
    }
    let why = if history.starts_in_window >= start_limit as usize {
        CrashLoop::TooManyStarts
    } else if !history.was_up {
        CrashLoop::NotUp
    } else {
        return OnServiceStart::Restart;
    };
    match history.since {
        Some(ago) if ago < history.backoff => OnServiceStart::BackOff {
            left: history.backoff - ago,
            why,
        },
        _ => OnServiceStart::Retry(why),
    }
}

/// A jitter draw in -1..=1 from `seed` (the failure's time and pid): no random number
/// generator needed for ±10%.
pub fn jitter_from(seed: u64) -> f64 {
    // The top 53 bits of a well-mixed 64-bit value, as a fraction of 1.
    let mixed = xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes());
    (mixed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

/// Another caller holds the lock: a run is in flight.
#[derive(Debug, PartialEq, Eq)]
pub enum OnLost {
    ServeStale,
    Wait,
}

pub fn on_lost(cached: Cached, policy: Policy) -> OnLost {
    if cached.servable_stale(policy.max_stale) {
        OnLost::ServeStale
    } else {
        OnLost::Wait
    }
}

/// The in-flight run ended (or the wait ran out) and the cache was read again.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterWait {
    Serve,
    GiveUp,
}

/// `fresh_from_run`: the result was written by the run that was waited for, which
/// makes it servable whatever `--max-stale` says (that bounds only results served
/// while a run is in flight).
pub fn after_wait(cached: Cached, fresh_from_run: bool, policy: Policy) -> AfterWait {
    if cached != Cached::Missing && fresh_from_run || cached.servable_stale(policy.max_stale) {
        AfterWait::Serve
    } else {
        AfterWait::GiveUp
    }
}

/// At most this many trips back to the lock after waits that ended with nothing to
/// serve and no failure: a bound on the loop that the `--wait` deadline bounds too.
pub const MAX_RETRIES: u32 = 100;

/// What a call of the run form saw at its last step: what [`next`] decides from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The call arrived and read the cache.
    Arrived { cached: Cached },
    /// It holds the NAME's lock and read the cache again, and the last failed run of
    /// this argv, if one failed since the last good one.
    Won {
        cached: Cached,
        failed: Option<Failed>,
    },
    /// Another caller holds the lock: a run is in flight.
    Lost { cached: Cached },
    /// `--background`: it handed the lock to a detached refresher, or could not start
    /// one.
    RefresherStarted { cached: Cached, started: bool },
    /// The wait for the run in flight ended: `released` in time or not; what is cached
    /// now, and whether the run waited for wrote it.
    Waited {
        released: bool,
        cached: Cached,
        fresh_from_run: bool,
    },
    /// The run waited for left nothing to serve; why, as far as the call can tell.
    NothingLeft { why: Nothing },
    /// It queued for the lock for what was left of `--wait`: got it or not, and what is
    /// cached now.
    Queued {
        got: bool,
        cached: Cached,
        fresh_from_run: bool,
    },
}

/// The last failed run of this argv: how long ago it ended, and how long its back-off
/// is (by the call's `--retry-after` and `--retry-max`, and the failures in a row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failed {
    pub ago: Duration,
    pub backoff: Duration,
}

/// Why a run waited for left nothing to serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nothing {
    /// Our own refresher may have handed its unsaved result back through its pipe.
    HandedBack,
    /// The holder let go with no failure recorded (a `clear`, a run that was
    /// stopped): worth going back to the lock, for the `retries`th time.
    NoFailure { retries: u32 },
    /// The run failed, or this call cannot do better by going back: its own runs save
    /// nothing (a newer version's result is cached) or it started the refresher.
    Final,
}

/// What a call of the run form does next. `flight` carries out each step, and what it
/// sees there decides the one after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Print the result looked at last and exit with its status.
    Serve,
    /// Try the lock without blocking.
    TryLock,
    /// Holding the lock (queued for it): look again, as a caller that won it.
    LookAgain,
    /// Holding the lock: run the command in the foreground.
    Run,
    /// Holding the lock: hand it to a detached refresher (`--background`).
    StartRefresher,
    /// Holding the lock inside `--retry-after` of a failed run: no run; serve the last
    /// good result, or give up with nothing to serve.
    BackOff { serve: bool },
    /// Wait for the run in flight, for what is left of `--wait`.
    Wait,
    /// The run waited for left nothing: find out why.
    AskWhy,
    /// Read what our refresher handed back.
    TakeHandedBack,
    /// Queue for the lock itself (not back to `TryLock`: a `clear` in a loop could
    /// take every turn).
    Queue,
    /// Exit 75, or the refresher's error.
    GiveUp(GiveUp),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUp {
    /// `--wait` ran out with the run still in flight.
    WaitRanOut,
    /// The run waited for failed and nothing is cached.
    NothingProduced,
    /// The lock was let go [`MAX_RETRIES`] times with nothing to serve.
    TooManyRetries,
    /// No refresher could be started, and nothing is cached to serve meanwhile.
    NoRefresher,
}

/// The step after what was seen: the whole decision of the run form, one transition
/// at a time. `background`: `--background`, whose caller never runs the command.
pub fn next(seen: Seen, policy: Policy, background: bool) -> Step {
    let serve_or_wait = |cached: Cached| match on_lost(cached, policy) {
        OnLost::ServeStale => Step::Serve,
        OnLost::Wait => Step::Wait,
    };
    let served_after_wait =
        |cached, fresh_from_run| after_wait(cached, fresh_from_run, policy) == AfterWait::Serve;
    match seen {
        Seen::Arrived { cached } => match on_arrival(cached, background) {
            OnArrival::ServeFresh => Step::Serve,
            OnArrival::TryLock | OnArrival::StartRefresher => Step::TryLock,
        },
        Seen::Won { cached, failed } => match on_won(
            cached,
            failed.map(|f| f.ago),
            Policy {
                retry_after: failed.map_or(policy.retry_after, |f| f.backoff),
                ..policy
            },
        ) {
            OnWon::Serve(NoRun::Fresh) => Step::Serve,
            OnWon::Serve(NoRun::BackOff { serve }) => Step::BackOff { serve },
            OnWon::Run if background => Step::StartRefresher,
            OnWon::Run => Step::Run,
        },
        Seen::Lost { cached } => serve_or_wait(cached),
        Seen::RefresherStarted {
            cached,
            started: true,
        } => serve_or_wait(cached),
        Seen::RefresherStarted {
            cached,
            started: false,
        } => match on_lost(cached, policy) {
            OnLost::ServeStale => Step::Serve,
            OnLost::Wait => Step::GiveUp(GiveUp::NoRefresher),
        },
        Seen::Waited {
            released: false, ..
        } => Step::GiveUp(GiveUp::WaitRanOut),
        Seen::Waited {
            cached,
            fresh_from_run,
            ..
        } if served_after_wait(cached, fresh_from_run) => Step::Serve,
        Seen::Waited { .. } => Step::AskWhy,
        Seen::NothingLeft { why } => match why {
            Nothing::HandedBack => Step::TakeHandedBack,
            Nothing::NoFailure { retries } if retries >= MAX_RETRIES => {
                Step::GiveUp(GiveUp::TooManyRetries)
            }
            // A `--background` caller goes back as it came: for a refresher.
            Nothing::NoFailure { .. } if background => Step::TryLock,
            Nothing::NoFailure { .. } => Step::Queue,
            Nothing::Final => Step::GiveUp(GiveUp::NothingProduced),
        },
        Seen::Queued { got: false, .. } => Step::GiveUp(GiveUp::WaitRanOut),
        // A run that ended while this caller queued left what it waited for.
        Seen::Queued {
            cached,
            fresh_from_run,
            ..
        } if served_after_wait(cached, fresh_from_run && cached != Cached::Missing) => Step::Serve,
        Seen::Queued { .. } => Step::LookAgain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn policy(max_stale: Option<u64>) -> Policy {
        Policy {
            max_stale: max_stale.map(S),
            retry_after: S(30),
        }
    }

    fn stale(age: u64) -> Cached {
        Cached::Stale { age: Some(S(age)) }
    }

    #[test]
    fn classify_by_ttl_and_clock() {
        let ttl = S(30);
        assert_eq!(Cached::of_present(Some(S(29)), ttl), Cached::Fresh);
        assert_eq!(Cached::of_present(Some(S(30)), ttl), stale(30));
        // A timestamp in the future is not fresh.
        assert_eq!(Cached::of_present(None, ttl), Cached::Stale { age: None });
        // --ttl 0: never fresh.
        assert_eq!(Cached::of_present(Some(S(0)), S(0)), stale(0));
    }

    #[test]
    fn arrival() {
        assert_eq!(on_arrival(Cached::Fresh, false), OnArrival::ServeFresh);
        assert_eq!(on_arrival(Cached::Fresh, true), OnArrival::ServeFresh);
        assert_eq!(on_arrival(stale(40), false), OnArrival::TryLock);
        assert_eq!(on_arrival(Cached::Missing, false), OnArrival::TryLock);
        assert_eq!(on_arrival(stale(40), true), OnArrival::StartRefresher);
        assert_eq!(on_arrival(Cached::Missing, true), OnArrival::StartRefresher);
    }

    #[test]
    fn won() {
        let p = policy(None);
        assert_eq!(on_won(Cached::Fresh, None, p), OnWon::Serve(NoRun::Fresh));
        assert_eq!(
            on_won(Cached::Fresh, Some(S(1)), p),
            OnWon::Serve(NoRun::Fresh)
        );
        assert_eq!(on_won(stale(40), None, p), OnWon::Run);
        assert_eq!(on_won(Cached::Missing, None, p), OnWon::Run);
        assert_eq!(
            on_won(stale(40), Some(S(10)), p),
            OnWon::Serve(NoRun::BackOff { serve: true })
        );
        assert_eq!(
            on_won(Cached::Missing, Some(S(10)), p),
            OnWon::Serve(NoRun::BackOff { serve: false })
        );
        assert_eq!(on_won(stale(40), Some(S(30)), p), OnWon::Run);
        assert_eq!(on_won(Cached::Missing, Some(S(31)), p), OnWon::Run);
    }

    #[test]
    fn backoff_grows_geometrically_to_the_cap_and_jitters_within_it() {
        let ms = Duration::from_millis;
        // Without --retry-max: --retry-after, whatever the count and the draw.
        for n in [0, 1, 5, 100] {
            assert_eq!(backoff(S(30), None, n, 0.9), S(30));
        }
        let max = Some(S(60));
        let no_jitter: Vec<Duration> = (1..=8).map(|n| backoff(S(1), max, n, 0.0)).collect();
        assert_eq!(
            no_jitter,
            [S(1), S(2), S(4), S(8), S(16), S(32), S(60), S(60)]
        );
        // A record of before the count (0) is the first failure.
        assert_eq!(backoff(S(1), max, 0, 0.0), S(1));
        // ±10%, never past the cap.
        assert_eq!(backoff(S(10), max, 1, 1.0), S(11));
        assert_eq!(backoff(S(10), max, 1, -1.0), S(9));
        assert_eq!(backoff(S(10), max, 3, 1.0), S(44));
        assert_eq!(backoff(S(10), max, 4, 1.0), S(60));
        assert_eq!(backoff(S(10), max, 4, -1.0), S(54));
        assert_eq!(backoff(S(10), max, 4, 7.0), S(60), "a draw is clamped");
        // Huge counts and durations saturate instead of overflowing.
        assert_eq!(backoff(S(10), max, u32::MAX, 0.0), S(60));
        assert_eq!(backoff(S(u64::MAX / 2), max, 40, 0.0), S(60));
        // A cap below --retry-after caps the first wait too.
        assert_eq!(backoff(S(10), Some(ms(500)), 1, 0.0), ms(500));
    }

    #[test]
    fn a_service_that_was_up_restarts_at_once_and_a_crash_loop_backs_off() {
        let history = |was_up, starts_in_window, since: Option<u64>| ServiceHistory {
            started_before: true,
            was_up,
            starts_in_window,
            since: since.map(S),
            backoff: S(30),
        };
        let first = ServiceHistory {
            started_before: false,
            ..history(false, 9, Some(0))
        };
        assert_eq!(on_service_start(first, 5), OnServiceStart::Start);
        // Up, then killed 0s ago, with a failure record: at once.
        let restart = on_service_start(history(true, 1, Some(0)), 5);
        assert_eq!(restart, OnServiceStart::Restart);
        let left = |left, why| OnServiceStart::BackOff { left: S(left), why };
        let not_up = on_service_start(history(false, 1, Some(1)), 5);
        assert_eq!(not_up, left(29, CrashLoop::NotUp));
        let too_many = on_service_start(history(true, 5, Some(10)), 5);
        assert_eq!(too_many, left(20, CrashLoop::TooManyStarts));
        let under = on_service_start(history(true, 4, Some(10)), 5);
        assert_eq!(under, OnServiceStart::Restart);
        // The back-off has passed, or there is none (an instance that exited 0).
        let passed = on_service_start(history(false, 1, Some(30)), 5);
        assert_eq!(passed, OnServiceStart::Retry(CrashLoop::NotUp));
        let none = on_service_start(history(false, 1, None), 5);
        assert_eq!(none, OnServiceStart::Retry(CrashLoop::NotUp));
    }

    #[test]
    fn jitter_draws_spread_over_the_range() {
        let draws: Vec<f64> = (0..1000).map(jitter_from).collect();
        assert!(draws.iter().all(|d| (-1.0..=1.0).contains(d)));
        assert!(draws.iter().any(|&d| d < -0.8) && draws.iter().any(|&d| d > 0.8));
        assert_eq!(jitter_from(42), jitter_from(42));
    }

    #[test]
    fn lost_and_after_wait() {
        for (cached, max_stale, servable) in [
            (Cached::Fresh, None, true),
            (stale(1000), None, true),
            (stale(10), Some(10), true),
            (stale(11), Some(10), false),
            (Cached::Stale { age: None }, None, true),
            (Cached::Stale { age: None }, Some(10), false),
            (Cached::Missing, None, false),
        ] {
            let p = policy(max_stale);
            let (lost, after) = if servable {
                (OnLost::ServeStale, AfterWait::Serve)
            } else {
                (OnLost::Wait, AfterWait::GiveUp)
            };
            assert_eq!(on_lost(cached, p), lost, "{cached:?} {max_stale:?}");
            assert_eq!(
                after_wait(cached, false, p),
                after,
                "{cached:?} {max_stale:?}"
            );
        }
    }

    #[test]
    fn what_the_awaited_run_wrote_is_served_whatever_its_age() {
        let p = policy(Some(0));
        assert_eq!(after_wait(stale(5), true, p), AfterWait::Serve);
        assert_eq!(after_wait(stale(5), false, p), AfterWait::GiveUp);
        assert_eq!(after_wait(Cached::Missing, true, p), AfterWait::GiveUp);
    }

    /// Every transition of [`next`], as a table: what was seen, with or without
    /// `--background`, and the step it leads to.
    #[test]
    fn every_step_of_a_call() {
        use GiveUp::*;
        let p = policy(None);
        let bounded = policy(Some(10));
        let won = |cached, failed_ago: Option<u64>| Seen::Won {
            cached,
            failed: failed_ago.map(|ago| Failed {
                ago: S(ago),
                backoff: S(30),
            }),
        };
        let waited = |released, cached, fresh_from_run| Seen::Waited {
            released,
            cached,
            fresh_from_run,
        };
        let queued = |got, cached, fresh_from_run| Seen::Queued {
            got,
            cached,
            fresh_from_run,
        };
        let left = |why| Seen::NothingLeft { why };
        let started = |cached, started| Seen::RefresherStarted { cached, started };
        let missing = Cached::Missing;
        let fresh = Cached::Fresh;
        #[rustfmt::skip]
        let table: &[(Seen, Policy, bool, Step)] = &[
            // Arriving: a fresh hit is served; anything else goes for the lock.
            (Seen::Arrived { cached: fresh }, p, false, Step::Serve),
            (Seen::Arrived { cached: fresh }, p, true, Step::Serve),
            (Seen::Arrived { cached: stale(60) }, p, false, Step::TryLock),
            (Seen::Arrived { cached: missing }, p, true, Step::TryLock),
            // Holding the lock: refreshed meanwhile, backing off, or run (or refresh).
            (won(fresh, None), p, false, Step::Serve),
            (won(stale(60), Some(5)), p, false, Step::BackOff { serve: true }),
            (won(missing, Some(5)), p, false, Step::BackOff { serve: false }),
            (won(missing, Some(31)), p, false, Step::Run),
            // The failure's own back-off (grown by --retry-max) counts, not --retry-after.
            (Seen::Won { cached: missing, failed: Some(Failed { ago: S(31), backoff: S(60) }) }, p, false, Step::BackOff { serve: false }),
            (won(stale(60), None), p, false, Step::Run),
            (won(stale(60), None), p, true, Step::StartRefresher),
            (won(missing, Some(5)), p, true, Step::BackOff { serve: false }),
            // Lost: serve stale within --max-stale, else wait.
            (Seen::Lost { cached: stale(60) }, p, false, Step::Serve),
            (Seen::Lost { cached: stale(60) }, bounded, false, Step::Wait),
            (Seen::Lost { cached: missing }, p, false, Step::Wait),
            // A refresher started, or not.
            (started(stale(60), true), p, true, Step::Serve),
            (started(missing, true), p, true, Step::Wait),
            (started(stale(60), false), p, true, Step::Serve),
            (started(missing, false), p, true, Step::GiveUp(NoRefresher)),
            // A wait ended.
            (waited(false, stale(60), false), p, false, Step::GiveUp(WaitRanOut)),
            (waited(true, stale(60), true), bounded, false, Step::Serve),
            (waited(true, stale(60), false), p, false, Step::Serve),
            (waited(true, stale(60), false), bounded, false, Step::AskWhy),
            (waited(true, missing, false), p, false, Step::AskWhy),
            // Why nothing was left.
            (left(Nothing::HandedBack), p, false, Step::TakeHandedBack),
            (left(Nothing::NoFailure { retries: 0 }), p, false, Step::Queue),
            (left(Nothing::NoFailure { retries: 0 }), p, true, Step::TryLock),
            (left(Nothing::NoFailure { retries: MAX_RETRIES }), p, false, Step::GiveUp(TooManyRetries)),
            (left(Nothing::Final), p, false, Step::GiveUp(NothingProduced)),
            // Queued for the lock.
            (queued(false, missing, false), p, false, Step::GiveUp(WaitRanOut)),
            (queued(true, stale(60), true), bounded, false, Step::Serve),
            (queued(true, missing, true), p, false, Step::LookAgain),
            (queued(true, stale(60), false), bounded, false, Step::LookAgain),
        ];
        for &(seen, policy, background, step) in table {
            assert_eq!(
                next(seen, policy, background),
                step,
                "{seen:?} (background: {background}, max_stale: {:?})",
                policy.max_stale
            );
        }
    }
}
