// On Linux with glibc, singleflight has its own C entry point instead of std's: see
// `main` at the bottom. (Not in the unit-test build, whose harness brings its own.)
#![cfg_attr(all(target_os = "linux", target_env = "gnu", not(test)), no_main)]

use std::io::Write;

use singleflight::Cli;
use singleflight::exit;

/// A static arena first (see `singleflight::Arena`): a hit maps no memory.
#[global_allocator]
static ALLOCATOR: singleflight::Arena = singleflight::Arena;

/// Parses the command line, runs it, reports an error; returns the exit status.
fn parse_and_run() -> u8 {
    #[cfg(all(unix, not(all(target_os = "linux", target_env = "gnu", not(test)))))]
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == singleflight::GUARD_ARG)
    {
        return guard_main();
    }
    // A fresh hit is served before clap parses anything (see `singleflight::serve_fresh`);
    // anything else goes the whole way.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(result) = singleflight::serve_fresh(&args) {
        return finish(result, false);
    }
    drop(args);
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

#[cfg(not(all(target_os = "linux", target_env = "gnu", not(test))))]
fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(parse_and_run())
}

/// The entry point glibc calls, in place of std's. std's set-up before `main` reads
/// `/proc/self/maps` to locate the main thread's stack guard and maps an alternate
/// signal stack for its stack-overflow message: measured ~70 µs, about a tenth of
/// `cat`-ing a 10 KiB result, on a path that does little else (a fresh hit).
/// [`prepare`](singleflight::prepare) does the part singleflight needs.
/// glibc hands argv to std before this runs, so `std::env::args` works as usual;
/// a stack overflow is a plain SIGSEGV without std's message.
#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
#[unsafe(no_mangle)]
extern "C" fn main(argc: libc::c_int, argv: *const *const libc::c_char) -> libc::c_int {
    // The guard's hidden mode, told from argv in place: a hit pays one comparison.
    // SAFETY: glibc passes argc valid, NUL-terminated strings in argv.
    if argc > 1
        && unsafe { std::ffi::CStr::from_ptr(*argv.add(1)) }.to_bytes()
            == singleflight::GUARD_ARG.as_bytes()
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
