//! What singleflight says on stderr: with `-v` one line for the decision of the call,
//! warnings unless `-q`. Errors are printed by `main`.

use std::fmt;
use std::io::{self, Write};

use crate::values::Name;

#[derive(Clone, Debug)]
pub struct Say {
    name: Option<Name>,
    verbose: bool,
    quiet: bool,
}

impl Say {
    pub fn new(name: Option<Name>, verbose: bool, quiet: bool) -> Say {
        Say {
            name,
            verbose,
            quiet,
        }
    }

    /// Whether the `-v` line is wanted: spares the hit path building a line nobody reads.
    pub fn is_verbose(&self) -> bool {
        self.verbose
    }

    /// The one `-v` line saying what was decided and why.
    pub fn decided(&self, what: fmt::Arguments) {
        if self.verbose {
            self.line(what);
        }
    }

    pub fn warn(&self, what: fmt::Arguments) {
        if !self.quiet {
            self.line(what);
        }
    }

    /// An error that does not end the call (it goes on to serve something): said even
    /// with `-q`, as `main` says the errors that do.
    pub fn error(&self, what: fmt::Arguments) {
        self.line(what);
    }

    /// One line on stderr. A failed write is ignored: `eprintln!` would panic when the
    /// terminal is gone (EIO after SIGHUP), in the middle of stopping a run.
    fn line(&self, what: fmt::Arguments) {
        let mut stderr = io::stderr().lock();
        let _ = match &self.name {
            Some(name) => writeln!(stderr, "singleflight: {name}: {what}"),
            None => writeln!(stderr, "singleflight: {what}"),
        };
    }
}
