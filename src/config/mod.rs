//! Configuration: the TOML model, its defaults and validation. The file is
//! parsed into raw `serde` structs (strings with spans, `raw.rs`), then
//! validated into the typed [`Config`] (`validate.rs`) with every problem
//! reported as `file:line:col: key: message`. Unknown keys are collected
//! and values of the wrong type set aside rather than failing the parse,
//! so an operator sees them all at once.

mod error;
mod model;
mod raw;
mod units;
mod validate;

use std::ops::Range;
use std::path::Path;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

pub use error::{ConfigError, ConfigErrors};
pub use model::*;
pub use units::{parse_duration, parse_size};
pub(crate) use validate::{overlap, pem_error, reaches_own, read_pem_certificates};

/// The most of a file portico reads whole: the configuration, the admin
/// token, a certificate chain, a key or a CA bundle (Debian's whole
/// bundle is about 200 KiB).
pub const MOST_READ: u64 = 16 * 1024 * 1024;

/// Refuses what is no regular file, or one larger than [`MOST_READ`],
/// before it is read whole: a FIFO named as a token or certificate hung
/// `check`, a start and every reload after it, and `/dev/zero` took
/// memory without end (review42i H1). Symbolic links are followed. (The
/// configuration file itself may be a pipe: see [`read_bounded`].)
pub fn readable(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, a socket or a device)"
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, what));
    }
    if meta.len() > MOST_READ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} bytes, more than the 16 MiB portico reads of a file",
                meta.len()
            ),
        ));
    }
    Ok(())
}

/// Reads the configuration file, at most [`MOST_READ`] of it. A pipe is
/// read too (`--config <(generate)`, or a FIFO a slow writer fills), but
/// `/dev/zero` stops there (review42i H1).
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MOST_READ + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MOST_READ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "more than the 16 MiB portico reads of a file",
        ));
    }
    Ok(bytes)
}

/// Why the configuration at `path` cannot be read again for a reload, if
/// so: a pipe reached through a file descriptor, as the shell's `--config
/// <(generate)` or a piped standard input, read once; or a regular file
/// so reached (`--config /dev/stdin < portico.toml`, read anew otherwise)
/// that was replaced since (an edit that renames a new file over it, as
/// `sed -i`, vim and Ansible do): the descriptor still reads the old one,
/// and a reload applied its stale text and said it was reloaded
/// (review43g M1).
pub fn not_read_again(path: &Path) -> Option<String> {
    if !through_descriptor(path) {
        return None;
    }
    let metadata = std::fs::metadata(path).ok();
    if !metadata.as_ref().is_some_and(std::fs::Metadata::is_file) {
        return Some(format!(
            "{}: the configuration came through a pipe (`--config <(...)`), read once at start: serve a file to reload it, or restart",
            path.display()
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if metadata.is_some_and(|m| m.nlink() == 0) {
            return Some(format!(
                "{}: the file read through this descriptor was replaced or removed since the start, and the descriptor still reads the old one: serve the file by its name to reload it, or restart",
                path.display()
            ));
        }
    }
    None
}

/// Whether `path` names a file by a file descriptor: `/dev/fd/N`,
/// `/dev/stdin`, `/proc/<pid>/fd/N` (review43f L3: `/proc/self/fd` alone
/// was looked for).
fn through_descriptor(path: &Path) -> bool {
    let parts: Vec<_> = path.components().map(|part| part.as_os_str()).collect();
    match parts.as_slice() {
        [root, dev, fd, ..] if *root == "/" && *dev == "dev" => *fd == "fd" || *fd == "stdin",
        [root, proc, _, fd, ..] if *root == "/" && *proc == "proc" => *fd == "fd",
        _ => false,
    }
}

/// The folder a configuration file's relative paths are read from: its
/// own; a pipe's reached through a file descriptor (`--config
/// <(generate)`) is in no folder of the operator's, so the working
/// directory, as the shell's own relative paths are (review43b M1:
/// `/dev/fd/admin.token`); a regular file so reached, the file's.
fn folder(file: &Path) -> std::path::PathBuf {
    let own = |file: &Path| file.parent().unwrap_or(Path::new(".")).to_path_buf();
    if !through_descriptor(file) {
        return own(file);
    }
    let regular = std::fs::metadata(file).is_ok_and(|m| m.is_file());
    match std::fs::canonicalize(file) {
        Ok(real) if regular => own(&real),
        _ => std::path::PathBuf::from("."),
    }
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_keeping_text(path).map(|(config, _)| config)
}

/// [`load`], with the file's text, for [`located`]: the file is read
/// once (it may be a pipe).
pub fn load_keeping_text(path: &Path) -> Result<(Config, String), ConfigErrors> {
    let error = |line, col, message| {
        Err(ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line,
            col,
            key: String::new(),
            message,
        }]))
    };
    let bytes = match read_bounded(path) {
        Ok(bytes) => bytes,
        Err(e) => return error(0, 0, format!("cannot read the file: {e}")),
    };
    match String::from_utf8(bytes) {
        Ok(text) => parse(&text, path).map(|config| (config, text)),
        // Where, as for any other error in the file: a stray Latin-1 byte
        // in a comment is otherwise a hunt.
        Err(e) => {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
            let start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let col = String::from_utf8_lossy(&good[start..]).chars().count() + 1;
            let byte = e.as_bytes()[good.len()];
            error(
                line,
                col,
                format!("byte 0x{byte:02x} is not UTF-8: a TOML file is UTF-8 text"),
            )
        }
    }
}

