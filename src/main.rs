//! The `tapeline` binary: parse the command line, start tracing, run. Nothing else.

mod cli;

use clap::Parser;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // The broker logs at info; client commands only speak up for warnings.
    let default = match cli.command {
        cli::Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_env("TAPELINE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let json = matches!(&cli.command, cli::Command::Serve(args) if args.log_format == "json");
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        // Colours only for a person at a terminal, plain text for files and pipes.
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tapeline: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tapeline: {err}");
            cli::exit_code(&err)
        }
    };
    // A read of standard input cannot be cancelled; do not wait for a line that may never come.
    runtime.shutdown_background();
    code
}
