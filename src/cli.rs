//! The flags both binaries take (DESIGN: "standard flags"), the runtime
//! they ask for, and how they say things on their terminal.

use clap::{Args, ValueEnum};

/// `--threads N` and `--log-format text|json`.
#[derive(Debug, Args)]
pub struct StandardFlags {
    /// Worker threads, 1 to 1024 (default: the number of cores).
    // Bounded: tokio panics when the OS refuses a worker thread (a pids
    // limit), and the process then hung rather than exiting.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl StandardFlags {
    /// Installs the log subscriber in the format asked for.
    pub fn init_logging(&self) {
        crate::logging::init(matches!(self.log_format, LogFormat::Json));
    }

    /// The runtime for `--threads`.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = match self.threads {
            // One worker needs no work stealing: the current-thread
            // scheduler skips the cross-thread queues and wakeups entirely.
            Some(1) => tokio::runtime::Builder::new_current_thread(),
            Some(n) => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(usize::from(n));
                builder
            }
            None => tokio::runtime::Builder::new_multi_thread(),
        };
        builder.enable_all().thread_name("portico-worker").build()
    }
}

/// A line to stdout; one that cannot be written (a closed pipe:
/// `portico demo | head`) is dropped rather than panicking, as `println!`
/// would, taking the process with it.
pub fn say(text: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// [`say`] to stderr.
pub fn say_err(text: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// A listening address from the command line: an IP literal and a port, as
/// in the config file. The standard library's refusal of `localhost:8080`
/// ("invalid socket address syntax") did not say what was wanted
/// (review35c).
pub fn socket_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    text.parse().map_err(|_| {
        "not an IP address with a port: write e.g. 127.0.0.1:8080 or [::1]:8080 (names such as localhost are not resolved)".to_owned()
    })
}
