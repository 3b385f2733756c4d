//! One request to etcd's v3 JSON gateway: an HTTP(S) POST bounded by the backend
//! timeout, moving on to the next member when one cannot answer; or a stream (a
//! watch) opened the same way and read line by line.

use std::io::{BufReader, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use ureq::tls::TlsConfig;

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
    /// Whether a client certificate is shown (for the hint of a hang-up).
    client_cert: bool,
}

/// Why one member did not answer; the next one is asked.
struct Skip {
    member: String,
    why: String,
    /// The TLS handshake failed (a certificate that does not verify, say).
    tls: bool,
}

impl Transport {
    /// `tls` is the TLS configuration of `etcd+https://` members (`None`: ureq's
    /// default, Mozilla's roots and no client certificate); plain `etcd://` uses none.
    pub fn new(endpoints: Endpoints, timeout: Duration, tls: Option<TlsConfig>) -> Transport {
        let mut config = ureq::Agent::config_builder()
            // The gateway's error answers carry etcd's reason in JSON: read them.
            .http_status_as_error(false)
            // etcd is reached directly; an HTTP(S)_PROXY meant for the web must not
            // capture it (ureq reads those variables by default).
            .proxy(None)
            .max_redirects(0);
        let client_cert = tls.as_ref().is_some_and(|tls| tls.client_cert().is_some());
        if let Some(tls) = tls {
            config = config.tls_config(tls);
        }
        Transport {
            endpoints,
            agent: config.build().new_agent(),
            timeout,
            preferred: AtomicUsize::new(0),
            client_cert,
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
    /// `token` is the auth token to send, if any.
    pub fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
        deadline: Option<Instant>,
        token: Option<&str>,
    ) -> Result<Answer, EtcdError> {
        let body = serde_json::to_vec(body).expect("requests serialize");
        self.each_member(deadline, |member, limit| {
            let request = self.request(member, path, token, limit, None);
            let mut response = request
                .send(&body[..])
                .map_err(|e| self.failed(&e, limit))?;
            let status = response.status();
            let answer = response
                .body_mut()
                .with_config()
                .limit(MAX_ANSWER)
                .read_to_vec()
                .map_err(|e| self.failed(&e, limit))?;
            if status.is_success() {
                return Ok(answer);
            }
            Err(refusal(status, &answer))
        })
        .map(|(member, bytes)| Answer { member, bytes })
    }

    /// Opens a streaming call (a watch): POSTs `body` to `path` and returns the
    /// answer's body to read line by line, each line one message. Opening is bounded
    /// by the backend timeout per member, as [`Transport::post`]; reading by `until`
    /// (a read past it fails with a timeout).
    pub fn stream(
        &self,
        path: &str,
        body: &serde_json::Value,
        until: Instant,
        token: Option<&str>,
    ) -> Result<Stream, EtcdError> {
        let body = serde_json::to_vec(body).expect("requests serialize");
        self.each_member(Some(until), |member, limit| {
            let whole = until.saturating_duration_since(Instant::now());
            let request = self.request(member, path, token, limit, Some(whole));
            let response = request
                .send(&body[..])
                .map_err(|e| self.failed(&e, limit))?;
            let status = response.status();
            if status.is_success() {
                return Ok(response.into_body().into_reader());
            }
            let mut answer = Vec::new();
            let _ = response
                .into_body()
                .into_reader()
                .take(64 << 10)
                .read_to_end(&mut answer);
            Err(refusal(status, &answer))
        })
        .map(|(member, reader)| Stream {
            member,
            reader: BufReader::new(reader),
        })
    }

    /// One request to `member`: the whole of it within `limit`, or, for a stream,
    /// its answer's head within `limit` and its body within `whole`.
    fn request(
        &self,
        member: &str,
        path: &str,
        token: Option<&str>,
        limit: Duration,
        whole: Option<Duration>,
    ) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        let scheme = if self.endpoints.tls() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{member}{API}{path}");
        let config = self.agent.post(&url).config();
        let config = match whole {
            None => config.timeout_global(Some(limit)),
            Some(whole) => config
                .timeout_global(Some(whole))
                .timeout_connect(Some(limit))
                .timeout_send_request(Some(limit))
                .timeout_send_body(Some(limit))
                .timeout_recv_response(Some(limit)),
        };
        let request = config.build().header("content-type", "application/json");
        match token {
            Some(token) => request.header("authorization", token),
            None => request,
        }
    }

