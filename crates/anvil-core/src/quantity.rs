//! Quantities in configuration files: byte sizes (`256Mi`, `1GB`, `4096`) and durations
//! (`250ms`, `30s`, `1h30m`, `60`).
//!
//! Both accept a bare integer too: bytes for sizes, seconds for durations. Only whole numbers are
//! accepted so that a value always means exactly one number of bytes or nanoseconds.

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;

/// A quantity that could not be parsed. Every variant names the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("empty value where a {what} was expected")]
    Empty { what: &'static str },
    #[error("negative {what} `{value}` is not allowed")]
    Negative { what: &'static str, value: String },
    #[error("{what} `{value}` is too large")]
    Overflow { what: &'static str, value: String },
    #[error("unknown unit `{unit}` in {what} `{value}` (expected one of: {expected})")]
    UnknownUnit {
        what: &'static str,
        value: String,
        unit: String,
        expected: &'static str,
    },
    #[error("invalid {what} `{value}`: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

const SIZE: &str = "byte size";
const DURATION: &str = "duration";
const SIZE_UNITS: &str = "B, K, KB, M, MB, G, GB, T, TB, Ki, KiB, Mi, MiB, Gi, GiB, Ti, TiB";
const DURATION_UNITS: &str = "ns, us, ms, s, m, h, d";

/// Splits `text` into segments of `<digits><unit>`; the unit may be empty.
fn segments<'a>(
    what: &'static str,
    original: &str,
    mut text: &'a str,
) -> Result<Vec<(u64, &'a str)>, QuantityError> {
    let mut out = Vec::new();
    while !text.is_empty() {
        let digits_end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        if digits_end == 0 {
            return Err(QuantityError::Invalid {
                what,
                value: original.to_string(),
                reason: "expected a whole number followed by an optional unit",
            });
        }
        let number: u64 = text[..digits_end]
            .parse()
            .map_err(|_| QuantityError::Overflow {
                what,
                value: original.to_string(),
            })?;
        let rest = text[digits_end..].trim_start();
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = rest[..unit_end].trim();
        out.push((number, unit));
        text = &rest[unit_end..];
    }
    Ok(out)
}

/// Common checks before splitting: empty, negative, fractional.
fn precheck<'a>(what: &'static str, text: &'a str) -> Result<&'a str, QuantityError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(QuantityError::Empty { what });
    }
    if t.starts_with('-') {
        return Err(QuantityError::Negative {
            what,
            value: text.to_string(),
        });
    }
    if t.contains('.') || t.contains(',') {
        return Err(QuantityError::Invalid {
            what,
            value: text.to_string(),
            reason: "fractions are not accepted; use a smaller unit",
        });
    }
    Ok(t)
}

fn size_multiplier(unit: &str) -> Option<u64> {
    const K: u64 = 1000;
    const KI: u64 = 1024;
    Some(match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => K,
        "m" | "mb" => K.pow(2),
        "g" | "gb" => K.pow(3),
        "t" | "tb" => K.pow(4),
        "ki" | "kib" => KI,
        "mi" | "mib" => KI.pow(2),
        "gi" | "gib" => KI.pow(3),
        "ti" | "tib" => KI.pow(4),
        _ => return None,
    })
}

/// Parses a byte size: a whole number with an optional decimal (`K`, `MB`, ...: powers of 1000)
/// or binary (`Ki`, `MiB`, ...: powers of 1024) unit. Units are case-insensitive.
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let t = precheck(SIZE, text)?;
    let segs = segments(SIZE, text, t)?;
    if segs.len() != 1 {
        return Err(QuantityError::Invalid {
            what: SIZE,
            value: text.to_string(),
            reason: "a byte size is one number with one unit",
        });
    }
    let (n, unit) = segs[0];
    let mult = size_multiplier(unit).ok_or_else(|| QuantityError::UnknownUnit {
        what: SIZE,
        value: text.to_string(),
        unit: unit.to_string(),
        expected: SIZE_UNITS,
    })?;
    n.checked_mul(mult).ok_or_else(|| QuantityError::Overflow {
        what: SIZE,
        value: text.to_string(),
    })
}

fn duration_unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        "d" => 86_400 * 1_000_000_000,
        _ => return None,
    })
}

