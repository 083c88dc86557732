//! The `tickgate` binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tickgate::cli::{self, Cli, Command, LogFormat, TokenAction};
use tickgate::config::Settings;
use tracing_subscriber::EnvFilter;

/// Every request allocates and frees many small values (the parsed body, the task, its record,
/// the answer) across threads; glibc's malloc spent a quarter of the HTTP threads' time
/// consolidating and unlinking free chunks, mimalloc's per-thread free lists do not (#16,
/// docs/benchmarks.md). Built without transparent huge pages (the `no_thp` feature): the kernel
/// zeroing a fresh 2 MiB page in the middle of a request was the fire-and-forget p99.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let command = cli.command.as_ref().unwrap_or(&Command::Serve);
    match command {
        // Operator commands talk to a running server and need no config file.
        Command::Tasks { remote, action } => cli::tasks(remote, action),
        Command::Agents { remote } => cli::agents(remote),
        Command::Serve | Command::Check | Command::Token { .. } => match cli::settings(&cli) {
            Ok(settings) => with_config(command, settings),
            Err(e) => {
                eprintln!("tickgate: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// The commands that read the config.
fn with_config(command: &Command, settings: Settings) -> ExitCode {
    match command {
        Command::Serve => match tickgate::app::serve(settings) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tickgate: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check => {
            println!(
                "{}: OK ({} agents)",
                settings.source_name,
                settings.agents.len()
            );
            ExitCode::SUCCESS
        }
        Command::Token {
            action: TokenAction::Rotate { agent },
        } => match cli::rotate(&settings, agent) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tickgate: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Tasks { remote, action } => cli::tasks(remote, action),
        Command::Agents { remote } => cli::agents(remote),
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only on a terminal: in files, pipes and journald they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
