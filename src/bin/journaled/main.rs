//! The `journaled` binary (feature `cli`): `main` parses the arguments and runs the command.

mod args;
mod commands;
mod db;
mod out;

use std::process::ExitCode;

use clap::Parser;

use args::Cli;

/// Parses the command line, runs it, and prints errors as one line.
fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.render().to_string();
            let line = rendered.lines().next().unwrap_or("bad arguments");
            out::error_line(format_args!(
                "journaled: {}",
                line.trim_start_matches("error: ")
            ));
            return ExitCode::from(2);
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(out::Stderr)
        // tracing-subscriber reports a failed write with eprintln!, which panics on a closed
        // stderr: out::Stderr notes it instead.
        .log_internal_errors(false)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            out::error_line(format_args!(
                "journaled: cannot start the async runtime: {e}"
            ));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(commands::run(cli));
    let code = match result {
        Ok(code) => code,
        Err(commands::Failed::PipeClosed) => ExitCode::from(out::PIPE_CLOSED_STATUS),
        Err(commands::Failed::Error(e)) => {
            out::error_line(format_args!("journaled: {e}"));
            ExitCode::FAILURE
        }
    };
    // A reader gone mid-way (stdout, or a worker's stderr) ends quietly, as SIGPIPE would.
    if out::pipe_closed() {
        ExitCode::from(out::PIPE_CLOSED_STATUS)
    } else {
        code
    }
}