/// Parses a duration: `250ms`, `30s`, `5m`, `2h`, `1d`, a sum like `1h30m`, or a bare integer
/// meaning seconds. Units are case-sensitive (`m` is minutes, `ms` milliseconds).
pub fn parse_duration(text: &str) -> Result<Duration, QuantityError> {
    let t = precheck(DURATION, text)?;
    let segs = segments(DURATION, text, t)?;
    if segs.len() > 1 && segs.iter().any(|(_, u)| u.is_empty()) {
        return Err(QuantityError::Invalid {
            what: DURATION,
            value: text.to_string(),
            reason: "every part of a compound duration needs a unit",
        });
    }
    let mut total: u128 = 0;
    for (n, unit) in segs {
        let mult = duration_unit_nanos(unit).ok_or_else(|| QuantityError::UnknownUnit {
            what: DURATION,
            value: text.to_string(),
            unit: unit.to_string(),
            expected: DURATION_UNITS,
        })?;
        total = total
            .checked_add(u128::from(n) * mult)
            .ok_or_else(|| QuantityError::Overflow {
                what: DURATION,
                value: text.to_string(),
            })?;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| QuantityError::Overflow {
        what: DURATION,
        value: text.to_string(),
    })?;
    // The remainder is below 10^9, so it fits in u32.
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Formats bytes with the largest unit that represents them exactly (binary units first).
pub fn format_bytes(bytes: u64) -> String {
    if bytes == 0 {
        return "0".to_string();
    }
    for (unit, mult) in [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ] {
        if bytes.is_multiple_of(mult) {
            return format!("{}{unit}", bytes / mult);
        }
    }
    for (unit, mult) in [
        ("T", 1_000_000_000_000u64),
        ("G", 1_000_000_000),
        ("M", 1_000_000),
        ("K", 1_000),
    ] {
        if bytes.is_multiple_of(mult) {
            return format!("{}{unit}", bytes / mult);
        }
    }
    format!("{bytes}B")
}

/// Formats a duration with the largest unit that represents it exactly.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    for (unit, mult) in [
        ("d", 86_400_000_000_000u128),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        if nanos.is_multiple_of(mult) {
            return format!("{}{unit}", nanos / mult);
        }
    }
    format!("{nanos}ns")
}

/// A byte size in a config or policy file: `"256Mi"`, `"1GB"` or an integer number of bytes.
/// Serializes as a string with the largest exact unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn kib(n: u64) -> ByteSize {
        ByteSize(n << 10)
    }
    pub const fn mib(n: u64) -> ByteSize {
        ByteSize(n << 20)
    }
    pub const fn gib(n: u64) -> ByteSize {
        ByteSize(n << 30)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_bytes(self.0))
    }
}

impl std::str::FromStr for ByteSize {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_bytes(s).map(ByteSize)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_bytes(self.0))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte size such as \"256Mi\", \"1GB\" or an integer number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("negative byte size `{v}` is not allowed")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_bytes(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl utoipa::PartialSchema for ByteSize {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "Byte size: whole number with optional unit (B, K/KB..T/TB decimal, Ki/KiB..Ti/TiB binary)",
            ))
            .examples([serde_json::json!("256Mi")])
            .into()
    }
}
impl utoipa::ToSchema for ByteSize {}

/// A duration in a config or policy file: `"250ms"`, `"30s"`, `"10m"` or an integer of seconds.
/// Serializes as a string with the largest exact unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DurationValue(pub Duration);

impl DurationValue {
    pub const fn secs(n: u64) -> DurationValue {
        DurationValue(Duration::from_secs(n))
    }
    pub const fn millis(n: u64) -> DurationValue {
        DurationValue(Duration::from_millis(n))
    }
    pub fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for DurationValue {
    fn from(d: Duration) -> Self {
        DurationValue(d)
    }
}

impl fmt::Display for DurationValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl std::str::FromStr for DurationValue {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(DurationValue)
    }
}

