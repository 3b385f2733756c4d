//! What singleflight says on stderr: with `-v` one line for the decision of the call,
//! warnings unless `-q`. Errors are printed by `main`.

use std::fmt;

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

    fn line(&self, what: fmt::Arguments) {
        match &self.name {
            Some(name) => eprintln!("singleflight: {name}: {what}"),
            None => eprintln!("singleflight: {what}"),
        }
    }
}
