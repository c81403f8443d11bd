//! Setting values with units: [`ByteSize`] (`4MiB`) and [`HumanDuration`] (`30s`), parsed the same
//! way from a flag, an environment variable or the TOML file (where a bare number also works).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A number of bytes: `1048576`, `4MiB`, `1GiB`, `512KB` (KB/MB/GB are powers of 1000, KiB/MiB/GiB
/// of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (number, unit) = split_unit(s);
        let scale: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            _ => return Err(format!("`{s}` is not a size: use bytes or a unit (KB, MB, GB, KiB, MiB, GiB)")),
        };
        let value: f64 = number.parse().map_err(|_| format!("`{s}` is not a size"))?;
        let bytes = value * scale as f64;
        if !(0.0..=usize::MAX as f64).contains(&bytes) {
            return Err(format!("`{s}` is out of range"));
        }
        Ok(Self(bytes as usize))
    }
}

/// A duration: `300` (seconds), `300s`, `500ms`, `5m`, `1h`, `0.5s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (number, unit) = split_unit(s);
        let scale = match unit {
            "" | "s" => 1.0,
            "ms" => 1e-3,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("`{s}` is not a duration: use ms, s, m or h (e.g. 30s)")),
        };
        let value: f64 = number.parse().map_err(|_| format!("`{s}` is not a duration"))?;
        Duration::try_from_secs_f64(value * scale).map(Self).map_err(|_| format!("`{s}` is out of range"))
    }
}

/// `"4MiB"` → `("4", "MiB")`.
fn split_unit(s: &str) -> (&str, &str) {
    let s = s.trim();
    let at = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    (&s[..at], s[at..].trim())
}

/// Deserializes a string through `FromStr`, or a bare number as its decimal text.
fn from_text_or_number<'de, D: Deserializer<'de>, T: FromStr<Err = String>>(d: D) -> Result<T, D::Error> {
    struct TextOrNumber;
    impl Visitor<'_> for TextOrNumber {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a number or a string with a unit")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(TextOrNumber)?.parse().map_err(de::Error::custom)
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text_or_number(d)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text_or_number(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let ok = [("1024", 1024), ("4MiB", 4 << 20), ("1 GiB", 1 << 30), ("2kb", 2000), ("1.5KiB", 1536)];
        for (text, bytes) in ok {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in ["", "4 parsecs", "-1", "MiB"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        let ok = [("300", 300_000), ("30s", 30_000), ("500ms", 500), ("5m", 300_000), ("0.5s", 500), ("1h", 3_600_000)];
        for (text, ms) in ok {
            assert_eq!(text.parse::<HumanDuration>(), Ok(HumanDuration(Duration::from_millis(ms))), "{text}");
        }
        for bad in ["", "3 days", "-1s", "s"] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad}");
        }
    }

    #[test]
    fn toml_takes_numbers_and_strings() {
        #[derive(Deserialize)]
        struct T {
            a: ByteSize,
            b: HumanDuration,
            c: HumanDuration,
        }
        let t: T = toml::from_str("a = 2048\nb = 10\nc = \"250ms\"").unwrap();
        assert_eq!((t.a.0, t.b.0, t.c.0), (2048, Duration::from_secs(10), Duration::from_millis(250)));
    }
}
