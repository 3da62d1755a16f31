//! Configuration: the TOML model, its defaults and validation. The file is
//! parsed into raw `serde` structs (strings with spans, `raw.rs`), then
//! validated into the typed [`Config`] (`validate.rs`) with every problem
//! reported as `file:line:col: key: message`. Unknown keys are collected
//! rather than failing the parse, so an operator sees them all at once.

mod error;
mod model;
mod raw;
mod units;
mod validate;

use std::ops::Range;
use std::path::Path;

use toml::de::{DeTable, DeValue};

pub use error::{ConfigError, ConfigErrors};
pub use model::*;
pub use units::{parse_duration, parse_size};
pub use validate::read_token;

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, path),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            col: 0,
            key: String::new(),
            message: format!("cannot read the file: {e}"),
        }])),
    }
}

/// Parses and validates `text`; `file` names it in messages and anchors
/// relative paths (certificates, token file).
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigErrors> {
    let mut reporter = error::Reporter::new(file, text);
    let table = match DeTable::parse(text) {
        Ok(table) => table,
        Err(e) => {
            reporter.at(e.span().unwrap_or(0..0), "", e.message().to_owned());
            return reporter.finish(Config::single_upstream(vec![], vec![]));
        }
    };
    let mut unknown: Vec<Vec<Segment>> = Vec::new();
    let deserializer = toml::de::Deserializer::from(table.clone());
    let raw: raw::File = match serde_ignored::deserialize(deserializer, |path| {
        unknown.push(segments(&path));
    }) {
        Ok(raw) => raw,
        Err(e) => {
            reporter.at(e.span().unwrap_or(0..0), "", e.message().to_owned());
            return reporter.finish(Config::single_upstream(vec![], vec![]));
        }
    };
    for path in &unknown {
        let (span, key) = locate(table.get_ref(), path);
        let name = path.last().map(Segment::to_string).unwrap_or_default();
        reporter.at(span, key, format!("unknown key `{name}`"));
    }
    let base = file.parent().unwrap_or(Path::new("."));
    let config = validate::validate(raw, &mut reporter, base);
    reporter.finish(config)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl std::fmt::Display for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Segment::Key(k) => f.write_str(k),
            Segment::Index(i) => write!(f, "{i}"),
        }
    }
}

fn segments(path: &serde_ignored::Path<'_>) -> Vec<Segment> {
    use serde_ignored::Path;
    let mut out = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments(parent),
    };
    match path {
        Path::Seq { index, .. } => out.push(Segment::Index(*index)),
        // toml::Spanned shows up as an inner map key; it is not in the file.
        Path::Map { key, .. } if key.starts_with("$__serde_spanned") => {}
        Path::Map { key, .. } => out.push(Segment::Key(key.clone())),
        _ => {}
    }
    out
}

/// The span of the key at `path` in the parsed file, and its dotted name
/// (`upstream[0].health.colour`).
fn locate(root: &DeTable<'_>, path: &[Segment]) -> (Range<usize>, String) {
    let mut name = String::new();
    let mut span = 0..0;
    let mut table = Some(root);
    let mut value: Option<&DeValue<'_>> = None;
    for segment in path {
        match segment {
            Segment::Key(key) => {
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(key);
                let found = table
                    .and_then(|t| t.iter().find(|(k, _)| k.get_ref().as_ref() == key.as_str()));
                match found {
                    Some((k, v)) => {
                        span = k.span();
                        value = Some(v.get_ref());
                    }
                    None => value = None,
                }
            }
            Segment::Index(i) => {
                name.push_str(&format!("[{i}]"));
                value = match value {
                    Some(DeValue::Array(items)) => items.get(*i).map(|v| {
                        span = v.span();
                        v.get_ref()
                    }),
                    _ => None,
                };
            }
        }
        table = match value {
            Some(DeValue::Table(t)) => Some(t),
            _ => None,
        };
    }
    (span, name)
}

#[cfg(test)]
mod tests;
