//! `order-backend`: the sample order backend as its own process. SIGTERM or
//! SIGINT stops it gracefully: in-flight requests finish and the queued
//! order confirmations are done, within a bounded grace.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use portico::cli::say_err;
use portico::sample::{self, BackendOptions};

#[derive(Debug, Parser)]
#[command(
    name = "order-backend",
    version,
    about = "The sample order backend behind portico's tests and demos"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", value_parser = portico::cli::socket_addr)]
    listen: SocketAddr,
    /// Instance name, sent in X-Backend: visible ASCII, at most 64 bytes.
    #[arg(long, value_parser = instance_name)]
    name: String,
    /// Milliseconds added before every answer.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay: u64,
    /// max-age of cacheable answers, in seconds.
    #[arg(long, value_name = "S", default_value_t = 10)]
    max_age: u32,
    /// Requests served at once at most, the rest waiting their turn (an
    /// app server's workers); with --delay, the instance's capacity.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: Option<u32>,
    #[command(flatten)]
    standard: portico::cli::StandardFlags,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.standard.init_logging();
    let runtime = match cli.standard.runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            say_err(format_args!(
                "order-backend: cannot start the runtime: {error}"
            ));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let stop = portico::signal::terminate_or_hangup();
        let listener = tokio::net::TcpListener::bind(cli.listen)
            .await
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", cli.listen))
            })?;
        tracing::info!(addr = %listener.local_addr()?, name = %cli.name, "listening");
        sample::warn_if_public(cli.listen);
        // A store of its own: ids that say whose they are.
        let repository = sample::new_repository_for(&cli.name);
        let opts = BackendOptions {
            name: cli.name,
            delay: Duration::from_millis(cli.delay),
            max_age: cli.max_age,
            concurrency: cli.concurrency.map(|n| n as usize),
        };
        sample::serve(listener, opts, repository, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            say_err(format_args!("order-backend: {error}"));
            ExitCode::FAILURE
        }
    }
}

/// An instance name fit for a header value and a log line: the point of
/// the name is to show which instance answered, so one that could not be
/// sent as it is (`bad\r\nX-Injected: 1`, empty) is refused, not replaced.
fn instance_name(name: &str) -> Result<String, String> {
    // No spaces either: a header value loses its outer ones, so
    // `X-Backend` would not say the name given.
    let visible = name.bytes().all(|b| b.is_ascii_graphic());
    if name.is_empty() || name.len() > 64 || !visible {
        return Err(
            "give 1 to 64 visible ASCII characters, no spaces (letters, digits, `-`, ...)"
                .to_owned(),
        );
    }
    Ok(name.to_owned())
}