/// Finds keys in a configuration file's text, parsed once (review42k L2:
/// once a warning took `check` from 0.06 s to 15 s on 3,000 of them).
pub struct Locator<'a> {
    text: &'a str,
    table: Option<DeTable<'a>>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Self {
        let table = DeTable::parse(text).ok().map(Spanned::into_inner);
        Locator { text, table }
    }

    /// Where `key` (dotted, with indices: `server.tls[0].certificates[1].cert`)
    /// is written, as `file:line:col`, for a warning made from the loaded
    /// config, which keeps no positions (review42i M2: `nginx -t` names
    /// the line). `None` for a key the file leaves out (a default).
    pub fn at(&self, file: &Path, key: &str) -> Option<String> {
        let mut value: Option<&DeValue<'_>> = None;
        let mut span = 0..0;
        for part in key.split('.') {
            let (name, indices) = part.split_once('[').unwrap_or((part, ""));
            let within = match value {
                None => self.table.as_ref()?,
                Some(DeValue::Table(inner)) => inner,
                Some(_) => return None,
            };
            let (k, v) = within.iter().find(|(k, _)| k.get_ref().as_ref() == name)?;
            span = k.span();
            value = Some(v.get_ref());
            for index in indices.split('[').filter(|i| !i.is_empty()) {
                let index: usize = index.trim_end_matches(']').parse().ok()?;
                let Some(DeValue::Array(items)) = value else {
                    return None;
                };
                let item = items.get(index)?;
                span = item.span();
                value = Some(item.get_ref());
            }
        }
        let before = self.text.get(..span.start)?;
        let line = before.matches('\n').count() + 1;
        let col = before[before.rfind('\n').map_or(0, |i| i + 1)..]
            .chars()
            .count()
            + 1;
        Some(format!("{}:{line}:{col}", file.display()))
    }
}

/// Where the keys of a file that loaded are written: the place of each
/// warning said of it, by `check` as `file:line:col: key: ...` and at start
/// and at a reload as the warning's `at` field (`nginx -t` and nginx's
/// start name a warning's line alike).
pub struct Written<'a> {
    locator: Locator<'a>,
    file: &'a Path,
}

impl<'a> Written<'a> {
    pub fn new(text: &'a str, file: &'a Path) -> Self {
        Written {
            locator: Locator::new(text),
            file,
        }
    }

    /// The key as written, and where: `trusted_proxies` may be written
    /// under `[rate_limit]` instead of `[server]`, and is named so
    /// (review42k L3). No place for a key the file leaves out.
    pub fn place(&self, key: &str) -> (String, Option<String>) {
        if let Some(at) = self.locator.at(self.file, key) {
            return (key.to_owned(), Some(at));
        }
        let elsewhere = key.replacen("server.", "rate_limit.", 1);
        let at = self.locator.at(self.file, &elsewhere);
        (elsewhere, at)
    }

    /// Where `key` (or its other spelling) is written.
    pub fn at(&self, key: &str) -> Option<String> {
        self.place(key).1
    }
}

/// How many bad values the lenient reading reads past before it stops.
const MOST_SET_ASIDE: usize = 100;

/// How many unknown keys are named, each found by a walk over the file's
/// keys: 32,000 of them took `check` 70 s (fuzz49 F3).
const MOST_UNKNOWN: usize = 100;

