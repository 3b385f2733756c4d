use std::io::Write;
use std::process::ExitCode;

use singleflight::cli::Cli;
use singleflight::exit;

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    let status = match singleflight::run(cli) {
        Ok(status) => status,
        // A reader that went away (`status | head`) is not worth a word.
        Err(error) if is_broken_pipe(&error) => 0,
        Err(error) => {
            // Not eprintln!, which panics when stderr is gone (a closed terminal).
            let _ = writeln!(std::io::stderr(), "singleflight: {error:#}");
            exit::status_of(&error)
        }
    };
    // Statuses outside 0..=255 (a Windows exit code, say) are reported as failure.
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}
