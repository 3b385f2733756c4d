//! What a result is keyed by besides NAME and argv: `--key-cwd`, `--key-env`,
//! `--key-file`. The directory, the variables and the file paths pick the *slot* (its
//! own lock, result and side files, `NAME@<16 hex>`); the files' states are part of the
//! result's identity inside the slot, like argv: a result taken with another state of a
//! file is never served.
//!
//! A file's state is one `stat`: (device, inode, size, mtime in ns, ctime in ns), or
//! "missing". Any write updates mtime and ctime, a rename over the file brings another
//! inode, and no user can set ctime back; so a state never comes back once the file
//! changed, which is also why the state is not part of the slot (an old state's slot
//! would never be hit again, only pile up).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use crate::exit::{Exit, Status};
use crate::values::Name;

/// The key flags of a run call, as given.
#[derive(Clone, Debug, Default)]
pub struct KeySpec {
    pub cwd: bool,
    pub env: Vec<OsString>,
    pub files: Vec<PathBuf>,
    /// `--key-stdin`: the whole of stdin.
    pub stdin: bool,
    /// `--key-stdin-json`: RFC 6901 pointers into the JSON on stdin.
    pub stdin_json: Vec<String>,
}

impl KeySpec {
    pub fn is_empty(&self) -> bool {
        !self.cwd
            && self.env.is_empty()
            && self.files.is_empty()
            && !self.stdin
            && self.stdin_json.is_empty()
    }
}

/// The longest stdin-JSON key value `status` shows as it is; a longer one is shown as
/// its digest.
const SHOWN_MAX: usize = 64;

/// A digest of bytes as `status` shows it, in place of the bytes.
fn shown_digest(bytes: &[u8]) -> String {
    format!("xxh3:{:016x} ({} bytes)", xxh3_64(bytes), bytes.len())
}

/// Which slot of a NAME: the plain one (no key flags, the file names of old), or the
/// one of a set of key values (`NAME@<16 hex digits of their hash>`). A NAME never
/// contains `@`, so the two never collide.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotId {
    pub name: Name,
    /// The 16 lowercase hex digits after `@`; `None` for the plain slot.
    pub key: Option<String>,
}

/// The hex digits of a slot's key.
const KEY_HEX_LEN: usize = 16;

impl SlotId {
    pub fn plain(name: &Name) -> SlotId {
        SlotId {
            name: name.clone(),
            key: None,
        }
    }

    /// A file stem or etcd key component: `NAME` or `NAME@<16 hex>`.
    pub fn parse(text: &str) -> Option<SlotId> {
        let (name, key) = match text.split_once('@') {
            None => (text, None),
            Some((name, key)) => {
                let hex = key.len() == KEY_HEX_LEN
                    && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                if !hex {
                    return None;
                }
                (name, Some(key.to_owned()))
            }
        };
        Some(SlotId {
            name: Name::parse(name).ok()?,
            key,
        })
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            None => write!(f, "{}", self.name),
            Some(key) => write!(f, "{}@{key}", self.name),
        }
    }
}

/// One key value as `status` shows it: `cwd` = the directory, `env:VAR` = its value
/// (`null` when unset), `file` = the file's absolute path, `stdin` = a digest of
/// stdin, `stdin-json:POINTER` = the JSON value there (a digest if long; `null` when
/// missing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Option<String>,
}

impl fmt::Display for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(pointer) = self.key.strip_prefix("stdin-json:") {
            return match &self.value {
                None => write!(f, "stdin {pointer} missing"),
                Some(value) => write!(f, "stdin {pointer}={value}"),
            };
        }
        match (&self.value, self.key.strip_prefix("env:")) {
            (None, Some(var)) => write!(f, "{var} unset"),
            (Some(value), Some(var)) => write!(f, "{var}={value}"),
            (None, None) => write!(f, "{}", self.key),
            (Some(value), None) => write!(f, "{} {value}", self.key),
        }
    }
}

/// The key values of one call, taken once on arrival.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub id: SlotId,
    /// What `status` shows of the slot (empty for the plain slot).
    pub values: Vec<KeyValue>,
    /// The `--key-file` states, encoded; empty without `--key-file`.
    file_states: Vec<u8>,
}

impl Resolved {
    /// The plain slot of NAME: no key flags.
    pub fn plain(name: &Name) -> Resolved {
        Resolved {
            id: SlotId::plain(name),
            values: Vec::new(),
            file_states: Vec::new(),
        }
    }

    /// The identity of a result inside the slot: the argv digest, with the files'
    /// states folded in when there are any (without `--key-file` it is the argv digest
    /// itself, as it always was).
    pub fn result_digest(&self, argv_digest: String) -> String {
        if self.file_states.is_empty() {
            return argv_digest;
        }
        let mut bytes = argv_digest.into_bytes();
        bytes.extend_from_slice(&self.file_states);
        format!("{:032x}", xxh3_128(&bytes))
    }
}

