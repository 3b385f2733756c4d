//! Where a NAME lives in etcd: the keys under `--etcd-prefix`, and reading NAMEs back
//! out of a listing.
//!
//! ```text
//! <prefix><NAME>/lock      the lock: exists while a run holds it, attached to its lease;
//!                          value = who holds it (JSON), create_revision = fencing token
//! <prefix><NAME>/result    the last good result: the local entry format's bytes
//! <prefix><NAME>/failure   the last failed run (record::Failure as JSON)
//! <prefix><NAME>/key       the key values of a keyed slot (JSON), for `status`
//! ```
//!
//! A keyed slot (`--key-cwd`, `--key-env`, `--key-file`) is `NAME@<16 hex>` in place of
//! `NAME`, as in the cache dir.

use std::fmt;

use crate::key::SlotId;

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

    /// The keys of one slot: a NAME, or a [`SlotId`].
    pub fn keys(&self, slot: &impl fmt::Display) -> Keys {
        let key = |kind: &str| format!("{}{slot}/{kind}", self.0).into_bytes();
        Keys {
            lock: key(LOCK),
            result: key(RESULT),
            failure: key(FAILURE),
            key: key(KEY),
        }
    }

    /// The slots that have any key under this prefix, sorted, once each.
    pub fn slots<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) -> Vec<SlotId> {
        let mut slots: Vec<SlotId> = keys
            .into_iter()
            .filter_map(|key| {
                let rest = std::str::from_utf8(key.strip_prefix(self.as_bytes())?).ok()?;
                let (slot, kind) = rest.split_once('/')?;
                [LOCK, RESULT, FAILURE, KEY]
                    .contains(&kind)
                    .then(|| SlotId::parse(slot))?
            })
            .collect();
        slots.sort();
        slots.dedup();
        slots
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
const KEY: &str = "key";

/// The etcd keys of one NAME.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    pub lock: Vec<u8>,
    pub result: Vec<u8>,
    pub failure: Vec<u8>,
    pub key: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::Name;

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
            .slots(listing)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn keyed_slots_from_a_listing() {
        let prefix = Prefix::default();
        let slot = SlotId::parse("a@0123456789abcdef").unwrap();
        assert_eq!(
            prefix.keys(&slot).key,
            b"/singleflight/a@0123456789abcdef/key"
        );
        let listing: [&[u8]; 4] = [
            b"/singleflight/a@0123456789abcdef/key",
            b"/singleflight/a@0123456789abcdef/result",
            b"/singleflight/a/result",
            b"/singleflight/a@xyz/result",
        ];
        let slots: Vec<String> = prefix
            .slots(listing)
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(slots, ["a", "a@0123456789abcdef"]);
    }
}
