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

/// A line said at most once a period, with how many were held back in
/// between: for events that can come by the hundred a second (a backend
/// down behind a hot URL) without flooding the log, as nginx's
/// `limit_req` logs its rejections once per burst.
#[derive(Debug, Default)]
pub struct Every {
    /// Seconds since the Unix epoch before which nothing more is said.
    quiet_until: std::sync::atomic::AtomicU64,
    held: std::sync::atomic::AtomicU64,
}

impl Every {
    pub const fn new() -> Self {
        Every {
            quiet_until: std::sync::atomic::AtomicU64::new(0),
            held: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last)` when one may be said now,
    /// which then starts a quiet `period` of seconds.
    pub fn due(&self, period: u64) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let until = self.quiet_until.load(Ordering::Relaxed);
        if now < until
            || self
                .quiet_until
                .compare_exchange(until, now + period, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.held.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::Every;

    #[test]
    fn says_once_a_period_and_counts_what_it_held_back() {
        let every = Every::new();
        assert_eq!(every.due(3600), Some(0));
        assert_eq!(every.due(3600), None);
        assert_eq!(every.due(3600), None);
        // The period over (moved back by hand), the next says the two.
        every
            .quiet_until
            .store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(every.due(3600), Some(2));
    }
}