/// Parses and validates `text`; `file` names it in messages and anchors
/// relative paths (certificates, token file).
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigErrors> {
    let mut reporter = error::Reporter::new(file, text);
    let table = match DeTable::parse(text) {
        Ok(table) => table,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let mut message = e.message().to_owned();
            // Name the key: in a long file, which one is not obvious.
            if message == "duplicate key" {
                if let Some(key) = text.get(span.clone()) {
                    let key = key.trim();
                    message = format!("duplicate key `{key}`");
                    // `[upstream.health]` above its `[[upstream]]` made
                    // `upstream` a table first (review42i M1): the key
                    // a `[[...]]` header names, not one inside a table
                    // (review42j L1).
                    let line = &text[text[..span.start].rfind('\n').map_or(0, |i| i + 1)..];
                    if ["upstream", "route"].contains(&key) && line.trim_start().starts_with('[') {
                        // `[upstream]` beside `[[upstream]]` is the other
                        // way to get here (review42k L4).
                        let single = text.lines().any(|l| l.trim() == format!("[{key}]"));
                        message.push_str(&if single {
                            format!(": `{key}` is a list of tables: write [[{key}]], not [{key}]")
                        } else {
                            format!(": is a `[{key}.…]` section written before the `[[{key}]]` it belongs to? It goes after it")
                        });
                    }
                }
            }
            reporter.at(span, "", message);
            return reporter.finish(Config::single_upstream(vec![], vec![]));
        }
    };
    // A type error stops serde at the first bad value. To report them all,
    // which nginx -t does not but an operator fixing a file wants, the bad
    // value is set aside and the file read again, until it reads or a key
    // it needs is one set aside. Validation then runs only if nothing was
    // set aside: a placeholder would raise errors that are not in the file.
    let mut unknown: Vec<Vec<Segment>> = Vec::new();
    let mut lenient = table.get_ref().clone();
    // The spans serde blamed, and the keys removed (not just given an
    // empty value) to read past them.
    let mut set: Vec<Range<usize>> = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    // The tables given a stand-in, and for which key.
    let mut stood: Vec<(Range<usize>, String)> = Vec::new();
    let raw = loop {
        unknown.clear();
        let whole = Spanned::new(0..text.len(), lenient.clone());
        let deserializer = toml::de::Deserializer::from(whole);
        let e = match serde_ignored::deserialize(deserializer, |path| unknown.push(segments(&path)))
        {
            Ok(raw) => break Some(raw),
            Err(e) => e,
        };
        let span = e.span().unwrap_or(0..0);
        let missing = e
            .message()
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'));
        // A key this loop took away, or a value it already blamed: what
        // follows would be its own doing, not the file's.
        if missing.is_some_and(|field| removed.iter().any(|key| key == field))
            || missing.is_some_and(|field| stood.iter().any(|s| s.0 == span && s.1 == field))
            || (missing.is_none() && set.contains(&span))
        {
            break None;
        }
        // A stand-in's value of the wrong type: its own doing, not the
        // file's. Given the type wanted, without a word.
        if span.start > text.len() {
            match set_aside(&mut lenient, &span, e.message()) {
                Some(Aside::Emptied) => {
                    set.push(span);
                    continue;
                }
                _ => break None,
            }
        }
        let key = key_at(table.get_ref(), &span);
        // `[upstream.health]` with no `[[upstream]]` above it makes
        // `upstream` one table: the `[[upstream]]` it belongs to is
        // misspelt (`[[upstreams]]`), or comes after it. Said so, and the
        // section set aside whole, so that the misspelt key is said too
        // (review42i M1: serde's "expected a list" blamed the right line).
        let orphan = ["upstream", "route"].into_iter().find(|section| {
            key.strip_prefix(section)
                .is_some_and(|rest| rest.starts_with('.'))
                && e.message()
                    .starts_with("invalid type: map, expected a sequence")
        });
        if let Some(section) = orphan {
            reporter.at(
                span.clone(),
                key.clone(),
                format!("`[{key}]` belongs to the `[[{section}]]` above it, and there is none: is that `[[{section}]]` misspelt, or written after this?"),
            );
            if lenient.remove(section).is_some() {
                removed.push(section.to_owned());
                set.push(span);
                continue;
            }
            break None;
        }
        let message = match one_table_written_as_many(&key) {
            Some(section) => {
                format!("`{section}` is one table: write [{section}], not [[{section}]]")
            }
            // The commonest slip with a list of tables (review31d F6).
            None if ["route", "upstream", "server.tls"].contains(&key.as_str())
                && e.message()
                    .starts_with("invalid type: map, expected a sequence") =>
            {
                format!("`{key}` is a list of tables: write [[{key}]], not [{key}]")
            }
            // `[server] listen` is a list; the admin listener is one
            // address (ops56 L5: "expected a string" said nothing of it).
            None if key == "admin.listen"
                && e.message()
                    .starts_with("invalid type: sequence, expected a string") =>
            {
                "the admin listener is one address, not a list: write listen = \"127.0.0.1:9090\""
                    .to_owned()
            }
            None => unit_hint(&key, e.message()).unwrap_or_else(|| plain_words(e.message())),
        };
        reporter.at(span.clone(), key, message);
        // A table lacking a key it needs gets a stand-in for it rather
        // than going: set aside whole, its other mistakes went unsaid, the
        // misspelt key that left the field missing first of all (`backend
        // = [...]` said only "missing field `backends`", review36a L1).
        if set.len() >= MOST_SET_ASIDE {
            // Said, where the list used to just stop (review36d L8).
            reporter.whole(
                "",
                format!("stopped after {MOST_SET_ASIDE} values read past: fix these and check again for the rest"),
            );
            break None;
        }
        if let Some(field) = missing {
            let at = text.len() + 1 + set.len();
            if stand_in(&mut lenient, &span, field, at..at) {
                stood.push((span.clone(), field.to_owned()));
                set.push(span);
                continue;
            }
        }
        match set_aside(&mut lenient, &span, e.message()) {
            Some(aside) => {
                set.push(span);
                if let Aside::Removed(key) = aside {
                    removed.push(key);
                }
            }
            None => break None,
        }
    };
    if unknown.len() > MOST_UNKNOWN {
        reporter.whole(
            "",
            format!(
                "{} unknown keys: {MOST_UNKNOWN} of them are named, fix these and check again for the rest",
                unknown.len()
            ),
        );
    }
    for path in unknown.iter().take(MOST_UNKNOWN) {
        // Found in what was read, named from the file: a list item set
        // aside shifts the numbers of those after it.
        let (span, key) = locate(&lenient, path);
        let key = if set.is_empty() {
            key
        } else {
            key_at(table.get_ref(), &span)
        };
        let name = path.last().map(Segment::to_string).unwrap_or_default();
        let message = match near_key(path) {
            Some(near) => format!("unknown key `{name}`; did you mean `{near}`?"),
            None => format!("unknown key `{name}`"),
        };
        reporter.at(span, key, message);
    }
    let Some(raw) = raw.filter(|_| set.is_empty()) else {
        return reporter.finish(Config::single_upstream(vec![], vec![]));
    };
    let base = folder(file);
    let config = validate::validate(raw, &mut reporter, &base);
    reporter.finish(config)
}

