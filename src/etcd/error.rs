//! Why an etcd operation did not happen, and the size check of a value.

use std::fmt;

use crate::values::format_size;

/// Why an etcd operation did not happen.
#[derive(Debug)]
pub enum EtcdError {
    /// No member answered in time: each member asked and why it did not answer.
    Unreachable { tried: Vec<(String, String)> },
    /// A member answered with an error (gRPC status `code`).
    Refused {
        member: String,
        code: i32,
        message: String,
    },
    /// An answer that is not what the gateway sends.
    Garbled { detail: String },
    /// No member could be spoken to over TLS: each member and why (its certificate
    /// did not verify, it refused ours, it does not speak TLS).
    Tls { tried: Vec<(String, String)> },
    /// etcd refused `--etcd-user`'s login (a wrong password, an unknown user).
    Login {
        member: String,
        user: String,
        message: String,
    },
}

/// gRPC's `UNAUTHENTICATED`: etcd's "invalid auth token" (an expired token).
pub const UNAUTHENTICATED: i32 = 16;

impl EtcdError {
    /// Whether etcd refused the request for its auth token, so that logging in again
    /// and repeating the request may succeed: the token expired (a simple token after
    /// `--auth-token-ttl` unused, a member that restarted) or the users changed.
    pub fn is_stale_token(&self) -> bool {
        match self {
            EtcdError::Refused { code, message, .. } => {
                *code == UNAUTHENTICATED
                    || message.contains("invalid auth token")
                    || message.contains("revision of auth store is old")
            }
            _ => false,
        }
    }
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EtcdError::Unreachable { tried } => {
                f.write_str("etcd unreachable")?;
                write_tried(f, tried)
            }
            EtcdError::Refused {
                member,
                code,
                message,
            } => {
                write!(
                    f,
                    "etcd at {member} refused the request: {message} (code {code})"
                )?;
                if message.contains("user name is empty") {
                    f.write_str(": it has authentication on; give --etcd-user and a password")?;
                }
                Ok(())
            }
            EtcdError::Garbled { detail } => write!(f, "unexpected answer from etcd: {detail}"),
            EtcdError::Tls { tried } => {
                f.write_str("no TLS connection to etcd")?;
                write_tried(f, tried)?;
                if tried.iter().any(|(_, why)| why.contains("UnknownIssuer")) {
                    f.write_str(" (--etcd-cacert FILE trusts the CA that signed its certificate)")?;
                }
                Ok(())
            }
            EtcdError::Login {
                member,
                user,
                message,
            } => write!(
                f,
                "etcd at {member} refused the login of user {user:?}: {message}"
            ),
        }
    }
}

impl std::error::Error for EtcdError {}

/// `: member: why; member: why…`, each member asked and why it did not answer.
fn write_tried(f: &mut fmt::Formatter<'_>, tried: &[(String, String)]) -> fmt::Result {
    for (i, (member, why)) in tried.iter().enumerate() {
        let sep = if i == 0 { ": " } else { "; " };
        write!(f, "{sep}{member}: {why}")?;
    }
    Ok(())
}

/// A value too large to store in etcd; the caller refuses it rather than truncate.
#[derive(Debug, PartialEq, Eq)]
pub struct TooLarge {
    pub len: u64,
    pub limit: u64,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the result is {} ({} bytes), over the etcd backend's limit of {} ({} bytes); \
             it was not stored",
            format_size(self.len),
            self.len,
            format_size(self.limit),
            self.limit
        )
    }
}

impl std::error::Error for TooLarge {}

/// Checks that a value of `len` bytes (a whole encoded entry: header, body and
/// metadata) may be stored.
pub fn check_size(len: u64, limit: u64) -> Result<(), TooLarge> {
    if len <= limit {
        Ok(())
    } else {
        Err(TooLarge { len, limit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::DEFAULT_MAX_VALUE;

    #[test]
    fn size_check_refuses_over_the_limit_only() {
        assert_eq!(check_size(DEFAULT_MAX_VALUE, DEFAULT_MAX_VALUE), Ok(()));
        let err = check_size(DEFAULT_MAX_VALUE + 1, DEFAULT_MAX_VALUE).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("1048577 bytes"), "{text}");
        assert!(text.contains("limit of 1.0MiB"), "{text}");
        assert!(text.contains("not stored"), "{text}");
    }

    #[test]
    fn errors_name_every_member_tried() {
        let error = EtcdError::Unreachable {
            tried: vec![
                ("a:1".to_owned(), "connection refused".to_owned()),
                ("b:2".to_owned(), "no answer within 2s".to_owned()),
            ],
        };
        assert_eq!(
            error.to_string(),
            "etcd unreachable: a:1: connection refused; b:2: no answer within 2s"
        );
    }
}
