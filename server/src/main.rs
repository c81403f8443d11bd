//! `sluice`: the command line. Everything it does lives in the `sluice_server` library.

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use sluice_server::config::{ServerConfig, Settings};
use sluice_server::logging;

/// Sluice: an OpenAI-compatible LLM inference server with dynamic batching.
#[derive(Parser)]
#[command(name = "sluice", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over the OpenAI API (`sluice serve --model models/x.gguf`).
    Serve(Settings),
}

fn main() -> ExitCode {
    let command = Cli::command();
    // `sluice --help` lists every `serve` flag and its environment twin, not just the subcommand.
    let serve_help = command
        .find_subcommand("serve")
        .map(|c| c.clone().bin_name("sluice serve").render_long_help().to_string())
        .unwrap_or_default();
    let command = command.after_long_help(format!("`sluice serve` options:\n\n{serve_help}"));
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let Command::Serve(settings) = cli.command;
    let config = match ServerConfig::load(settings) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sluice: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.log_format, &config.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sluice: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(sluice_server::serve(config));
    // A model still loading on a blocking thread must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}
