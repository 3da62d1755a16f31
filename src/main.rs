//! The `portico` command line: parse arguments, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use portico::cli::{say, say_err, StandardFlags};

#[derive(Debug, Parser)]
#[command(
    name = "portico",
    version,
    about = "Reverse proxy and load balancer with response caching"
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    standard: StandardFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parse and validate the configuration, print every error (like nginx -t).
    Check {
        /// Configuration file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Start sample order backends and the proxy in front of them.
    Demo {
        /// How many order backends to start.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
        backends: u16,
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080", value_parser = portico::cli::socket_addr)]
        listen: std::net::SocketAddr,
        /// Where the admin endpoints listen.
        #[arg(long, default_value = "127.0.0.1:9090", value_parser = portico::cli::socket_addr)]
        admin: std::net::SocketAddr,
        /// Milliseconds each backend adds before every answer (as
        /// `order-backend --delay`).
        #[arg(long, value_name = "MS", default_value_t = 0)]
        delay: u64,
        /// Requests each backend serves at once at most, the rest waiting
        /// their turn (as `order-backend --concurrency`).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
        concurrency: Option<u32>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => {
            let Some(path) = config.or(cli.config) else {
                say_err("portico check: --config FILE is required");
                return ExitCode::from(2);
            };
            // Loading validates everything, the files the config names
            // (certificates, token) included.
            match portico::config::load_keeping_text(&path) {
                Ok((config, text)) => {
                    say_check_warnings(&cli.standard, &config, &text, &path);
                    say("configuration ok");
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    refuse(&cli.standard, errors);
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Demo {
            backends,
            listen,
            admin,
            delay,
            concurrency,
        }) => {
            if let Some(path) = cli.config {
                demo_usage_error(format!(
                    "--config {} is not read by `demo`: the demo makes its own configuration (serve a file with `portico --config FILE`)",
                    path.display()
                ));
            }
            // A usage error, said before the backends start (review34d:
            // exit 1, as a failure at run time).
            if let Some(clash) = portico::demo::clash(listen, admin) {
                demo_usage_error(clash);
            }
            cli.standard.init_logging();
            run(
                &cli.standard,
                portico::demo::run(portico::demo::Demo {
                    backends: usize::from(backends),
                    listen,
                    admin,
                    delay: std::time::Duration::from_millis(delay),
                    concurrency: concurrency.map(|n| n as usize),
                }),
            )
        }
        None => {
            let Some(path) = cli.config else {
                say_err(
                    "portico: --config FILE is required (try `portico demo` or `portico --help`)",
                );
                return ExitCode::from(2);
            };
            let (config, text) = match portico::config::load_keeping_text(&path) {
                Ok(loaded) => loaded,
                Err(errors) => {
                    refuse(&cli.standard, errors);
                    return ExitCode::FAILURE;
                }
            };
            cli.standard.init_logging();
            run(&cli.standard, portico::run(path, config, text))
        }
    }
}

/// Exits 2 with `message`, under `portico demo`'s usage line, not the
/// top-level one (review35c).
fn demo_usage_error(message: String) -> ! {
    let mut command = Cli::command();
    command.build();
    let demo = command
        .find_subcommand_mut("demo")
        .expect("`demo` is a subcommand");
    demo.error(clap::error::ErrorKind::ArgumentConflict, message)
        .exit()
}

/// Says why a configuration was refused, by `check` or at start: one
/// `file:line:col: key: message` line each, or with `--log-format json`
/// one log record each, so a collector that parses every line sees why
/// (`check` ignored the flag, review32d).
fn refuse(flags: &StandardFlags, errors: portico::config::ConfigErrors) {
    if matches!(flags.log_format, portico::cli::LogFormat::Json) {
        flags.init_logging();
        for error in &errors.0 {
            tracing::error!(%error, "invalid configuration");
        }
    } else {
        say_err(errors);
    }
}

/// What the start would warn of, said by `check` before it (review35d 6:
/// `check` said only "configuration ok"), each at the line that sets it,
/// as `nginx -t` says its warnings (review42i M2). `text` is the file
/// `path` as read. With `--log-format json`, each is a log record, as the
/// errors are (ops54 L4: plain lines among JSON ones).
fn say_check_warnings(
    flags: &StandardFlags,
    config: &portico::config::Config,
    text: &str,
    path: &std::path::Path,
) {
    let mut warnings: Vec<(String, String)> = Vec::new();
    let cap = config.server.max_connections;
    if let Some((max, limit)) =
        cap.and_then(|max| portico::server::open_file_limit_short(max, true).map(|l| (max, l)))
    {
        let said = format!(
            "{} (max_connections = {max}, open-file limit {limit})",
            portico::server::OPEN_FILE_LIMIT_SHORT
        );
        warnings.push(("server.max_connections".into(), said));
    }
    let token = config.admin.token.as_ref().map(|t| t.0.as_ref());
    let keyed = [
        ("admin.token_file", portico::admin::short_token(token)),
        (
            "admin.listen",
            portico::admin::exposed(config.admin.listen).map(str::to_owned),
        ),
        (
            "server.trusted_proxies",
            portico::config::trusts_everyone(&config.server),
        ),
    ];
    for (key, said) in keyed {
        warnings.extend(said.map(|said| (key.to_owned(), said)));
    }
    for (i, listener) in config.server.tls.iter().enumerate() {
        for (j, pair) in listener.certificates.iter().enumerate() {
            let key = format!("server.tls[{i}].certificates[{j}].cert");
            let said = portico::server::tls::lapse_warning(pair);
            warnings.extend(said.map(|said| (key.clone(), said)));
            let said = portico::server::tls::cn_only_warning(pair);
            warnings.extend(said.map(|said| (key, said)));
        }
    }
    for (i, said) in portico::config::all_drained(config) {
        warnings.push((format!("upstream[{i}]"), said));
    }
    let written = portico::config::Written::new(text, path);
    // A line to wait in with nothing to wait for: a `max_conns` left out
    // or misspelt, or the cap commented out and its timeout not.
    for (i, upstream) in config.upstreams.iter().enumerate() {
        let key = format!("upstream[{i}].queue_timeout");
        if upstream.backends.iter().all(|b| b.max_conns == 0) && written.at(&key).is_some() {
            let said = format!(
                "has no effect: no backend of upstream `{}` has a max_conns (max_conns_per_backend, or max_conns in its table)",
                upstream.name
            );
            warnings.push((key, said));
        }
    }
    let json = matches!(flags.log_format, portico::cli::LogFormat::Json);
    if json && !warnings.is_empty() {
        flags.init_logging();
    }
    for (key, said) in warnings {
        let (key, at) = written.place(&key);
        if json {
            tracing::warn!(at = at.as_deref(), key = %key, "{said}");
            continue;
        }
        // The key, as errors say it, unless the warning
        // begins with it.
        let key = if said.starts_with(&key) {
            String::new()
        } else {
            format!("{key}: ")
        };
        match at {
            Some(at) => say_err(format_args!("portico check: warning: {at}: {key}{said}")),
            None => say_err(format_args!("portico check: warning: {said}")),
        }
    }
}

fn run(
    flags: &StandardFlags,
    job: impl std::future::Future<Output = std::io::Result<()>>,
) -> ExitCode {
    portico::memory::tune_allocator();
    raise_open_file_limit();
    let result = flags.runtime().and_then(|rt| {
        let result = rt.block_on(job);
        // A blocking task still running held the exit for good: a reload
        // opening a FIFO nobody writes to any more, after which SIGTERM
        // drained every connection and the process stayed (review42k
        // M1). What is left gets a second.
        rt.shutdown_timeout(std::time::Duration::from_secs(1));
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Once: the log is on stderr too, so the plain line is only
            // for when the log filter hides the error.
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!(%error, "portico stopped");
            } else {
                say_err(format_args!("portico: {error}"));
            }
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard one, as Go's runtime
/// and HAProxy do and nginx's `worker_rlimit_nofile` lets an operator do:
/// a proxy holds two sockets per request in flight, and the usual soft
/// limit of 1024 runs out at ~500 clients, far below what the hard limit
/// (often 524288) allows. Out of descriptors portico answers 503 and
/// accepts nothing until some close.
#[cfg(unix)]
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let was = limit.rlim_cur;
    if was >= limit.rlim_max {
        return;
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        tracing::debug!(from = was, to = limit.rlim_cur, "open-file limit raised");
    }
}

#[cfg(not(unix))]
fn raise_open_file_limit() {}
