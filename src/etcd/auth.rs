//! etcd authentication: `--etcd-user`'s login (`POST /v3/auth/authenticate`), and the
//! token it gives, sent in the `Authorization` header of every request.
//!
//! The password comes from `SINGLEFLIGHT_ETCD_PASSWORD` or `--etcd-password-file`, never
//! from the command line (which every user of the machine can read in `ps`). A token
//! etcd no longer takes (a simple token expires after `--auth-token-ttl` unused, and
//! with the member that issued it) is replaced by logging in again, once per request.
//!
//! With a cache dir ([`Auth::keeping_token_in`]) the token outlives the call: the
//! first request tries the one a call before kept (see `token_file`), and each login
//! keeps its token for the next call. The callers of one cache dir log in one at a
//! time (see `login_lock`), so a herd logs in once per machine, not once per caller.

use std::fmt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use super::EtcdError;
use super::token_file::TokenFile;
use super::transport::{Transport, parse};

/// The environment variable that gives `--etcd-user`'s password.
pub const PASSWORD_ENV: &str = "SINGLEFLIGHT_ETCD_PASSWORD";

/// A user and password to log in to etcd with.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ user: {:?}, password: <hidden> }}",
            self.user
        )
    }
}

impl Credentials {
    pub fn new(user: String, password: String) -> Credentials {
        Credentials { user, password }
    }

    /// `user`'s password from `password_file` (its first line), or else from
    /// `SINGLEFLIGHT_ETCD_PASSWORD`. The error says what is missing or unreadable.
    pub fn load(user: String, password_file: Option<&Path>) -> Result<Credentials, String> {
        let password = match password_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--etcd-password-file {}: {e}", path.display()))?;
                // A file written by `echo` ends in a newline that is not the password's.
                let line = text.lines().next().unwrap_or_default();
                line.strip_suffix('\r').unwrap_or(line).to_owned()
            }
            None => match std::env::var(PASSWORD_ENV) {
                Ok(password) => password,
                Err(std::env::VarError::NotPresent) => {
                    return Err(format!(
                        "--etcd-user {user} needs a password: set {PASSWORD_ENV} or give \
                         --etcd-password-file FILE (never on the command line)"
                    ));
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(format!("{PASSWORD_ENV} is not valid UTF-8"));
                }
            },
        };
        Ok(Credentials { user, password })
    }
}

/// The login of one client, shared by its clones (the lease keeper's thread too).
pub struct Auth {
    credentials: Credentials,
    token: Mutex<Held>,
    /// Where the token is kept between calls, if anywhere.
    file: Option<TokenFile>,
}

/// The token in use, and whether the kept one was looked at (once per process: after
/// etcd refused it, the file holds nothing better).
#[derive(Default)]
struct Held {
    token: Option<String>,
    file_read: bool,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct AuthenticateResponse {
    token: String,
}

impl Auth {
    pub fn new(credentials: Credentials) -> Auth {
        Auth {
            credentials,
            token: Mutex::default(),
            file: None,
        }
    }

    /// The same login, with its token kept in `file` between calls.
    pub fn keeping_token_in(&self, file: TokenFile) -> Auth {
        Auth {
            file: Some(file),
            ..Auth::new(self.credentials.clone())
        }
    }

    pub fn user(&self) -> &str {
        &self.credentials.user
    }

    /// The token to send, logging in first if there is none yet.
    pub fn token(
        &self,
        transport: &Transport,
        deadline: Option<Instant>,
    ) -> Result<String, EtcdError> {
        self.current_or_login(transport, None, deadline)
    }

    /// A new token in place of `stale`, which etcd refused; if another thread
    /// already replaced it, that one.
    pub fn renew(
        &self,
        transport: &Transport,
        stale: &str,
        deadline: Option<Instant>,
    ) -> Result<String, EtcdError> {
        self.current_or_login(transport, Some(stale), deadline)
    }

