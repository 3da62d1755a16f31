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

/// Turns byte spans into positions and collects errors for one file.
#[derive(Debug)]
pub struct Reporter<'a> {
    file: &'a Path,
    text: &'a str,
    pub errors: Vec<ConfigError>,
}

impl<'a> Reporter<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        Reporter {
            file,
            text,
            errors: Vec::new(),
        }
    }

    /// 1-based line and column (in characters) of byte offset `at`.
    fn position(&self, at: usize) -> (usize, usize) {
        let mut at = at.min(self.text.len());
        while !self.text.is_char_boundary(at) {
            at -= 1;
        }
        let before = &self.text[..at];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    pub fn at(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, col) = self.position(span.start);
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            col,
            key: key.into(),
            message: message.into(),
        });
    }

    /// An error about the file as a whole (no position).
    pub fn whole(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: 0,
            col: 0,
            key: key.into(),
            message: message.into(),
        });
    }

    pub fn finish<T>(mut self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            self.errors.sort_by_key(|e| (e.line, e.col));
            Err(ConfigErrors(self.errors))
        }
    }
}
