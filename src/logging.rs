//! Log output for both binaries: `RUST_LOG` (default `info`) to stderr, as
//! text or one JSON object a line.
//!
//! Lines are written by a thread of their own, never by the thread that
//! logs: a reader of stderr that stops reading (a stuck `| logger`, a
//! container runtime's log pipe, journald under pressure) fills the pipe,
//! and a write to it then blocks. Written in place, the access line of the
//! next request blocked its worker, then every worker on the stderr lock,
//! admin and health included (review36c F3). Lines wait in a queue of at
//! most [`QUEUE_BYTES`]; past it they are dropped and counted, and once
//! writing goes on again a warning says how many, as HAProxy drops log
//! lines rather than stall traffic on a slow log output. What is queued
//! when the process exits is written first (bounded by [`EXIT_FLUSH`]).

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The most log bytes waiting to be written.
const QUEUE_BYTES: usize = 4 << 20;

/// How long an exiting process waits for its queued lines to be written.
const EXIT_FLUSH: Duration = Duration::from_secs(2);

/// How long the writer lets lines gather after a write: a wake and a
/// write for each line cost more than the line (a channel send, a futex
/// wake and a context switch a line made an access-logged request 45%
/// dearer than writing it in place); gathered, many lines go in one write.
const GATHER: Duration = Duration::from_millis(5);

/// Lines waiting for the writing thread, and what it is doing.
#[derive(Default)]
struct Waiting {
    bytes: Vec<u8>,
    /// Lines dropped because the queue was full, since the last warning.
    dropped: u64,
    /// The writer waits for a line (and must be woken for one).
    asleep: bool,
    /// The writer holds lines it has not finished writing.
    writing: bool,
    /// The writing thread runs. Started by the first line: a process
    /// logging nothing (`RUST_LOG=warn` and all well) stays single
    /// threaded, where glibc takes no locks in malloc and no cancellation
    /// points around each syscall (~230 instructions a proxied request).
    started: bool,
}