/// The key of the same table an unknown one at `path` is likeliest a
/// misspelling of (`path_prefx`, `max_body`), as HAProxy suggests one:
/// within two edits, or one for a short key.
fn near_key(path: &[Segment]) -> Option<&'static str> {
    let (Segment::Key(name), table) = path.split_last()? else {
        return None;
    };
    let table: Vec<&str> = table
        .iter()
        .filter_map(|segment| match segment {
            Segment::Key(key) => Some(key.as_str()),
            Segment::Index(_) => None,
        })
        .collect();
    let keys = match table.as_slice() {
        [] => keys_of::<raw::File>(),
        ["server"] => keys_of::<raw::Server>(),
        ["server", "tls"] => keys_of::<raw::Tls>(),
        ["server", "tls", "certificates"] => keys_of::<raw::Certificate>(),
        ["admin"] => keys_of::<raw::Admin>(),
        ["upstream"] => keys_of::<raw::Upstream>(),
        ["upstream", "health"] => keys_of::<raw::Health>(),
        ["route"] => keys_of::<raw::Route>(),
        ["cache"] => keys_of::<raw::Cache>(),
        ["compression"] => keys_of::<raw::Compression>(),
        ["rate_limit"] => keys_of::<raw::RateLimit>(),
        _ => return None,
    };
    let most = if name.len() <= 4 { 1 } else { 2 };
    keys.iter()
        .map(|&key| (edits(name, key), key))
        .filter(|&(edits, _)| edits <= most)
        .min()
        .map(|(_, key)| key)
}

