//! `--backend postgres://[USER@]HOST[:PORT][/DB][?PARAM=VALUE&...]` (`postgresql://`
//! too): libpq's URL form, parsed once. The password is never taken from it (a
//! command line is seen by every user of the machine in `ps`): it comes from
//! `PGPASSWORD`, `PGPASSFILE` or `~/.pgpass`, as with libpq.
//!
//! The parameters understood are libpq's for TLS and naming: `sslmode`,
//! `sslrootcert`, `sslcert`, `sslkey`, `application_name`, `host` (a unix socket
//! directory). Any other is refused, so that a typo is not silently ignored.

use std::fmt;
use std::path::PathBuf;

/// libpq's default port.
pub const DEFAULT_PORT: u16 = 5432;

/// `--pg-schema` default.
pub const DEFAULT_SCHEMA: &str = "singleflight";

/// The refusal of a URL with a password (not quoted: it would echo the password).
const NO_PASSWORD: &str = "invalid backend: a password does not go on the command line (every \
     user of the machine sees it in ps): give it in PGPASSWORD, PGPASSFILE or ~/.pgpass";

/// libpq's `sslmode`, with its default `prefer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether the server's certificate is checked against a CA.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// Where the server is: a TCP host, or a unix socket directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    Socket(PathBuf),
}

/// A parsed `postgres://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgUrl {
    pub user: Option<String>,
    pub host: Host,
    pub port: u16,
    pub dbname: Option<String>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub application_name: Option<String>,
}

/// Whether `value` names a PostgreSQL backend (its scheme, in any case).
pub fn is_postgres(value: &str) -> bool {
    let lower = value.get(..13).unwrap_or(value).to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

impl PgUrl {
    /// Parses the URL; the error quotes it and says what a valid one looks like.
    pub fn parse(value: &str) -> Result<PgUrl, String> {
        let bad = |why: &str| {
            format!(
                "invalid backend {value:?}: {why}; use postgres://USER@HOST:PORT/DB?sslmode=..., \
                 e.g. postgres://app@db.example:5432/app?sslmode=verify-full"
            )
        };
        let rest = value
            .split_once("://")
            .filter(|(scheme, _)| {
                scheme.eq_ignore_ascii_case("postgres") || scheme.eq_ignore_ascii_case("postgresql")
            })
            .map(|(_, rest)| rest)
            .ok_or_else(|| bad("it does not start with postgres:// or postgresql://"))?;
        if rest.contains('#') {
            return Err(bad("a fragment (#) is not allowed"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((authority, path)) => (authority, Some(path)),
            None => (rest, None),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                if userinfo.contains(':') {
                    return Err(NO_PASSWORD.to_owned());
                }
                let user = decode(userinfo).map_err(|why| bad(&why))?;
                (Some(user).filter(|u| !u.is_empty()), hostport)
            }
            None => (None, authority),
        };
        if hostport.contains(',') {
            return Err(bad("only one host is supported"));
        }
        let (host, port) = split_host_port(hostport).map_err(|why| bad(&why))?;
        let dbname = match path {
            Some(path) if !path.is_empty() => Some(decode(path).map_err(|why| bad(&why))?),
            _ => None,
        };
        let mut url = PgUrl {
            user,
            host: Host::Tcp(host),
            port,
            dbname,
            sslmode: SslMode::default(),
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            application_name: None,
        };
        let mut socket = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, raw) = pair
                .split_once('=')
                .ok_or_else(|| bad(&format!("parameter {pair:?} has no value")))?;
            let val = decode(raw).map_err(|why| bad(&why))?;
            match key {
                "sslmode" => {
                    url.sslmode = SslMode::parse(&val).ok_or_else(|| {
                        bad(&format!(
                            "sslmode {val:?} is not one of disable, allow, prefer, require, \
                             verify-ca, verify-full"
                        ))
                    })?;
                }
                "sslrootcert" => url.sslrootcert = Some(val),
                "sslcert" => url.sslcert = Some(val.into()),
                "sslkey" => url.sslkey = Some(val.into()),
                "application_name" => url.application_name = Some(val),
                "host" => socket = Some(val),
                "password" => return Err(NO_PASSWORD.to_owned()),
                other => {
                    return Err(bad(&format!(
                        "unknown parameter {other:?} (understood: sslmode, sslrootcert, \
                         sslcert, sslkey, application_name, host)"
                    )));
                }
            }
        }
        match socket {
            Some(dir) if dir.starts_with('/') => url.host = Host::Socket(dir.into()),
            Some(host) if !host.is_empty() => url.host = Host::Tcp(host),
            _ => {}
        }
        if let Host::Tcp(host) = &url.host {
            if host.is_empty() {
                return Err(bad("no host"));
            }
            if host.starts_with('/') {
                url.host = Host::Socket(host.into());
            }
        }
        Ok(url)
    }
}

