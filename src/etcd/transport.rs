//! One request to etcd's v3 JSON gateway: an HTTP POST bounded by the backend
//! timeout, moving on to the next member when one cannot answer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::EtcdError;
use super::endpoints::Endpoints;
use super::wire::{self, GatewayError};
use crate::values::format_duration;

/// The gateway prefix. etcd 3.4 serves `/v3/` and the older `/v3beta/`; 3.5 dropped
/// `/v3beta/`, 3.3 had no `/v3/`. `/v3/` is the stable one from 3.4 on.
const API: &str = "/v3";
/// The largest answer read: a range of one result (at most 1.5 MiB in etcd, a third
/// more in base64) fits with room to spare; a member sending more is broken.
const MAX_ANSWER: u64 = 8 << 20;

pub struct Transport {
    endpoints: Endpoints,
    agent: ureq::Agent,
    timeout: Duration,
    /// The member that answered last: asked first next time.
    preferred: AtomicUsize,
}

/// Why one member did not answer; the next one is asked.
struct Skip {
    member: String,
    why: String,
}

impl Transport {
    pub fn new(endpoints: Endpoints, timeout: Duration) -> Transport {
        let agent = ureq::Agent::config_builder()
            // The gateway's error answers carry etcd's reason in JSON: read them.
            .http_status_as_error(false)
            // etcd is reached directly; an HTTP(S)_PROXY meant for the web must not
            // capture it (ureq reads those variables by default).
            .proxy(None)
            .max_redirects(0)
            .build()
            .new_agent();
        Transport {
            endpoints,
            agent,
            timeout,
            preferred: AtomicUsize::new(0),
        }
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// POSTs `body` to `path` (e.g. `/kv/range`) and returns the answer's bytes. Each
    /// member is asked at most once, each for at most the backend timeout and never
    /// past `deadline`; a member that cannot be reached, does not answer in time or
    /// says it is unavailable (no leader, shutting down) is skipped.
    pub fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
        deadline: Option<Instant>,
    ) -> Result<Answer, EtcdError> {
        let body = serde_json::to_vec(body).expect("requests serialize");
        let members = self.endpoints.members();
        let first = self.preferred.load(Ordering::Relaxed) % members.len();
        let mut skipped = Vec::new();
        for i in (first..members.len()).chain(0..first) {
            let member = &members[i];
            let limit = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        skipped.push(Skip {
                            member: member.clone(),
                            why: "not asked: out of time".to_owned(),
                        });
                        break;
                    }
                    left.min(self.timeout)
                }
                None => self.timeout,
            };
            match self.attempt(member, path, &body, limit) {
                Ok(bytes) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(Answer {
                        member: member.clone(),
                        bytes,
                    });
                }
                Err(Attempt::Skip(why)) => skipped.push(Skip {
                    member: member.clone(),
                    why,
                }),
                Err(Attempt::Refused(error)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Err(EtcdError::Refused {
                        member: member.clone(),
                        code: error.code,
                        message: first_non_empty(&error.message, &error.error),
                    });
                }
            }
        }
        Err(EtcdError::Unreachable {
            tried: skipped.into_iter().map(|s| (s.member, s.why)).collect(),
        })
    }

    fn attempt(
        &self,
        member: &str,
        path: &str,
        body: &[u8],
        limit: Duration,
    ) -> Result<Vec<u8>, Attempt> {
        let url = format!("http://{member}{API}{path}");
        let failed = |e: ureq::Error| Attempt::Skip(describe(&e, limit));
        let mut response = self
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(limit))
            .build()
            .header("content-type", "application/json")
            .send(body)
            .map_err(failed)?;
        let status = response.status();
        let answer = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_vec()
            .map_err(failed)?;
        if status.is_success() {
            return Ok(answer);
        }
        match serde_json::from_slice::<GatewayError>(&answer) {
            Ok(error) if error.code == wire::UNAVAILABLE => Err(Attempt::Skip(format!(
                "unavailable: {}",
                first_non_empty(&error.message, &error.error)
            ))),
            Ok(error) if error.code != 0 => Err(Attempt::Refused(error)),
            // Not the gateway talking (a proxy, another server on that port).
            _ => Err(Attempt::Skip(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&answer[..answer.len().min(200)]).trim()
            ))),
        }
    }
}

/// What a member answered.
pub struct Answer {
    pub member: String,
    pub bytes: Vec<u8>,
}

enum Attempt {
    Skip(String),
    Refused(GatewayError),
}

fn describe(error: &ureq::Error, limit: Duration) -> String {
    match error {
        ureq::Error::Timeout(_) => format!("no answer within {}", format_duration(limit)),
        ureq::Error::Io(e) => e.to_string(),
        ureq::Error::HostNotFound => "host not found".to_owned(),
        ureq::Error::ConnectionFailed => "connection failed".to_owned(),
        other => other.to_string(),
    }
}

/// Parses an answer, or says it makes no sense (which is the member's fault).
pub fn parse<T: DeserializeOwned>(answer: &[u8], what: &str) -> Result<T, EtcdError> {
    serde_json::from_slice(answer).map_err(|e| EtcdError::Garbled {
        detail: format!(
            "{what}: {e} in {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        ),
    })
}

fn first_non_empty(a: &str, b: &str) -> String {
    if a.is_empty() { b } else { a }.to_owned()
}