/// The keys serde's derive gives a table of type `T` (the field list it
/// hands `deserialize_struct`), so the suggestions follow the structs.
fn keys_of<T: for<'de> serde::Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{Error, Visitor};
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("keys listed")
        }
    }
    impl std::error::Error for Stop {}
    impl Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    struct Fields<'a>(&'a std::cell::Cell<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for Fields<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0.set(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let fields = std::cell::Cell::new(&[][..]);
    let _ = T::deserialize(Fields(&fields));
    fields.get()
}

/// Levenshtein distance between two keys (a few dozen bytes at most).
fn edits(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &x) in a.as_bytes().iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &y) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(x != y))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
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

/// The dotted name (`upstream[0].backends[1].weight`) of the innermost key
/// or array item at `span`: where a type error is. Every branch is
/// searched, since the span of an array of tables covers its first header
/// only.
fn key_at(root: &DeTable<'_>, span: &Range<usize>) -> String {
    fn within(value: &DeValue<'_>, span: &Range<usize>, name: &mut String) -> bool {
        match value {
            DeValue::Table(table) => in_table(table, span, name),
            DeValue::Array(items) => items.iter().enumerate().any(|(i, v)| {
                let mut here = format!("{name}[{i}]");
                let found = within(v.get_ref(), span, &mut here) || holds(v.span(), span);
                if found {
                    *name = here;
                }
                found
            }),
            _ => false,
        }
    }
    fn in_table(table: &DeTable<'_>, span: &Range<usize>, name: &mut String) -> bool {
        table.iter().any(|(k, v)| {
            let mut here = if name.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{name}.{}", k.get_ref())
            };
            let found = within(v.get_ref(), span, &mut here)
                || holds(k.span(), span)
                || holds(v.span(), span);
            if found {
                *name = here;
            }
            found
        })
    }
    let mut name = String::new();
    in_table(root, span, &mut name);
    name
}

/// What [`set_aside`] did with a bad value.
enum Aside {
    /// Replaced by an empty value of the wanted type: the key stays.
    Emptied,
    /// The key (or list item, named by its list's key) is gone.
    Removed(String),
}

