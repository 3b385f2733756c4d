//! The login token kept between calls: a file in the cache dir, so that a status line
//! that calls singleflight ten times a second does not make etcd check the password
//! (bcrypt, tens of milliseconds of its CPU) ten times a second.
//!
//! One file per etcd and user, `etcd-<hash>.token` (the hash of the endpoints and the
//! user: two clusters or two users never share one), mode `0600` in the `0700` cache
//! dir, written as results are (temp file, rename). It holds the token and an
//! HMAC-SHA256 keyed by the password over the token, the endpoints and the user: a
//! token is used only by a caller with the password that got it, for the etcd and
//! user it was got for. Anything else found there (no file, a damaged one, another
//! password's, another shape) is ignored, and replaced after the next login. Nothing
//! here is ever an error: without the file, a call logs in, as it did before.

use std::io::Read;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::{digest, hmac};
use serde::{Deserialize, Serialize};

use super::endpoints::Endpoints;
use super::login_lock::LoginLock;
use crate::store::{self, Opened, Store};
use crate::values::Name;

/// The format of the file: a file of another version is ignored.
const VERSION: u32 = 1;
/// What the HMAC covers starts with this, so that it means nothing elsewhere.
const CONTEXT: &[u8] = b"singleflight etcd login token v1";
/// More than any token etcd gives (a JWT is under 1 KiB): a larger file is not ours.
const MAX_LEN: u64 = 64 * 1024;

/// Where the token of one etcd and user is kept.
pub struct TokenFile {
    store: Store,
    path: PathBuf,
    endpoints: String,
    user: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Kept {
    version: u32,
    token: String,
    /// HMAC-SHA256 (base64) of [`CONTEXT`], the endpoints, the user and the token.
    hmac: String,
}

impl TokenFile {
    /// The file of `endpoints` and `user` in the cache dir `store`.
    pub fn new(store: Store, endpoints: &Endpoints, user: &str) -> TokenFile {
        let endpoints = endpoints.to_string();
        let hash = digest::digest(
            &digest::SHA256,
            &message(&[endpoints.as_bytes(), user.as_bytes()]),
        );
        let hex: String = hash.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        TokenFile {
            path: store.dir().join(format!("etcd-{hex}.token")),
            store,
            endpoints,
            user: user.to_owned(),
        }
    }

    /// The token kept for this etcd and user, if the file holds one whose HMAC
    /// verifies with `password`.
    pub fn load(&self, password: &str) -> Option<String> {
        let Ok(Opened::File(file, _)) = store::open_regular(&self.path) else {
            return None;
        };
        let mut bytes = Vec::new();
        file.take(MAX_LEN).read_to_end(&mut bytes).ok()?;
        let kept: Kept = serde_json::from_slice(&bytes).ok()?;
        let tag = STANDARD.decode(&kept.hmac).ok()?;
        if kept.version != VERSION || kept.token.is_empty() {
            return None;
        }
        hmac::verify(&key(password), &self.message(&kept.token), &tag).ok()?;
        Some(kept.token)
    }

    /// Keeps `token`, got with `password`, for the next call. Best effort: a cache dir
    /// that cannot be written only means the next call logs in.
    pub fn save(&self, token: &str, password: &str) {
        let tag = hmac::sign(&key(password), &self.message(token));
        let kept = Kept {
            version: VERSION,
            token: token.to_owned(),
            hmac: STANDARD.encode(tag.as_ref()),
        };
        let Ok(bytes) = serde_json::to_vec(&kept) else {
            return;
        };
        let name = Name::parse("etcd-token").expect("a valid NAME");
        if self.store.ensure().is_ok() {
            let _ = self
                .store
                .write_atomically(&name, &self.path, &bytes, false);
        }
    }

    /// The lock that makes the callers of this cache dir log in to this etcd as this
    /// user one at a time: `etcd-<hash>.login`, beside this file.
    pub fn login_lock(&self) -> LoginLock {
        LoginLock::new(self.store.clone(), self.path.with_extension("login"))
    }