    /// Asks each member in turn, starting with the one that answered last, at most
    /// once each, each for at most the backend timeout and never past `deadline`.
    fn each_member<T>(
        &self,
        deadline: Option<Instant>,
        mut attempt: impl FnMut(&str, Duration) -> Result<T, Attempt>,
    ) -> Result<(String, T), EtcdError> {
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
                            tls: false,
                        });
                        break;
                    }
                    left.min(self.timeout)
                }
                None => self.timeout,
            };
            match attempt(member, limit) {
                Ok(answer) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok((member.clone(), answer));
                }
                Err(Attempt::Skip { why, tls }) => skipped.push(Skip {
                    member: member.clone(),
                    why,
                    tls,
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
        let tls = !skipped.is_empty() && skipped.iter().all(|s| s.tls);
        let tried = skipped.into_iter().map(|s| (s.member, s.why)).collect();
        Err(if tls {
            EtcdError::Tls { tried }
        } else {
            EtcdError::Unreachable { tried }
        })
    }
}

/// What a member answered.
pub struct Answer {
    pub member: String,
    pub bytes: Vec<u8>,
}

/// A streaming answer, to read line by line.
pub struct Stream {
    pub member: String,
    pub reader: BufReader<ureq::BodyReader<'static>>,
}

enum Attempt {
    Skip { why: String, tls: bool },
    Refused(GatewayError),
}

/// What an answer that is not a success means: etcd's refusal, or a member to skip.
fn refusal(status: ureq::http::StatusCode, answer: &[u8]) -> Attempt {
    match serde_json::from_slice::<GatewayError>(answer) {
        Ok(error) if error.code == wire::UNAVAILABLE => Attempt::Skip {
            why: format!(
                "unavailable: {}",
                first_non_empty(&error.message, &error.error)
            ),
            tls: false,
        },
        Ok(error) if error.code != 0 => Attempt::Refused(error),
        // etcd's own refusal, in plain text, of a client certificate with a CommonName
        // (etcd 3.4 with --client-cert-auth: the gateway cannot log in by CN).
        _ if String::from_utf8_lossy(answer).contains("CommonName of client") => {
            Attempt::Refused(GatewayError {
                code: 0,
                error: String::new(),
                message: format!(
                    "{} (use a client certificate with an empty CommonName, and --etcd-user)",
                    excerpt(answer)
                ),
            })
        }
        // Not the gateway talking (a proxy, another server on that port).
        _ => Attempt::Skip {
            why: format!("HTTP {status}: {}", excerpt(answer)),
            tls: false,
        },
    }
}

impl Transport {
    /// Why a request to a member failed, with a hint where a hang-up has a likely
    /// cause: a TLS member that wants a client certificate hangs up on one without,
    /// and a TLS member hangs up on plain HTTP.
    fn failed(&self, error: &ureq::Error, limit: Duration) -> Attempt {
        let mut why = match error {
            ureq::Error::Timeout(_) => format!("no answer within {}", format_duration(limit)),
            ureq::Error::Io(e) => e.to_string(),
            ureq::Error::HostNotFound => "host not found".to_owned(),
            ureq::Error::ConnectionFailed => "connection failed".to_owned(),
            other => other.to_string(),
        };
        let refused_us = why.contains("BadCertificate") || why.contains("CertificateRequired");
        if !self.endpoints.tls() && is_hang_up(error) {
            why.push_str(" (if etcd serves TLS there, write etcd+https://)");
        } else if self.endpoints.tls() && !self.client_cert && (is_hang_up(error) || refused_us) {
            why.push_str(
                " (etcd with --client-cert-auth refuses a client without a certificate: \
                 give --etcd-cert and --etcd-key)",
            );
        }
        Attempt::Skip {
            tls: is_tls(error),
            why,
        }
    }
}

/// The start of an answer that is not the gateway's JSON, for a message.
fn excerpt(answer: &[u8]) -> String {
    String::from_utf8_lossy(&answer[..answer.len().min(200)])
        .trim()
        .to_owned()
}

/// Whether the member hung up on the request.
fn is_hang_up(error: &ureq::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    matches!(error, ureq::Error::Io(e) if matches!(e.kind(), BrokenPipe | ConnectionReset | UnexpectedEof))
}

/// Whether `error` is the TLS handshake's: a certificate that does not verify, a
/// client certificate the member refused, a member that does not speak TLS.
fn is_tls(error: &ureq::Error) -> bool {
    match error {
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) | ureq::Error::Pem(_) => true,
        ureq::Error::Io(e) => e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()),
        _ => false,
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
