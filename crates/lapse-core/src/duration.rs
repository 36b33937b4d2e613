//! Durations as operators write them: `90s`, `15m`, `2h`, `1d`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A whole number of seconds, parsed from and displayed as `90s` / `15m` / `2h` / `1d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TtlDuration(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration `{input}`: expected a whole number followed by s, m, h or d, e.g. `90s`, `15m`, `2h`"
)]
pub struct DurationParseError {
    pub input: String,
}

impl TtlDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(secs)
    }

    pub const fn secs(self) -> u64 {
        self.0
    }
}

impl FromStr for TtlDuration {
    type Err = DurationParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DurationParseError {
            input: s.to_owned(),
        };
        let s_trim = s.trim();
        let unit_at = s_trim.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        let (digits, unit) = s_trim.split_at(unit_at);
        if digits.is_empty() {
            return Err(err());
        }
        let n: u64 = digits.parse().map_err(|_| err())?;
        let mult = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(err()),
        };
        n.checked_mul(mult).map(Self).ok_or_else(err)
    }
}

impl fmt::Display for TtlDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s != 0 && s.is_multiple_of(86_400) {
            write!(f, "{}d", s / 86_400)
        } else if s != 0 && s.is_multiple_of(3600) {
            write!(f, "{}h", s / 3600)
        } else if s != 0 && s.is_multiple_of(60) {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl Serialize for TtlDuration {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TtlDuration {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let s = String::deserialize(de)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!("90s".parse::<TtlDuration>().map(|d| d.secs()), Ok(90));
        assert_eq!("15m".parse::<TtlDuration>().map(|d| d.secs()), Ok(900));
        assert_eq!("2h".parse::<TtlDuration>().map(|d| d.secs()), Ok(7200));
        assert_eq!("1d".parse::<TtlDuration>().map(|d| d.secs()), Ok(86_400));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "15",
            "m",
            "-5m",
            "1.5h",
            "10 m",
            "5w",
            "99999999999999999999s",
        ] {
            assert!(
                bad.parse::<TtlDuration>().is_err(),
                "{bad} should not parse"
            );
        }
    }

    #[test]
    fn displays_in_largest_whole_unit() {
        assert_eq!(TtlDuration::from_secs(900).to_string(), "15m");
        assert_eq!(TtlDuration::from_secs(90).to_string(), "90s");
        assert_eq!(TtlDuration::from_secs(7200).to_string(), "2h");
    }
}
