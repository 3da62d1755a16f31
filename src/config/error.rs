//! Configuration errors as an operator reads them: `file:line:col: key:
//! message`, one per line, all of them at once.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the error has no position (the file is unreadable).
    pub line: usize,
    pub col: usize,
    /// Dotted path such as `upstream[0].connect_timeout`; may be empty.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.col)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// How many errors a file's check shows, in the file's order.
pub const MOST_ERRORS: usize = 1000;

/// Turns byte spans into positions and collects errors for one file.
#[derive(Debug)]
pub struct Reporter<'a> {
    file: &'a Path,
    text: &'a str,
    /// Where each line starts, found at the first error: each error's
    /// line is then a binary search, where scanning from the top for each
    /// made 40,000 errors take 12 s (review31d F5).
    line_starts: std::cell::OnceCell<Vec<usize>>,
    /// The last position found (byte, line, column): errors come mostly
    /// in order, so the next on the same line counts on from it rather
    /// than from the line's start (one long line of many errors).
    last: std::cell::Cell<(usize, usize, usize)>,
    pub errors: Vec<ConfigError>,
}

impl<'a> Reporter<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        Reporter {
            file,
            text,
            line_starts: std::cell::OnceCell::new(),
            last: std::cell::Cell::new((0, 1, 1)),
            errors: Vec::new(),
        }
    }

    /// 1-based line and column (in characters) of byte offset `at`.
    fn position(&self, at: usize) -> (usize, usize) {
        let mut at = at.min(self.text.len());
        while !self.text.is_char_boundary(at) {
            at -= 1;
        }
        let starts = self.line_starts.get_or_init(|| {
            std::iter::once(0)
                .chain(self.text.match_indices('\n').map(|(i, _)| i + 1))
                .collect()
        });
        // The number of lines begun at or before `at`; the first starts at 0.
        let line = starts.partition_point(|&start| start <= at);
        let (last_at, last_line, last_col) = self.last.get();
        let col = if last_line == line && last_at <= at {
            last_col + self.text[last_at..at].chars().count()
        } else {
            self.text[starts[line - 1]..at].chars().count() + 1
        };
        self.last.set((at, line, col));
        (line, col)
    }

    pub fn at(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, col) = self.position(span.start);
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            col,
            key: printable(key.into()),
            message: printable(message.into()),
        });
    }

    /// An error about the file as a whole (no position).
    pub fn whole(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: 0,
            col: 0,
            key: printable(key.into()),
            message: printable(message.into()),
        });
    }

    pub fn finish<T>(mut self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            // Whole-file errors last: most follow from one with a place
            // (`[[upstreams]]` misspelt, then "no [[upstream]] defined").
            self.errors.sort_by_key(|e| (e.line == 0, e.line, e.col));
            // A bound on what a reload's rejection holds and logs (ops54
            // M2: a 0.5 MB file's errors took a running proxy to 500 MB,
            // and the log line was dropped). The errors about the file as
            // a whole stay, as they often say why the rest came (review62
            // L1: `no [[upstream]] defined` went).
            let placed = self.errors.iter().take_while(|e| e.line != 0).count();
            if placed > MOST_ERRORS {
                self.errors.drain(MOST_ERRORS..placed);
                self.whole(
                    "",
                    format!("{placed} errors with a place: the first {MOST_ERRORS} are shown, fix these and check again for the rest"),
                );
            }
            Err(ConfigErrors(self.errors))
        }
    }
}

/// `message` with control characters escaped (`\0`, `\n`): a value
/// echoed as written put a raw NUL into the check's output and the log,
/// and a newline split one message over two lines (review42i L3).
///
/// Cut short past [`LONGEST_MESSAGE`] bytes once escaped, at a character
/// boundary: messages echo values as
/// written, and a thousand of 5 KB each made a reload's rejection one log
/// line over the log's 4 MiB queue, dropped (review62 L2).
fn printable(message: String) -> String {
    let mut out = if message.chars().any(char::is_control) {
        message
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        message
    };
    if out.len() > LONGEST_MESSAGE {
        let mut end = LONGEST_MESSAGE;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

/// The longest error message shown, in bytes once escaped (see
/// [`printable`]).
const LONGEST_MESSAGE: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_lines_and_characters() {
        let text = "a = 1\nbé = 2\n\nc";
        let reporter = Reporter::new(Path::new("p.toml"), text);
        let at = |needle: &str| text.find(needle).unwrap();
        assert_eq!(reporter.position(0), (1, 1));
        assert_eq!(reporter.position(at("1")), (1, 5));
        // The newline itself ends its line.
        assert_eq!(reporter.position(5), (1, 6));
        assert_eq!(reporter.position(at("bé")), (2, 1));
        // Columns count characters: `é` is two bytes.
        assert_eq!(reporter.position(at("2")), (2, 6));
        // Inside `é`: back to its start.
        assert_eq!(reporter.position(at("é") + 1), (2, 2));
        assert_eq!(reporter.position(at("\n\n") + 1), (3, 1));
        assert_eq!(reporter.position(at("c")), (4, 1));
        assert_eq!(reporter.position(text.len() + 10), (4, 2));
    }

    /// Positions asked out of order, and on one line in order, agree with
    /// a count from the line's start.
    #[test]
    fn positions_asked_in_any_order_agree() {
        let text = "é = [1, 2, 3]\nb = é\n";
        let reporter = Reporter::new(Path::new("p.toml"), text);
        let fresh = |at: usize| {
            let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            (
                text[..at].matches('\n').count() + 1,
                text[line_start..at].chars().count() + 1,
            )
        };
        let boundaries: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &at in boundaries.iter().chain(boundaries.iter().rev()) {
            assert_eq!(reporter.position(at), fresh(at), "at {at}");
        }
    }

    /// Each error's position is a lookup, not a scan from the top.
    #[test]
    fn many_errors_take_time_in_proportion() {
        let text = "x = 1\n".repeat(100_000);
        let mut reporter = Reporter::new(Path::new("p.toml"), &text);
        for line in 0..100_000 {
            reporter.at(line * 6..line * 6 + 1, "x", "bad");
        }
        let last = reporter.position(99_999 * 6);
        assert_eq!(last, (100_000, 1));
        let errors = reporter.finish(()).unwrap_err().0;
        // The first thousand are shown, and how many there were.
        assert_eq!(errors.len(), MOST_ERRORS + 1);
        assert_eq!((errors[999].line, errors[999].col), (1_000, 1));
        assert!(errors[MOST_ERRORS]
            .message
            .starts_with("100000 errors with a place"));
    }
}