    /// The token held, unless there is none or it is `stale` (dropped then): the one
    /// kept in the file by an earlier call (looked at once), else a new one from a
    /// login, kept for the next request and in the file for the next call.
    fn current_or_login(
        &self,
        transport: &Transport,
        stale: Option<&str>,
        deadline: Option<Instant>,
    ) -> Result<String, EtcdError> {
        let mut held = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if held.token.is_none() && !held.file_read {
            held.file_read = true;
            held.token = self
                .file
                .as_ref()
                .and_then(|file| file.load(&self.credentials.password));
        }
        match held.token.as_deref() {
            Some(current) if Some(current) != stale => return Ok(current.to_owned()),
            Some(_) => held.token = None,
            None => {}
        }
        let fresh = match &self.file {
            Some(file) => self.login_in_turn(file, transport, stale, deadline)?,
            None => self.login(transport, deadline)?,
        };
        held.token = Some(fresh.clone());
        Ok(fresh)
    }

    /// In this cache dir's turn to log in: the token kept in `file`, if the caller
    /// before us just logged in (any token but `stale`); else a new one from a login,
    /// kept in `file` for the callers after us. Without a turn, the same unguarded.
    fn login_in_turn(
        &self,
        file: &TokenFile,
        transport: &Transport,
        stale: Option<&str>,
        deadline: Option<Instant>,
    ) -> Result<String, EtcdError> {
        let _turn = file.login_lock().turn(turn_limit(transport, deadline));
        let password = &self.credentials.password;
        if let Some(kept) = file.load(password)
            && Some(kept.as_str()) != stale
        {
            return Ok(kept);
        }
        let fresh = self.login(transport, deadline)?;
        file.save(&fresh, password);
        Ok(fresh)
    }

    fn login(&self, transport: &Transport, deadline: Option<Instant>) -> Result<String, EtcdError> {
        let body = json!({
            "name": self.credentials.user,
            "password": self.credentials.password,
        });
        let answer = match transport.post("/auth/authenticate", &body, deadline, None) {
            Ok(answer) => answer,
            Err(EtcdError::Refused {
                member, message, ..
            }) => {
                return Err(EtcdError::Login {
                    member,
                    user: self.credentials.user.clone(),
                    message,
                });
            }
            Err(e) => return Err(e),
        };
        let response: AuthenticateResponse = parse(&answer.bytes, "authenticate")?;
        if response.token.is_empty() {
            // etcd answers a login with no token when its authentication is off.
            return Err(EtcdError::Login {
                member: answer.member,
                user: self.credentials.user.clone(),
                message: "etcd gave no token: is its authentication enabled \
                          (etcdctl auth enable)?"
                    .to_owned(),
            });
        }
        Ok(response.token)
    }
}

/// How long a caller waits for its turn to log in: as long as the login before it
/// may take (each member asked once, each for up to the backend timeout), and one
/// timeout more for the callers queued before it (who only read the kept token), but
/// never past the request's `deadline`. The wait is not the backend timeout's: a
/// login under way is etcd answering, not etcd unreachable, and the caller's own
/// requests get their whole timeout after it. A turn that does not come in that time
/// (a holder stopped with Ctrl-Z) is not waited for: the caller logs in without it.
fn turn_limit(transport: &Transport, deadline: Option<Instant>) -> Duration {
    let members = u32::try_from(transport.endpoints().members().len()).unwrap_or(u32::MAX);
    let limit = transport
        .timeout()
        .saturating_mul(members.saturating_add(1));
    match deadline {
        Some(deadline) => limit.min(deadline.saturating_duration_since(Instant::now())),
        None => limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_never_shown() {
        let credentials = Credentials::new("root".into(), "s3cret".into());
        let shown = format!("{credentials:?}");
        assert!(
            shown.contains("root") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn a_password_file_gives_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "pa ss\r\nignored\n").unwrap();
        let credentials = Credentials::load("u".into(), Some(&path)).unwrap();
        assert_eq!(credentials.password, "pa ss");
        let missing = Credentials::load("u".into(), Some(&dir.path().join("nope"))).unwrap_err();
        assert!(missing.contains("--etcd-password-file"), "{missing}");
    }
}