/// Gives the table at `span` an empty string for its missing `field`, at
/// `at`, a span past the file's end (so errors there are known for the
/// stand-in's); false when there is no table at `span`.
fn stand_in(table: &mut DeTable<'_>, span: &Range<usize>, field: &str, at: Range<usize>) -> bool {
    let fill = |inner: &mut DeTable<'_>| {
        inner.insert(
            Spanned::new(at.clone(), std::borrow::Cow::Owned(field.to_owned())),
            Spanned::new(at.clone(), DeValue::String(Default::default())),
        );
    };
    for (_, value) in table.iter_mut() {
        let whole = value.span();
        match value.get_mut() {
            DeValue::Table(inner) => {
                if whole == *span {
                    fill(inner);
                    return true;
                }
                if stand_in(inner, span, field, at.clone()) {
                    return true;
                }
            }
            DeValue::Array(items) => {
                for item in items.iter_mut() {
                    let whole = item.span();
                    if let DeValue::Table(inner) = item.get_mut() {
                        if whole == *span {
                            fill(inner);
                            return true;
                        }
                        if stand_in(inner, span, field, at.clone()) {
                            return true;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    false
}

/// Takes the bad value at `span` out of the way of the next read. A value that is itself the
/// bad one and wanted a string, list, number or boolean is replaced by an
/// empty one of that type, so a required key stays present. A table in a
/// list that lacks a required key is taken out of the list. Anything else
/// goes with its key.
fn set_aside(table: &mut DeTable<'_>, span: &Range<usize>, message: &str) -> Option<Aside> {
    let mut target = None;
    for (k, v) in table.iter_mut() {
        let whole = v.span();
        match v.get_mut() {
            DeValue::Table(inner) => {
                if let Some(found) = set_aside(inner, span, message) {
                    return Some(found);
                }
            }
            DeValue::Array(items) => {
                for item in items.iter_mut() {
                    if let DeValue::Table(inner) = item.get_mut() {
                        if let Some(found) = set_aside(inner, span, message) {
                            return Some(found);
                        }
                    }
                }
                let lacking = |item: &Spanned<DeValue<'_>>| {
                    item.span() == *span && matches!(item.get_ref(), DeValue::Table(_))
                };
                if items.iter().any(lacking) {
                    let all = std::mem::replace(items, toml::de::DeArray::new());
                    *items = all.into_iter().filter(|item| !lacking(item)).collect();
                    return Some(Aside::Removed(k.get_ref().to_string()));
                }
            }
            _ => {}
        }
        if whole == *span {
            let wanted = message.rsplit_once(", expected ").map_or("", |(_, w)| w);
            let empty = match wanted {
                "a string" => Some(DeValue::String(Default::default())),
                "a sequence" => Some(DeValue::Array(Default::default())),
                "i64" | "u64" | "u32" => Some(DeValue::Integer(Default::default())),
                "a boolean" => Some(DeValue::Boolean(false)),
                _ => None,
            };
            if let Some(empty) = empty {
                *v.get_mut() = empty;
                return Some(Aside::Emptied);
            }
        }
        if holds(k.span(), span) || holds(whole, span) {
            target = Some(k.clone());
            break;
        }
    }
    let key = target?;
    table.remove(&key);
    Some(Aside::Removed(key.into_inner().into_owned()))
}

/// Whether `outer` contains `span`.
fn holds(outer: Range<usize>, span: &Range<usize>) -> bool {
    outer.start <= span.start && span.end <= outer.end
}

/// serde's words for what a field wanted, in the config's own terms.
/// The section, dotted without indices, when `key` is the first item of
/// one written `[[section]]` that takes a single table: serde's own words
/// for it ("invalid type: map, expected a string", read as the section's
/// first field) point nowhere near the double brackets.
fn one_table_written_as_many(key: &str) -> Option<String> {
    let (section, index) = key.strip_suffix(']')?.rsplit_once('[')?;
    let name = section.rsplit('.').next()?;
    let single = [
        "server",
        "admin",
        "cache",
        "rate_limit",
        "compression",
        "health",
    ]
    .contains(&name);
    (single && index.bytes().all(|b| b.is_ascii_digit())).then(|| {
        section
            .split('.')
            .map(|part| part.split('[').next().unwrap_or(part))
            .collect::<Vec<_>>()
            .join(".")
    })
}

/// What to write for a duration or size given as a bare number
/// (`shutdown_grace = 10`, as nginx takes it), where serde said only
/// "expected a string" (review42i L2).
fn unit_hint(key: &str, message: &str) -> Option<String> {
    let number = message
        .strip_prefix("invalid type: ")?
        .strip_suffix(", expected a string")?;
    let number = number.split_once('`')?.1.trim_end_matches('`');
    // A whole number to put a unit to; `1.5`, `-1` or `true` get the
    // form alone (review42j L2: "write \"trues\"").
    let whole = !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit());
    let number = if whole { number } else { "10" };
    let name = key.rsplit('.').next().unwrap_or(key);
    const DURATIONS: &[&str] = &[
        "body_timeout",
        "connect_timeout",
        "default_ttl",
        "idle_timeout",
        "interval",
        "request_header_timeout",
        "response_timeout",
        "shutdown_grace",
        "stale_if_error",
        "timeout",
    ];
    const SIZES: &[&str] = &[
        "max_header_size",
        "max_object_size",
        "max_request_body",
        "max_size",
        "min_size",
    ];
    if DURATIONS.contains(&name) {
        Some(format!(
            "a duration is a string with its unit: write \"{number}s\" (or ms, m, h, d)"
        ))
    } else if SIZES.contains(&name) {
        Some(format!(
            "a size is a string: write \"{number}\" for bytes, or with its unit, \"{number}KiB\" (or MiB, GiB)"
        ))
    } else {
        None
    }
}

fn plain_words(message: &str) -> String {
    let mut text = message.to_owned();
    for (rust, plain) in [
        ("expected i64", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected a boolean", "expected true or false"),
        ("expected a sequence", "expected a list `[...]`"),
        (" as i128", " (too large)"),
    ] {
        text = text.replace(rust, plain);
    }
    // serde names the Rust type a table is read into: `expected struct
    // Health` said nothing an operator wrote (review36a).
    if let Some(at) = text.find("expected struct ") {
        let name_end = text[at + 16..]
            .find(|c: char| !c.is_alphanumeric())
            .map_or(text.len(), |end| at + 16 + end);
        text.replace_range(at..name_end, "expected a table");
    }
    text
}

#[cfg(test)]
mod tests;
