//! `--stdin`: the caller's stdin, read once to its end (up to [`STDIN_MAX`]) before
//! anything else, for the stdin keys and for the run (see `Flight::stdin_file`).

use std::io::{self, Read};

use anyhow::Result;

use crate::exit::{Exit, Status};
use crate::values::Name;

/// The most stdin `--stdin` takes: a Claude Code status-line object is a few KiB.
pub const STDIN_MAX: u64 = 1 << 20;

/// Reads stdin to its end. More than [`STDIN_MAX`] is a usage error (exit 2), and
/// nothing runs.
pub fn read_stdin(name: &Name) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let read = io::stdin()
        .lock()
        .take(STDIN_MAX + 1)
        .read_to_end(&mut bytes);
    if let Err(e) = read {
        let message = format!("{name}: --stdin: cannot read stdin: {e}; the command was not run");
        return Err(Exit::new(Status::Usage, message).into());
    }
    if bytes.len() as u64 > STDIN_MAX {
        let message =
            format!("{name}: --stdin: stdin is over the cap of 1 MiB; the command was not run");
        return Err(Exit::new(Status::Usage, message).into());
    }
    Ok(bytes)
}
