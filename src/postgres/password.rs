//! The password, as libpq finds it: `PGPASSWORD`, else the first matching line of
//! `PGPASSFILE` (default `~/.pgpass`): `host:port:database:user:password`, `*`
//! matching anything, `\:` and `\\` escaped. As libpq, a password file that group or
//! others can read is ignored (with a warning), on unix.

use std::path::PathBuf;

use super::url::{DEFAULT_PORT, Host, PgUrl};

/// The password for this URL and user, if any; warnings for the caller to print.
pub fn find(url: &PgUrl, user: &str, dbname: &str) -> (Option<String>, Option<String>) {
    if let Some(password) = std::env::var_os("PGPASSWORD") {
        return (Some(password.to_string_lossy().into_owned()), None);
    }
    let path = match std::env::var_os("PGPASSFILE") {
        Some(path) => PathBuf::from(path),
        None => match dirs::home_dir() {
            Some(home) => home.join(".pgpass"),
            None => return (None, None),
        },
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        return (None, None);
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.permissions().mode() & 0o077 != 0
        {
            let warning = format!(
                "password file {} has group or world access; it is ignored (chmod 0600 it)",
                path.display()
            );
            return (None, Some(warning));
        }
    }
    let host = match &url.host {
        Host::Tcp(host) => host.clone(),
        Host::Socket(_) => "localhost".to_owned(),
    };
    let port = url.port.to_string();
    let wanted = [host.as_str(), port.as_str(), dbname, user];
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = fields[..4]
            .iter()
            .zip(wanted)
            .all(|(field, want)| field == "*" || field == want);
        if matches {
            return (Some(fields[4..].join(":")), None);
        }
    }
    let _ = DEFAULT_PORT;
    (None, None)
}

/// The fields of a line, unescaped.
fn split(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().expect("one field").push(next);
                }
            }
            ':' => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn splits_escaped_fields() {
        assert_eq!(
            split(r"h:5432:*:u:pa\:ss\\"),
            ["h", "5432", "*", "u", r"pa:ss\"]
        );
    }
}
