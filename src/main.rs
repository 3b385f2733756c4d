// On Linux (glibc or musl), singleflight has its own C entry point instead of std's:
// see `main` at the bottom. (Not in the unit-test build, whose harness brings its own.)
#![cfg_attr(all(target_os = "linux", not(test)), no_main)]

use std::io::Write;

use singleflight::Cli;
use singleflight::exit;

/// A static arena first (see `singleflight::Arena`): a hit maps no memory.
#[global_allocator]
static ALLOCATOR: singleflight::Arena = singleflight::Arena;

/// Parses the command line, runs it, reports an error; returns the exit status.
fn parse_and_run() -> u8 {
    #[cfg(all(unix, not(all(target_os = "linux", not(test)))))]
    if singleflight::args()
        .get(1)
        .is_some_and(|a| a == singleflight::GUARD_ARG)
    {
        return guard_main();
    }
    // A fresh hit is served before clap parses anything (see `singleflight::serve_fresh`);
    // anything else goes the whole way.
    if let Some(result) = singleflight::serve_fresh(singleflight::args().get(1..).unwrap_or(&[])) {
        return finish(result, false);
    }
    let cli = Cli::parse_args();
    let quiet = cli.global.quiet;
    finish(singleflight::run(cli), quiet)
}

/// Reports the outcome of a call; returns the exit status.
fn finish(result: anyhow::Result<i32>, quiet: bool) -> u8 {
    let status = match result {
        Ok(status) => status,
        // A reader that went away (`status | head`) is not worth a word.
        Err(error) if is_broken_pipe(&error) => 0,
        // Everything that held a lock or a temp file has been dropped on the way here.
        Err(error) if killed_by(&error).is_some() => {
            singleflight::die_of(killed_by(&error).unwrap_or_default())
        }
        // A skipped tick (another run in flight) is a warning: `-q` keeps cron quiet.
        Err(error) if quiet && is_skipped(&error) => exit::status_of(&error).code(),
        Err(error) => {
            // Not eprintln!, which panics when stderr is gone (a closed terminal).
            let _ = writeln!(std::io::stderr(), "singleflight: {error:#}");
            exit::status_of(&error).code()
        }
    };
    // Statuses outside 0..=255 (a Windows exit code, say) are reported as failure.
    u8::try_from(status).unwrap_or(1)
}

fn killed_by(error: &anyhow::Error) -> Option<i32> {
    error.downcast_ref::<exit::Exit>()?.signal
}

fn is_skipped(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<exit::Exit>()
        .is_some_and(|exit| exit.skipped)
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

#[cfg(not(all(target_os = "linux", not(test))))]
fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(parse_and_run())
}

/// The entry point the C library calls, in place of std's. std's set-up before `main`
/// maps an alternate signal stack for its stack-overflow message and installs its
/// SIGSEGV and SIGBUS handlers (with glibc it also reads `/proc/self/maps` to locate
/// the main thread's stack guard): 12 system calls of the 25 of a fresh hit of the
/// static build, about 70 µs with glibc, on a path that does little else.
/// [`prepare`](singleflight::prepare) does the part singleflight needs. argv is kept
/// for [`singleflight::args`] (with musl std never learns it). A stack overflow is a
/// plain SIGSEGV without std's message.
#[cfg(all(target_os = "linux", not(test)))]
#[unsafe(no_mangle)]
extern "C" fn main(argc: libc::c_int, argv: *const *const libc::c_char) -> libc::c_int {
    use std::os::unix::ffi::OsStrExt;
    let argc = usize::try_from(argc).unwrap_or(0);
    let args = (0..argc)
        .map(|i| {
            // SAFETY: the C library passes argc valid, NUL-terminated strings in argv.
            let arg = unsafe { std::ffi::CStr::from_ptr(*argv.add(i)) };
            std::ffi::OsStr::from_bytes(arg.to_bytes()).to_owned()
        })
        .collect();
    singleflight::keep_args(args);
    // The guard's hidden mode, told from argv first.
    if singleflight::args()
        .get(1)
        .is_some_and(|a| a == singleflight::GUARD_ARG)
    {
        return guard_main().into();
    }
    singleflight::prepare();
    let status = parse_and_run();
    // std's runtime flushes stdout at exit; returning from here does not.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    status.into()
}

/// `singleflight __guard …`: the guard of a run (see `singleflight::guard`).
#[cfg(unix)]
fn guard_main() -> u8 {
    u8::try_from(singleflight::guard_main()).unwrap_or(1)
}