impl Serialize for DurationValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a duration such as \"250ms\", \"30s\", \"10m\" or an integer of seconds",
                )
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationValue, E> {
                Ok(DurationValue(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationValue, E> {
                u64::try_from(v)
                    .map(|s| DurationValue(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("negative duration `{v}` is not allowed")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationValue, E> {
                parse_duration(v).map(DurationValue).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl utoipa::PartialSchema for DurationValue {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "Duration: whole number with unit (ns, us, ms, s, m, h, d), e.g. \"250ms\", \"1h30m\"",
            ))
            .examples([serde_json::json!("30s")])
            .into()
    }
}
impl utoipa::ToSchema for DurationValue {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_plain_and_units() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert_eq!(parse_bytes("12B").unwrap(), 12);
        assert_eq!(parse_bytes("1K").unwrap(), 1000);
        assert_eq!(parse_bytes("1KB").unwrap(), 1000);
        assert_eq!(parse_bytes("2M").unwrap(), 2_000_000);
        assert_eq!(parse_bytes("2MB").unwrap(), 2_000_000);
        assert_eq!(parse_bytes("3G").unwrap(), 3_000_000_000);
        assert_eq!(parse_bytes("3GB").unwrap(), 3_000_000_000);
        assert_eq!(parse_bytes("1T").unwrap(), 1_000_000_000_000);
        assert_eq!(parse_bytes("1TB").unwrap(), 1_000_000_000_000);
        assert_eq!(parse_bytes("1Ki").unwrap(), 1024);
        assert_eq!(parse_bytes("1KiB").unwrap(), 1024);
        assert_eq!(parse_bytes("768Mi").unwrap(), 768 << 20);
        assert_eq!(parse_bytes("768MiB").unwrap(), 768 << 20);
        assert_eq!(parse_bytes("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("2Ti").unwrap(), 2 << 40);
        assert_eq!(parse_bytes("2TiB").unwrap(), 2 << 40);
        assert_eq!(parse_bytes(" 1 gib ").unwrap(), 1 << 30);
    }

    #[test]
    fn bytes_errors_name_the_value() {
        let e = parse_bytes("").unwrap_err();
        assert!(matches!(e, QuantityError::Empty { .. }));
        let e = parse_bytes("-5Mi").unwrap_err().to_string();
        assert!(e.contains("-5Mi") && e.contains("negative"), "{e}");
        let e = parse_bytes("5Qi").unwrap_err().to_string();
        assert!(e.contains("5Qi") && e.contains("`Qi`"), "{e}");
        let e = parse_bytes("99999999999Ti").unwrap_err().to_string();
        assert!(
            e.contains("99999999999Ti") && e.contains("too large"),
            "{e}"
        );
        let e = parse_bytes("999999999999999999999")
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large"), "{e}");
        let e = parse_bytes("1.5G").unwrap_err().to_string();
        assert!(e.contains("1.5G") && e.contains("fraction"), "{e}");
        assert!(parse_bytes("Mi").is_err());
        assert!(parse_bytes("1Mi2Ki").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("1s500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("15us").unwrap(), Duration::from_micros(15));
        assert_eq!(parse_duration("7ns").unwrap(), Duration::from_nanos(7));
    }

    #[test]
    fn duration_errors_name_the_value() {
        assert!(matches!(
            parse_duration("  ").unwrap_err(),
            QuantityError::Empty { .. }
        ));
        let e = parse_duration("-1s").unwrap_err().to_string();
        assert!(e.contains("-1s"), "{e}");
        let e = parse_duration("10y").unwrap_err().to_string();
        assert!(e.contains("10y") && e.contains("`y`"), "{e}");
        let e = parse_duration("10M").unwrap_err().to_string();
        assert!(e.contains("`M`"), "{e}");
        let e = parse_duration("1h30").unwrap_err().to_string();
        assert!(e.contains("1h30"), "{e}");
        let e = parse_duration("99999999999999999999d")
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large"), "{e}");
        let e = parse_duration("999999999999999999d")
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn formatting_round_trips() {
        for b in [
            0u64,
            1,
            999,
            1000,
            1024,
            1536,
            768 << 20,
            1 << 30,
            5_000_000,
            12345,
        ] {
            let s = format_bytes(b);
            assert_eq!(parse_bytes(&s).unwrap(), b, "{s}");
        }
        assert_eq!(format_bytes(1 << 30), "1Gi");
        assert_eq!(format_bytes(2_000_000), "2M");
        assert_eq!(format_bytes(1001), "1001B");
        for d in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_secs(30),
            Duration::from_secs(600),
            Duration::from_secs(7200),
            Duration::from_secs(86400 * 3),
            Duration::from_nanos(1_500),
            Duration::from_nanos(7),
        ] {
            let s = format_duration(d);
            assert_eq!(parse_duration(&s).unwrap(), d, "{s}");
        }
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[derive(Debug, Deserialize, Serialize)]
    struct Holder {
        size: ByteSize,
        ttl: DurationValue,
    }

    #[test]
    fn serde_string_or_integer() {
        let h: Holder = toml::from_str("size = \"1Gi\"\nttl = \"10m\"").unwrap();
        assert_eq!(h.size, ByteSize::gib(1));
        assert_eq!(h.ttl, DurationValue::secs(600));
        let h: Holder = toml::from_str("size = 4096\nttl = 30").unwrap();
        assert_eq!(h.size, ByteSize(4096));
        assert_eq!(h.ttl, DurationValue::secs(30));
        let out = toml::to_string(&h).unwrap();
        assert!(out.contains("size = \"4Ki\""), "{out}");
        assert!(out.contains("ttl = \"30s\""), "{out}");
        let j: Holder = serde_json::from_str(r#"{"size":"2MB","ttl":"250ms"}"#).unwrap();
        assert_eq!(j.size, ByteSize(2_000_000));
        assert_eq!(j.ttl, DurationValue::millis(250));
    }

    #[test]
    fn serde_rejects_negative_and_garbage() {
        let e = toml::from_str::<Holder>("size = -1\nttl = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("negative byte size `-1`"), "{e}");
        let e = toml::from_str::<Holder>("size = 1\nttl = -3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("negative duration `-3`"), "{e}");
        let e = toml::from_str::<Holder>("size = \"lots\"\nttl = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lots"), "{e}");
        let e = toml::from_str::<Holder>("size = 1\nttl = true")
            .unwrap_err()
            .to_string();
        assert!(e.contains("duration"), "{e}");
    }
}