    fn message(&self, token: &str) -> Vec<u8> {
        message(&[
            CONTEXT,
            self.endpoints.as_bytes(),
            self.user.as_bytes(),
            token.as_bytes(),
        ])
    }

    #[cfg(test)]
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

fn key(password: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, password.as_bytes())
}

/// The parts, each preceded by its length: no two lists of parts give the same bytes.
fn message(parts: &[&[u8]]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for part in parts {
        bytes.extend_from_slice(&(part.len() as u64).to_be_bytes());
        bytes.extend_from_slice(part);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(value: &str) -> Endpoints {
        Endpoints::parse(value).unwrap()
    }

    fn file(dir: &std::path::Path, backend: &str, user: &str) -> TokenFile {
        let store = Store::locate(Some(dir.to_owned())).unwrap();
        TokenFile::new(store, &endpoints(backend), user)
    }

    #[test]
    fn a_kept_token_is_loaded_with_its_password_only() {
        let dir = tempfile::tempdir().unwrap();
        let kept = file(dir.path(), "etcd+https://a:1,b:2", "root");
        assert_eq!(kept.load("pw"), None, "no file yet");
        kept.save("tok.1", "pw");
        assert_eq!(kept.load("pw").as_deref(), Some("tok.1"));
        assert_eq!(kept.load("other"), None, "another password");
        kept.save("tok.2", "pw");
        assert_eq!(kept.load("pw").as_deref(), Some("tok.2"), "replaced");
    }

    #[test]
    fn each_etcd_and_user_has_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = file(dir.path(), "etcd+https://a:1", "root");
        let paths = [
            a.path().to_owned(),
            file(dir.path(), "etcd+https://a:2", "root")
                .path()
                .to_owned(),
            file(dir.path(), "etcd://a:1", "root").path().to_owned(),
            file(dir.path(), "etcd+https://a:1", "alice")
                .path()
                .to_owned(),
        ];
        for (i, p) in paths.iter().enumerate() {
            assert!(paths[i + 1..].iter().all(|q| q != p), "{paths:?}");
        }
        // A file copied to another etcd's or user's name does not verify there.
        a.save("tok", "pw");
        for other in &paths[1..] {
            std::fs::copy(a.path(), other).unwrap();
        }
        for (backend, user) in [
            ("etcd+https://a:2", "root"),
            ("etcd://a:1", "root"),
            ("etcd+https://a:1", "alice"),
        ] {
            assert_eq!(file(dir.path(), backend, user).load("pw"), None);
        }
    }

    #[test]
    fn a_damaged_or_foreign_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let kept = file(dir.path(), "etcd://a:1", "root");
        kept.save("tok", "pw");
        let good = std::fs::read_to_string(kept.path()).unwrap();
        let forged = good.replace("\"tok\"", "\"tol\"");
        assert_ne!(forged, good);
        for bad in [
            forged.as_str(),
            &good[..good.len() - 1],
            "",
            "\0\u{1}garbage",
            "{}",
            "[1, 2]",
            &good.replace("\"version\":1", "\"version\":2"),
            &good.replace('{', "{\"more\":1,"),
        ] {
            std::fs::write(kept.path(), bad).unwrap();
            assert_eq!(kept.load("pw"), None, "{bad:?}");
        }
        std::fs::remove_file(kept.path()).unwrap();
        std::fs::create_dir(kept.path()).unwrap();
        assert_eq!(kept.load("pw"), None, "a directory");
    }

    #[test]
    fn an_unwritable_cache_dir_keeps_nothing_and_says_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, "").unwrap();
        let kept = file(&not_a_dir, "etcd://a:1", "root");
        kept.save("tok", "pw");
        assert_eq!(kept.load("pw"), None);
    }

    #[cfg(unix)]
    #[test]
    fn the_file_is_mode_0600_in_a_0700_dir() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let kept = file(&cache, "etcd://a:1", "root");
        kept.save("tok", "pw");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(kept.path()), 0o600);
        assert_eq!(mode(&cache), 0o700);
    }
}
