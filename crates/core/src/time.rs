//! Time as integer microseconds since the Unix epoch (UTC). Stored that way in
//! every backend (portable between SQLite and PostgreSQL, cheap to compare) and
//! rendered as RFC 3339 at the edges.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub fn now() -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(now.as_micros() as i64)
    }

    pub const fn from_micros(us: i64) -> Self {
        Timestamp(us)
    }

    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Parses RFC 3339 (`2026-11-21T10:00:00Z`, offsets allowed).
    pub fn parse_rfc3339(s: &str) -> Result<Self, time::error::Parse> {
        let dt = OffsetDateTime::parse(s, &Rfc3339)?;
        Ok(Timestamp((dt.unix_timestamp_nanos() / 1_000) as i64))
    }

    pub fn to_rfc3339(self) -> String {
        let nanos = self.0 as i128 * 1_000;
        OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|dt| dt.format(&Rfc3339).ok())
            .unwrap_or_else(|| self.0.to_string())
    }

    /// The UTC calendar year and month (1 to 12).
    pub fn year_month(self) -> (u32, u32) {
        let dt = OffsetDateTime::from_unix_timestamp_nanos(self.0 as i128 * 1_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        (dt.year().max(0) as u32, u8::from(dt.month()) as u32)
    }

    pub fn saturating_sub(self, d: std::time::Duration) -> Self {
        Timestamp(self.0.saturating_sub(d.as_micros() as i64))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip_keeps_microseconds() {
        let t = Timestamp::parse_rfc3339("2026-11-21T10:00:00.123456Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-21T10:00:00.123456Z");
        assert_eq!(Timestamp::parse_rfc3339(&t.to_rfc3339()).unwrap(), t);
        assert!(Timestamp::parse_rfc3339("yesterday").is_err());
    }
}
