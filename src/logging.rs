//! Log output for both binaries: `RUST_LOG` (default `info`) to stderr, as
//! text or one JSON object a line.

/// Colours for a person at a terminal; none in files, pipes and journald,
/// nor when `NO_COLOR` is set.
fn colour_on_stderr() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber; `json` for one JSON object a line.
pub fn init(json: bool) {
    let (filter, refused) = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(error) => {
            // Unset or empty is the default, not a mistake.
            let given = std::env::var("RUST_LOG")
                .ok()
                .filter(|v| !v.trim().is_empty());
            (
                tracing_subscriber::EnvFilter::new("info"),
                given.map(|given| (given, error)),
            )
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // A log line that cannot be written (stderr a pipe whose reader
        // died: a restarted collector, a `| logger` gone) is dropped, as
        // nginx drops it. Reported, it goes to the same broken stderr by
        // `eprintln!`, whose panic took down the request (or the process)
        // that logged.
        .log_internal_errors(false)
        .with_ansi(colour_on_stderr())
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    if let Some((given, error)) = refused {
        tracing::warn!(rust_log = %given, %error, "RUST_LOG is not a valid filter; logging at info");
    }
}