fn split_host_port(hostport: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("{hostport:?} has no closing ']'"))?;
        (host.to_owned(), after.strip_prefix(':'))
    } else {
        match hostport.split_once(':') {
            Some((host, port)) => (decode(host)?, Some(port)),
            None => (decode(hostport)?, None),
        }
    };
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(format!("{port:?} is not a port number")),
        },
    };
    Ok((host, port))
}

/// Percent-decoding, as URLs write `/` and `@` in names.
fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {text:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "postgres://")?;
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        match &self.host {
            Host::Tcp(host) if host.contains(':') => write!(f, "[{host}]:{}", self.port)?,
            Host::Tcp(host) => write!(f, "{host}:{}", self.port)?,
            Host::Socket(dir) => write!(f, "{}:{}", dir.display(), self.port)?,
        }
        if let Some(db) = &self.dbname {
            write!(f, "/{db}")?;
        }
        Ok(())
    }
}

/// `--pg-schema NAME`: a plain lowercase identifier, short enough that the names made
/// from it (the notification channel) stay within PostgreSQL's 63 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgSchema(String);

impl PgSchema {
    pub fn parse(value: &str) -> Result<PgSchema, String> {
        let ok = !value.is_empty()
            && value.len() <= 40
            && value.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && value
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return Err(format!(
                "invalid schema {value:?}: use a lowercase SQL name of at most 40 characters \
                 (a-z, 0-9, _), such as {DEFAULT_SCHEMA}"
            ));
        }
        Ok(PgSchema(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for PgSchema {
    fn default() -> PgSchema {
        PgSchema(DEFAULT_SCHEMA.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libpq_urls() {
        let url = PgUrl::parse(
            "postgresql://app@db.example:6543/jobs?sslmode=verify-full&sslrootcert=/ca.pem",
        )
        .unwrap();
        assert_eq!(url.user.as_deref(), Some("app"));
        assert_eq!(url.host, Host::Tcp("db.example".into()));
        assert_eq!(url.port, 6543);
        assert_eq!(url.dbname.as_deref(), Some("jobs"));
        assert_eq!(url.sslmode, SslMode::VerifyFull);
        assert_eq!(url.sslrootcert.as_deref(), Some("/ca.pem"));
        assert_eq!(url.to_string(), "postgres://app@db.example:6543/jobs");
        let url = PgUrl::parse("POSTGRES://[::1]/x?host=%2Frun%2Fpg").unwrap();
        assert_eq!(url.host, Host::Socket("/run/pg".into()));
        assert_eq!(url.port, DEFAULT_PORT);
        assert_eq!(url.sslmode, SslMode::Prefer);
        assert!(is_postgres("PostgreSQL://x"));
        assert!(!is_postgres("etcd://x"));
    }

    #[test]
    fn refuses_passwords_and_unknown_parameters() {
        for (bad, why) in [
            ("postgres://u:secret@h/db", "PGPASSWORD"),
            ("postgres://u@h/db?password=x", "PGPASSWORD"),
            ("postgres://u@h/db?sslmode=on", "sslmode \"on\""),
            ("postgres://u@h/db?connect=1", "unknown parameter"),
            ("postgres://u@h:0/db", "not a port number"),
            ("postgres://u@a,b/db", "one host"),
            ("postgres:///db", "no host"),
        ] {
            let err = PgUrl::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(!err.contains("secret"), "never echoes a password: {err}");
        }
    }

    #[test]
    fn schemas() {
        assert!(PgSchema::parse("singleflight_2").is_ok());
        for bad in ["", "A", "1a", "a-b", &"a".repeat(41)] {
            assert!(PgSchema::parse(bad).is_err(), "{bad}");
        }
    }
}
