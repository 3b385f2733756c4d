//! The `--backend etcd://HOST:PORT[,HOST:PORT...]` value (`etcd+https://` for TLS):
//! parsed once into the list of etcd members to talk to, in the order the user gave
//! them, and whether to speak TLS to them.

use std::fmt;

/// etcd's default client port, for a HOST given without one.
pub const DEFAULT_PORT: u16 = 2379;

/// Plain HTTP to etcd's gateway.
const SCHEME: &str = "etcd://";
/// TLS (HTTPS) to etcd's gateway.
const TLS_SCHEME: &str = "etcd+https://";

/// The members of one etcd cluster, as `host:port` (IPv6 hosts in brackets), and
/// whether they are spoken to over TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    members: Vec<String>,
    tls: bool,
}

impl Endpoints {
    /// Parses `etcd://HOST[:PORT][,HOST[:PORT]...]` (or `etcd+https://...`); the
    /// error says what a valid value looks like.
    pub fn parse(value: &str) -> Result<Endpoints, String> {
        let bad = |why: &str| {
            format!(
                "invalid backend {value:?}: {why}; use etcd://HOST:PORT[,HOST:PORT...] \
                 (etcd+https://... for TLS), e.g. etcd://127.0.0.1:2379"
            )
        };
        let (rest, tls) = if let Some(rest) = strip_prefix_ignore_case(value, SCHEME) {
            (rest, false)
        } else if let Some(rest) = strip_prefix_ignore_case(value, TLS_SCHEME) {
            (rest, true)
        } else {
            let why = match value.split_once("://") {
                Some(("https" | "etcds", _)) => "for TLS write etcd+https://",
                Some((scheme, _)) => return Err(bad(&format!("unknown scheme {scheme:?}"))),
                None => "it does not start with etcd:// or etcd+https://",
            };
            return Err(bad(why));
        };
        // One trailing slash is what people paste from URLs; a path is something else.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(bad("a path, query or user is not allowed"));
        }
        let mut members = Vec::new();
        for member in rest.split(',') {
            members.push(parse_member(member.trim()).map_err(|why| bad(&why))?);
        }
        Ok(Endpoints { members, tls })
    }

    /// `host:port` of each member.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// Whether the members are spoken to over TLS (`etcd+https://`).
    pub fn tls(&self) -> bool {
        self.tls
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { TLS_SCHEME } else { SCHEME };
        write!(f, "{scheme}{}", self.members.join(","))
    }
}

fn strip_prefix_ignore_case<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

/// One `HOST[:PORT]`: a name, an IPv4 address or a bracketed IPv6 address.
fn parse_member(member: &str) -> Result<String, String> {
    if member.is_empty() {
        return Err("an empty member".to_owned());
    }
    let (host, port) = if let Some(bracketed) = member.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("{member:?} has no closing ']'"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{host:?} is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| format!("{member:?}: expected ':PORT' after ']'"))?,
            ),
        };
        (format!("[{host}]"), port)
    } else {
        match member.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err(format!("{member:?}: put an IPv6 address in brackets"));
            }
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (member.to_owned(), None),
        }
    };
    let host_ok = host.starts_with('[')
        || (!host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
    if !host_ok {
        return Err(format!("{host:?} is not a host name or address"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(format!("{port:?} is not a port number")),
        },
    };
    Ok(format!("{host}:{port}"))
}

/// `--backend` as given: an etcd URL. A singleflight built without the feature `etcd`
/// refuses every value, so the command line is the same in both builds.
pub fn parse_backend(value: &str) -> Result<crate::etcd::Endpoints, String> {
    if cfg!(feature = "etcd") {
        Endpoints::parse(value)
    } else {
        Err(
            "this singleflight was built without the etcd backend: build it with the \
             cargo feature etcd, which is on unless --no-default-features"
                .to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(value: &str) -> Vec<String> {
        Endpoints::parse(value).unwrap().members().to_vec()
    }

    #[test]
    fn parses_one_or_more_members() {
        assert_eq!(members("etcd://127.0.0.1:2379"), ["127.0.0.1:2379"]);
        assert_eq!(
            members("etcd://a.example:1,b-2.example:2, c:3/"),
            ["a.example:1", "b-2.example:2", "c:3"]
        );
        assert_eq!(members("ETCD://node1"), ["node1:2379"]);
        assert_eq!(
            members("etcd://[::1]:23790,[fe80::1]"),
            ["[::1]:23790", "[fe80::1]:2379"]
        );
        let endpoints = Endpoints::parse("etcd://x:1,y:2").unwrap();
        assert_eq!(endpoints.to_string(), "etcd://x:1,y:2");
        assert_eq!(endpoints.len(), 2);
        assert!(!endpoints.tls());
        let tls = Endpoints::parse("ETCD+HTTPS://x:1,[::1]").unwrap();
        assert!(tls.tls());
        assert_eq!(tls.members(), ["x:1", "[::1]:2379"]);
        assert_eq!(tls.to_string(), "etcd+https://x:1,[::1]:2379");
    }

    #[test]
    fn refuses_what_is_not_an_etcd_url() {
        for (bad, why) in [
            ("", "does not start with etcd://"),
            ("127.0.0.1:2379", "does not start with etcd://"),
            ("http://127.0.0.1:2379", "unknown scheme \"http\""),
            ("https://127.0.0.1:2379", "for TLS write etcd+https://"),
            ("etcd+https://", "an empty member"),
            ("etcd+https://a:1/v3", "a path"),
            ("etcd://", "an empty member"),
            ("etcd://a:1,,b:2", "an empty member"),
            ("etcd://a:1/v3", "a path"),
            ("etcd://user@a:1", "user"),
            ("etcd://a:0", "not a port number"),
            ("etcd://a:65536", "not a port number"),
            ("etcd://a:", "not a port number"),
            ("etcd://a:b", "not a port number"),
            ("etcd://::1:2379", "brackets"),
            ("etcd://[::1", "closing"),
            ("etcd://[nope]:1", "not an IPv6 address"),
            ("etcd://[::1]x", "expected ':PORT'"),
            ("etcd://a b:1", "not a host name"),
            ("etcd://:1", "not a host name"),
        ] {
            let err = Endpoints::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.contains(&format!("{bad:?}")), "quotes the value: {err}");
            assert!(
                err.contains("etcd://HOST:PORT"),
                "says what is valid: {err}"
            );
        }
    }
}
