//! Where a NAME lives in etcd: the keys under `--etcd-prefix`, and reading NAMEs back
//! out of a listing.
//!
//! ```text
//! <prefix><NAME>/lock      the lock: exists while a run holds it, attached to its lease;
//!                          value = who holds it (JSON), create_revision = fencing token
//! <prefix><NAME>/result    the last good result: the local entry format's bytes
//! <prefix><NAME>/failure   the last failed run (record::Failure as JSON)
//! ```

use crate::values::Name;

/// `--etcd-prefix` default.
pub const DEFAULT_PREFIX: &str = "/singleflight/";

/// A key prefix that ends with `/`, so that one NAME's keys never share a prefix with
/// another NAME that starts the same way (`a/` vs `ab/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    pub fn parse(value: &str) -> Result<Prefix, String> {
        if value.is_empty() || value.chars().any(char::is_control) {
            return Err(format!(
                "invalid etcd prefix {value:?}: use a non-empty key prefix such as {DEFAULT_PREFIX}"
            ));
        }
        let mut prefix = value.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Prefix(prefix))
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The keys of one NAME.
    pub fn keys(&self, name: &Name) -> Keys {
        let key = |kind: &str| format!("{}{name}/{kind}", self.0).into_bytes();
        Keys {
            lock: key(LOCK),
            result: key(RESULT),
            failure: key(FAILURE),
        }
    }

    /// The NAMEs that have any key under this prefix, sorted, once each (for `status`
    /// and `clear --all`). Keys that are not singleflight's are ignored.
    pub fn names<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) -> Vec<Name> {
        let mut names: Vec<Name> = keys
            .into_iter()
            .filter_map(|key| {
                let rest = std::str::from_utf8(key.strip_prefix(self.as_bytes())?).ok()?;
                let (name, kind) = rest.split_once('/')?;
                [LOCK, RESULT, FAILURE]
                    .contains(&kind)
                    .then(|| Name::parse(name).ok())?
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

impl Default for Prefix {
    fn default() -> Prefix {
        Prefix(DEFAULT_PREFIX.to_owned())
    }
}

const LOCK: &str = "lock";
const RESULT: &str = "result";
const FAILURE: &str = "failure";

/// The etcd keys of one NAME.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    pub lock: Vec<u8>,
    pub result: Vec<u8>,
    pub failure: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let name = Name::parse("ccusage").unwrap();
        let keys = Prefix::default().keys(&name);
        assert_eq!(keys.lock, b"/singleflight/ccusage/lock");
        assert_eq!(keys.result, b"/singleflight/ccusage/result");
        assert_eq!(keys.failure, b"/singleflight/ccusage/failure");
        let keys = Prefix::parse("/team-a").unwrap().keys(&name);
        assert_eq!(keys.lock, b"/team-a/ccusage/lock");
        assert!(Prefix::parse("").is_err());
        assert!(Prefix::parse("a\nb").is_err());
    }

    #[test]
    fn names_from_a_listing() {
        let prefix = Prefix::default();
        let listing: [&[u8]; 6] = [
            b"/singleflight/b/result",
            b"/singleflight/a/lock",
            b"/singleflight/a/result",
            b"/singleflight/../x/result",
            b"/singleflight/c/other",
            b"/elsewhere/d/result",
        ];
        let names: Vec<String> = prefix
            .names(listing)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }
}
