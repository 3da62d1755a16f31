//! The two value syntaxes config files use beside plain numbers: durations
//! (`"250ms"`, `"2s"`, `"1m30s"`, `"1h"`) and byte sizes (`"64KiB"`,
//! `"256MiB"`, `"10MB"`, `"512"`). Binary units are powers of 1024, decimal
//! ones powers of 1000, as the names say.

use std::time::Duration;

/// Splits `"12ms3s"` into `[(12, "ms"), (3, "s")]`. `kind` names what
/// `input` should be, with examples, for the message when it has no number
/// where one must be.
fn terms<'a>(input: &'a str, kind: &str) -> Result<Vec<(u64, &'a str)>, String> {
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            // What was meant, where a plain "expected a whole number"
            // was said of `1 s` and `1.5s` (review42i L2).
            return Err(match rest.as_bytes()[0] {
                b' ' | b'\t' => format!("`{input}`: no space between a number and its unit"),
                b'.' | b',' if !out.is_empty() => format!(
                    "`{input}`: whole numbers only: write a fraction in a smaller unit (\"1500ms\" for \"1.5s\", \"1536KiB\" for \"1.5MiB\")"
                ),
                b'-' => format!("`{input}` cannot be negative"),
                // Said with what to write: "expected a whole number at
                // `lots`" did not say a size was wanted (audit49 D6).
                _ if out.is_empty() => format!("`{input}` is not {kind}"),
                _ => format!("`{input}`: expected a number at `{rest}`, for {kind}"),
            });
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("number `{}` is too large", &rest[..digits]))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        out.push((number, &rest[..unit_len]));
        rest = &rest[unit_len..];
    }
    Ok(out)
}

/// `error` of `input`, with what to write when it is only spaced out
/// (`"10 MiB"`) and reads without them as `parse` reads it: a size's
/// spelling suggested for a duration was refused in turn (review42k L5).
fn unspaced<T>(input: &str, error: String, parse: fn(&str) -> Result<T, String>) -> String {
    let compact: String = input.split_whitespace().collect();
    if compact != input && parse(&compact).is_ok() {
        format!("{error}: write \"{compact}\"")
    } else {
        error
    }
}

/// What a duration is, for messages.
const DURATION: &str = "a duration: write e.g. \"250ms\", \"2s\" or \"1m30s\"";
/// What a size is, for messages.
const SIZE: &str = "a size: write e.g. \"64KiB\" or \"10MiB\"";

/// Parses a duration such as `"250ms"`, `"2s"`, `"1m30s"`, `"0s"`.
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    read_duration(input).map_err(|error| unspaced(input, error, read_duration))
}

fn read_duration(input: &str) -> Result<Duration, String> {
    if input.is_empty() {
        return Err(format!("`` is not {DURATION}"));
    }
    let mut total = Duration::ZERO;
    for (number, unit) in terms(input, DURATION)? {
        let part = match unit {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.saturating_mul(60)),
            "h" => Duration::from_secs(number.saturating_mul(3600)),
            "d" => Duration::from_secs(number.saturating_mul(86400)),
            // Zero is zero in any unit, as nginx reads a bare `0`.
            "" if number == 0 && input == "0" => Duration::ZERO,
            "" => return Err(format!("`{input}` needs a unit: ms, s, m, h or d")),
            other => {
                return Err(format!(
                    "unknown duration unit `{other}`: use ms, s, m, h or d"
                ))
            }
        };
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("duration `{input}` is too large"))?;
    }
    if total > Duration::from_secs(365 * 86400) {
        return Err(format!("duration `{input}` is longer than a year"));
    }
    Ok(total)
}

/// Parses a size such as `"64KiB"`, `"10MB"`, `"512"` or `"512B"`.
pub fn parse_size(input: &str) -> Result<u64, String> {
    read_size(input).map_err(|error| unspaced(input, error, read_size))
}

fn read_size(input: &str) -> Result<u64, String> {
    let parts = terms(input, SIZE)?;
    let [(number, unit)] = parts.as_slice() else {
        return Err(format!("`{input}` is not {SIZE}"));
    };
    let multiplier: u64 = match *unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}`: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
            ))
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size `{input}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value with no number where one must be says what was wanted
    /// (audit49 D6: "expected a whole number at `lots`").
    #[test]
    fn a_value_without_its_number_says_what_is_wanted() {
        assert_eq!(
            parse_size("lots").unwrap_err(),
            "`lots` is not a size: write e.g. \"64KiB\" or \"10MiB\""
        );
        assert_eq!(
            parse_duration("ten seconds").unwrap_err(),
            "`ten seconds` is not a duration: write e.g. \"250ms\", \"2s\" or \"1m30s\""
        );
        assert_eq!(
            parse_duration("1m!").unwrap_err(),
            "`1m!`: expected a number at `!`, for a duration: write e.g. \"250ms\", \"2s\" or \"1m30s\""
        );
        assert_eq!(
            parse_duration("").unwrap_err(),
            "`` is not a duration: write e.g. \"250ms\", \"2s\" or \"1m30s\""
        );
    }

    /// A spaced-out value is told what to write only when that reads as
    /// the same kind (review42k L5: `"10 MiB"` as a duration was told to
    /// write `"10MiB"`, then refused again).
    #[test]
    fn a_spaced_value_is_told_what_to_write_when_that_reads() {
        assert_eq!(
            parse_duration("1 s").unwrap_err(),
            "`1 s`: no space between a number and its unit: write \"1s\""
        );
        assert_eq!(
            parse_duration("10 MiB").unwrap_err(),
            "`10 MiB`: no space between a number and its unit"
        );
        assert_eq!(
            parse_size("10 MiB").unwrap_err(),
            "`10 MiB`: no space between a number and its unit: write \"10MiB\""
        );
    }

    #[test]
    fn durations() {
        let ok: &[(&str, Duration)] = &[
            ("0s", Duration::ZERO),
            // A bare zero is zero, as nginx reads it (review36a).
            ("0", Duration::ZERO),
            ("250ms", Duration::from_millis(250)),
            ("2s", Duration::from_secs(2)),
            ("1m", Duration::from_secs(60)),
            ("1m30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("1d", Duration::from_secs(86400)),
        ];
        for (input, want) in ok {
            assert_eq!(parse_duration(input), Ok(*want), "{input}");
        }
        for bad in [
            "",
            "2",
            "-1s",
            "1.5s",
            "2 s",
            " 2s",
            "2sec",
            "s",
            "99999999999999999999s",
            "400d",
            "1h h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn sizes() {
        let ok: &[(&str, u64)] = &[
            ("0", 0),
            ("512", 512),
            ("512B", 512),
            ("64KiB", 65536),
            ("10MiB", 10 << 20),
            ("1GiB", 1 << 30),
            ("10MB", 10_000_000),
            ("1kB", 1000),
        ];
        for (input, want) in ok {
            assert_eq!(parse_size(input), Ok(*want), "{input}");
        }
        for bad in [
            "",
            "KiB",
            "-1",
            "1.5MiB",
            "10 MiB",
            "10mib",
            "1KiB2",
            "99999999TiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }
}