/// Takes the key values of this call: the current directory (`getcwd`, with
/// `--key-cwd` or a relative `--key-file`), the variables (no syscall), one `stat`
/// per file, and what `stdin` (read by `--stdin`) holds. Without key flags nothing is
/// looked at.
pub fn resolve(name: &Name, spec: &KeySpec, stdin: Option<&[u8]>) -> Result<Resolved> {
    if spec.is_empty() {
        return Ok(Resolved::plain(name));
    }
    let needs_cwd = spec.cwd || spec.files.iter().any(|f| f.is_relative());
    let cwd = if needs_cwd {
        Some(std::env::current_dir().map_err(|e| {
            Exit::new(
                Status::Internal,
                format!("{name}: cannot read the current directory for the key: {e}"),
            )
        })?)
    } else {
        None
    };
    let mut identity = Encoder::new(b"singleflight slot 1");
    identity.bytes(name.as_str().as_bytes());
    let mut values = Vec::new();
    if let (true, Some(cwd)) = (spec.cwd, &cwd) {
        identity.tag(b'c').os(cwd.as_os_str());
        values.push(KeyValue {
            key: "cwd".to_owned(),
            value: Some(cwd.to_string_lossy().into_owned()),
        });
    }
    let mut vars: Vec<&OsString> = spec.env.iter().collect();
    vars.sort();
    vars.dedup();
    for var in vars {
        let value = std::env::var_os(var);
        identity.tag(b'e').os(var);
        match &value {
            Some(value) => identity.tag(1).os(value),
            None => identity.tag(0),
        };
        values.push(KeyValue {
            key: format!("env:{}", var.to_string_lossy()),
            value: value.map(|v| v.to_string_lossy().into_owned()),
        });
    }
    if spec.stdin || !spec.stdin_json.is_empty() {
        stdin_keys(
            name,
            spec,
            stdin.unwrap_or_default(),
            &mut identity,
            &mut values,
        )?;
    }
    let mut files: Vec<PathBuf> = spec
        .files
        .iter()
        .map(|file| match &cwd {
            Some(cwd) if file.is_relative() => cwd.join(file),
            _ => file.clone(),
        })
        .collect();
    files.sort();
    files.dedup();
    let mut states = Encoder::new(b"singleflight files 1");
    for file in &files {
        identity.tag(b'f').os(file.as_os_str());
        states.os(file.as_os_str());
        file_state(file, &mut states);
        values.push(KeyValue {
            key: "file".to_owned(),
            value: Some(file.to_string_lossy().into_owned()),
        });
    }
    Ok(Resolved {
        id: SlotId {
            name: name.clone(),
            key: Some(format!("{:016x}", xxh3_64(&identity.0))),
        },
        values,
        file_states: if files.is_empty() {
            Vec::new()
        } else {
            states.0
        },
    })
}

/// The stdin keys: the whole of stdin (`--key-stdin`), the values at JSON pointers
/// (`--key-stdin-json`). Stdin that is not JSON is a usage error (exit 2: nothing
/// runs); a pointer to nothing is a key value of its own, as an unset variable is.
fn stdin_keys(
    name: &Name,
    spec: &KeySpec,
    stdin: &[u8],
    identity: &mut Encoder,
    values: &mut Vec<KeyValue>,
) -> Result<()> {
    if spec.stdin {
        identity.tag(b's').bytes(stdin);
        values.push(KeyValue {
            key: "stdin".to_owned(),
            value: Some(shown_digest(stdin)),
        });
    }
    if spec.stdin_json.is_empty() {
        return Ok(());
    }
    let json: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
        Exit::new(
            Status::Usage,
            format!("{name}: --key-stdin-json: stdin is not JSON ({e}); the command was not run"),
        )
    })?;
    let mut pointers: Vec<&String> = spec.stdin_json.iter().collect();
    pointers.sort();
    pointers.dedup();
    for pointer in pointers {
        identity.tag(b'j').bytes(pointer.as_bytes());
        // serde_json's maps are sorted (its preserve_order feature is off): one value
        // has one text, whatever the order of its keys on stdin.
        let value = json.pointer(pointer).map(|value| value.to_string());
        match &value {
            Some(text) => identity.tag(1).bytes(text.as_bytes()),
            None => identity.tag(0),
        };
        values.push(KeyValue {
            key: format!("stdin-json:{pointer}"),
            value: value.map(|text| {
                if text.len() <= SHOWN_MAX {
                    text
                } else {
                    shown_digest(text.as_bytes())
                }
            }),
        });
    }
    Ok(())
}