struct Queue {
    waiting: Mutex<Waiting>,
    wake: Condvar,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where log lines wait for the writing thread, once it runs.
static QUEUE: OnceLock<&'static Queue> = OnceLock::new();

thread_local! {
    /// Warning and error lines logged on this thread while it runs
    /// [`capturing_warnings`], as written to the log.
    static CAPTURED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Runs `run` and returns, beside its outcome, the warning and error
/// lines it logged on this thread, as the log has them (colour taken
/// out): what an admin call's answer shows of a reload, whose warnings
/// (the cache emptied, a listener switched, `[admin] listen` waiting for
/// a restart) were in the log only. Lines `RUST_LOG` filters out are not
/// logged, so not captured either.
pub fn capturing_warnings<T>(run: impl FnOnce() -> T) -> (T, String) {
    /// Puts back what an enclosing capture had (or none), however `run`
    /// ends: unwinding, it left this thread capturing for ever (review37e
    /// L5). What a nested capture took is the enclosing one's too.
    struct Restore(Option<Vec<u8>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let mine = CAPTURED.with(|c| c.replace(self.0.take()));
            if let Some(mine) = mine {
                CAPTURED.with(|c| {
                    if let Some(outer) = c.borrow_mut().as_mut() {
                        outer.extend_from_slice(&mine);
                    }
                });
            }
        }
    }
    let restore = Restore(CAPTURED.with(|c| c.replace(Some(Vec::new()))));
    let outcome = run();
    let lines = CAPTURED.with(|c| c.borrow().clone()).unwrap_or_default();
    drop(restore);
    (outcome, without_colour(&lines))
}

/// `line` without its ANSI escape sequences (`ESC [ ... letter`).
fn without_colour(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // The parameters up to the final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Makes each event's [`Queued`] writer, knowing its level.
struct Lines;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Queued;

    fn make_writer(&'a self) -> Queued {
        Queued { warning: false }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Queued {
        Queued {
            warning: *meta.level() <= tracing::Level::WARN,
        }
    }
}

/// A log line's writer: the formatted line, queued as it is written
/// (tracing-subscriber writes each event in one call).
struct Queued {
    /// A warning or an error, which [`capturing_warnings`] keeps.
    warning: bool,
}

impl Write for Queued {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if self.warning {
            CAPTURED.with(|c| {
                if let Some(captured) = c.borrow_mut().as_mut() {
                    captured.extend_from_slice(line);
                }
            });
        }
        let Some(queue) = QUEUE.get() else {
            return std::io::stderr().write(line);
        };
        let mut waiting = queue.lock();
        if !waiting.started {
            let spawned = std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || write_lines(queue));
            if spawned.is_err() {
                // Written in place, as before there was a writer.
                drop(waiting);
                return std::io::stderr().write(line);
            }
            waiting.started = true;
        }
        if waiting.bytes.len() + line.len() > QUEUE_BYTES {
            waiting.dropped += 1;
        } else {
            waiting.bytes.extend_from_slice(line);
            if waiting.asleep {
                waiting.asleep = false;
                queue.wake.notify_one();
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes queued lines to stderr, all that wait at once, then lets more
/// gather for [`GATHER`].
fn write_lines(queue: &Queue) {
    let mut batch = Vec::new();
    // Lines lost to a failing stderr since writing last worked, the
    // first error, and whether a failed write left half a line out.
    let mut lost = 0;
    let mut failure: Option<std::io::Error> = None;
    let mut torn = false;
    loop {
        let dropped = {
            let mut waiting = queue.lock();
            while waiting.bytes.is_empty() {
                waiting.asleep = true;
                waiting = queue
                    .wake
                    .wait(waiting)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            std::mem::swap(&mut waiting.bytes, &mut batch);
            waiting.writing = true;
            std::mem::take(&mut waiting.dropped)
        };
        // The half line a failure left is ended first, so the next line
        // is not spliced onto it.
        if torn && write_out(b"\n").is_ok() {
            torn = false;
        }
        let outcome = if torn {
            Err((0, std::io::Error::other("stderr still fails")))
        } else {
            write_out(&batch)
        };
        let written = outcome.is_ok();
        if let Err((done, error)) = outcome {
            // A reader gone for good (EPIPE), a full disk: the lines not
            // written are lost, as nginx's are, and counted.
            let rest = &batch[done..];
            lost += rest.iter().filter(|&&b| b == b'\n').count().max(1) as u64;
            torn |= done > 0 && batch[done - 1] != b'\n';
            failure.get_or_insert(error);
        }
        batch.clear();
        // A burst's 4 MiB is not kept for good.
        if batch.capacity() > 1 << 20 {
            batch.shrink_to(64 << 10);
        }
        {
            let mut waiting = queue.lock();
            waiting.writing = false;
            // Said only once writing works again: a warning written to a
            // stderr that fails would fail, be counted, and be said again,
            // for ever.
            if !written {
                waiting.dropped += dropped;
            }
        }
        if written && dropped > 0 {
            tracing::warn!(
                dropped,
                "log lines dropped: stderr was not read fast enough, or a line outgrew the 4 MiB log queue"
            );
        }
        if let (true, Some(error)) = (written, failure.take()) {
            tracing::warn!(
                lost = std::mem::take(&mut lost),
                %error,
                "log lines lost: writing stderr failed"
            );
        }
        std::thread::sleep(GATHER);
    }
}

/// The most written at once: a pipe write up to `PIPE_BUF` (4096 on
/// Linux) is never interleaved with another process's, so lines of two
/// processes sharing one stderr pipe (supervisord, `(a; b) 2>&1 | logger`)
/// never splice mid-line, as each line written alone never did (review36d
/// M2).
const ATOMIC_WRITE: usize = 4096;

/// Writes `batch` (whole lines) to stderr, in writes of whole lines up to
/// [`ATOMIC_WRITE`] bytes (a longer line alone); on failure, how much went
/// out, and why the rest did not. A stderr a parent left non-blocking is
/// waited on, not given up on mid-line.
fn write_out(batch: &[u8]) -> Result<(), (usize, std::io::Error)> {
    let mut done = 0;
    while done < batch.len() {
        let cut = done + piece_end(&batch[done..]);
        write_whole(&batch[done..cut]).map_err(|(n, error)| (done + n, error))?;
        done = cut;
    }
    Ok(())
}

/// Where the next write of `rest` ends: after its last whole line within
/// [`ATOMIC_WRITE`] bytes, or after its first line if that is longer.
fn piece_end(rest: &[u8]) -> usize {
    if rest.len() <= ATOMIC_WRITE {
        return rest.len();
    }
    match memchr::memrchr(b'\n', &rest[..ATOMIC_WRITE]) {
        Some(end) => end + 1,
        None => memchr::memchr(b'\n', rest).map_or(rest.len(), |end| end + 1),
    }
}

/// One piece written to stderr, in one write where the kernel takes it so.
/// On failure, how much of it went out, and why the rest did not.
fn write_whole(piece: &[u8]) -> Result<(), (usize, std::io::Error)> {
    let mut done = 0;
    while done < piece.len() {
        match std::io::stderr().write(&piece[done..]) {
            Ok(0) => return Err((done, std::io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// Waits (bounded) for the queued lines to be written: at exit, by
/// `atexit`, so `std::process::exit` and a return from `main` alike keep
/// their last lines.
fn flush_queue() {
    let Some(queue) = QUEUE.get() else {
        return;
    };
    let deadline = Instant::now() + EXIT_FLUSH;
    while Instant::now() < deadline {
        {
            let waiting = queue.lock();
            if waiting.bytes.is_empty() && !waiting.writing {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(unix)]
extern "C" fn flush_at_exit() {
    flush_queue();
}

/// Sets up the queue whose first line starts the writing thread.
fn start_writer() {
    // For the process's life: the writer and `atexit` use it to the end.
    let queue: &'static Queue = Box::leak(Box::new(Queue {
        waiting: Mutex::new(Waiting::default()),
        wake: Condvar::new(),
    }));
    if QUEUE.set(queue).is_err() {
        return;
    }
    // SAFETY: atexit only records a function pointer; `flush_at_exit`
    // takes only the queue's lock, which no thread holds for longer than
    // a copy and a thread's start, and sleeps.
    #[cfg(unix)]
    unsafe {
        libc::atexit(flush_at_exit);
    }
}

/// Colours for a person at a terminal; none in files, pipes and journald,
/// nor when `NO_COLOR` is set.
fn colour_on_stderr() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// What is logged without `RUST_LOG`: info and above, but for the h2
/// library's own warnings of the floods it refuses, one per connection
/// and naming no client (8,970 lines in 4 s of one rapid-reset attack,
/// review41a F2): portico says those itself, with the client, once in a
/// while (`portico_http2_connection_errors_total` counts each).
const DEFAULT_FILTER: &str = "info,h2=error";

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
                tracing_subscriber::EnvFilter::new(DEFAULT_FILTER),
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
        .with_writer(Lines);
    start_writer();
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

    /// One that goes on where `previous` is, quiet as long and with the
    /// lines it held back: for a state that outlives a reload, whose
    /// upstream is made anew (review44d L1: each reload let the same
    /// warning be said again at once, four times in 1.5 s). A new one
    /// without.
    pub fn continuing(previous: Option<&Every>) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        let Some(previous) = previous else {
            return Every::new();
        };
        Every {
            quiet_until: AtomicU64::new(previous.quiet_until.load(Ordering::Relaxed)),
            held: AtomicU64::new(previous.held.swap(0, Ordering::Relaxed)),
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
    use super::{
        capturing_warnings, piece_end, without_colour, Every, Queued, ATOMIC_WRITE, CAPTURED,
    };
    use std::io::Write;

    /// A warning's quiet period and held-back count go on across a
    /// reload's new upstream.
    #[test]
    fn an_every_continued_keeps_its_quiet_and_its_count() {
        let first = Every::new();
        assert_eq!(first.due(60), Some(0));
        assert_eq!(first.due(60), None);
        let next = Every::continuing(Some(&first));
        assert_eq!(next.due(60), None);
        // Both held back: told to the next line, wherever it is said.
        assert_eq!(next.held.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    /// A reload's warnings reach its admin caller as the log has them,
    /// without a terminal's colours, and only those its thread logged.
    #[test]
    fn warnings_are_captured_without_colour() {
        assert_eq!(
            without_colour(b"\x1b[2m2026\x1b[0m \x1b[33m WARN\x1b[0m cache emptied\n"),
            "2026  WARN cache emptied\n"
        );
        let mut warning = Queued { warning: true };
        let mut info = Queued { warning: false };
        let ((), captured) = capturing_warnings(|| {
            warning.write_all(b"kept\n").unwrap();
            info.write_all(b"not kept\n").unwrap();
        });
        assert_eq!(captured, "kept\n");
        warning.write_all(b"after\n").unwrap();
        assert_eq!(capturing_warnings(|| ()).1, "");
        // Nested, the inner lines are the outer capture's too; a panic
        // inside leaves the thread as it was.
        let ((), outer) = capturing_warnings(|| {
            let ((), inner) = capturing_warnings(|| warning.write_all(b"inner\n").unwrap());
            assert_eq!(inner, "inner\n");
        });
        assert_eq!(outer, "inner\n");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            capturing_warnings(|| panic!("in the reload"))
        }));
        assert!(panicked.is_err());
        assert!(CAPTURED.with(|c| c.borrow().is_none()));
    }

    /// Writes hold whole lines, at most a pipe's atomic size unless one
    /// line is longer (review36d M2).
    #[test]
    fn writes_are_whole_lines_within_an_atomic_pipe_write() {
        let line = |n: usize| {
            let mut line = vec![b'x'; n - 1];
            line.push(b'\n');
            line
        };
        let batch: Vec<u8> = [
            line(1000),
            line(1000),
            line(1000),
            line(1500),
            line(9000),
            line(10),
        ]
        .concat();
        let mut rest = &batch[..];
        let mut sizes = Vec::new();
        while !rest.is_empty() {
            let end = piece_end(rest);
            assert_eq!(rest[end - 1], b'\n');
            sizes.push(end);
            rest = &rest[end..];
        }
        assert_eq!(sizes, [3000, 1500, 9000, 10]);
        assert!(sizes.iter().all(|&n| n <= ATOMIC_WRITE || n == 9000));
    }

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