/// Appends the state of `file` (one `stat`, following symlinks: the state of what the
/// path names now). A missing file is a state of its own; so is one that cannot be
/// looked at (by its error), which changes when it becomes readable.
fn file_state(file: &Path, out: &mut Encoder) {
    match std::fs::metadata(file) {
        Ok(meta) => {
            out.tag(b'+').u64(meta.len());
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                out.u64(meta.dev()).u64(meta.ino());
                out.i64(meta.mtime()).i64(meta.mtime_nsec());
                out.i64(meta.ctime()).i64(meta.ctime_nsec());
            }
            #[cfg(not(unix))]
            {
                let since = |t: io::Result<std::time::SystemTime>| {
                    t.ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos() as u64)
                };
                out.u64(since(meta.modified())).u64(since(meta.created()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            out.tag(b'-');
        }
        Err(e) => {
            out.tag(b'!').i64(i64::from(e.raw_os_error().unwrap_or(-1)));
        }
    }
}

/// An unambiguous byte encoding of what is hashed: every variable-length part is
/// length-prefixed.
struct Encoder(Vec<u8>);

impl Encoder {
    fn new(domain: &[u8]) -> Encoder {
        let mut encoder = Encoder(Vec::with_capacity(128));
        encoder.bytes(domain);
        encoder
    }

    fn tag(&mut self, tag: u8) -> &mut Encoder {
        self.0.push(tag);
        self
    }

    fn bytes(&mut self, bytes: &[u8]) -> &mut Encoder {
        self.u64(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
        self
    }

    fn os(&mut self, text: &OsStr) -> &mut Encoder {
        self.bytes(text.as_encoded_bytes())
    }

    fn u64(&mut self, n: u64) -> &mut Encoder {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }

    fn i64(&mut self, n: i64) -> &mut Encoder {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> Name {
        Name::parse("lint").unwrap()
    }

    #[test]
    fn slot_ids_parse_and_print() {
        let plain = SlotId::parse("lint").unwrap();
        assert_eq!(plain, SlotId::plain(&name()));
        assert_eq!(plain.to_string(), "lint");
        let keyed = SlotId::parse("lint@0123456789abcdef").unwrap();
        assert_eq!(keyed.key.as_deref(), Some("0123456789abcdef"));
        assert_eq!(keyed.to_string(), "lint@0123456789abcdef");
        for bad in [
            "lint@",
            "lint@0123",
            "lint@0123456789ABCDEF",
            "@0123456789abcdef",
            "a/b",
        ] {
            assert!(SlotId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn no_key_flags_is_the_plain_slot_and_the_argv_digest() {
        let resolved = resolve(&name(), &KeySpec::default(), None).unwrap();
        assert_eq!(resolved.id, SlotId::plain(&name()));
        assert_eq!(resolved.result_digest("abc".to_owned()), "abc");
    }

    #[test]
    fn env_set_unset_and_order() {
        // PATH is set in any test run; the other is set by nobody. (No set_var: the
        // test harness runs tests on threads that may read the environment.)
        let spec = |vars: &[&str]| KeySpec {
            env: vars.iter().map(OsString::from).collect(),
            ..KeySpec::default()
        };
        let unset = "SF_KEY_TEST_NEVER_SET";
        let ab = resolve(&name(), &spec(&["PATH", unset]), None).unwrap();
        let ba = resolve(&name(), &spec(&[unset, "PATH", unset]), None).unwrap();
        assert_eq!(ab.id, ba.id, "the order of --key-env does not matter");
        assert!(ab.values[0].to_string().starts_with("PATH="));
        assert_eq!(ab.values[1].to_string(), format!("{unset} unset"));
        let path_only = resolve(&name(), &spec(&["PATH"]), None).unwrap();
        assert_ne!(ab.id, path_only.id, "an unset variable is a key value too");
        let other = resolve(&Name::parse("other").unwrap(), &spec(&["PATH"]), None).unwrap();
        assert_ne!(
            other.id.key, path_only.id.key,
            "the NAME is part of the slot"
        );
    }

    #[test]
    fn a_file_state_changes_the_digest_not_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        let spec = KeySpec {
            files: vec![file.clone()],
            ..KeySpec::default()
        };
        let digest = |r: &Resolved| r.result_digest("argv".to_owned());
        let missing = resolve(&name(), &spec, None).unwrap();
        std::fs::write(&file, "a").unwrap();
        let present = resolve(&name(), &spec, None).unwrap();
        assert_eq!(missing.id, present.id);
        assert_ne!(digest(&missing), digest(&present));
        assert_eq!(
            digest(&present),
            digest(&resolve(&name(), &spec, None).unwrap())
        );
        let other = dir.path().join("g");
        std::fs::write(&other, "b").unwrap();
        std::fs::rename(&other, &file).unwrap();
        assert_ne!(
            digest(&present),
            digest(&resolve(&name(), &spec, None).unwrap())
        );
    }
}
