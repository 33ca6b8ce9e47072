//! Money: integer minor units and an ISO 4217 currency, `{"amount": 29990, "currency": "BRL"}`.
//! No floats anywhere money is counted.

use serde::{Deserialize, Serialize};
use std::fmt;

/// ISO 4217 codes flowline accepts (active currencies in common use).
const CODES: &[&str] = &[
    "AED", "ARS", "AUD", "BDT", "BGN", "BRL", "CAD", "CHF", "CLP", "CNY", "COP", "CZK", "DKK",
    "EGP", "EUR", "GBP", "HKD", "HUF", "IDR", "ILS", "INR", "ISK", "JPY", "KES", "KRW", "MAD",
    "MXN", "MYR", "NGN", "NOK", "NZD", "PEN", "PHP", "PKR", "PLN", "QAR", "RON", "RSD", "SAR",
    "SEK", "SGD", "THB", "TRY", "TWD", "UAH", "USD", "VND", "ZAR",
];

/// A currency code known to ISO 4217.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(s: &str) -> Result<Currency, String> {
        let up = s.trim();
        if CODES.contains(&up) {
            let b = up.as_bytes();
            Ok(Currency([b[0], b[1], b[2]]))
        } else {
            Err(format!("`{s}` is not a supported ISO 4217 currency code"))
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII by construction")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Currency::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An amount in minor units (cents, centavos…) of a currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub amount: i64,
    pub currency: Currency,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currencies_parse_and_money_round_trips() {
        assert_eq!(Currency::parse("BRL").unwrap().as_str(), "BRL");
        assert!(Currency::parse("XYZ").is_err());
        assert!(Currency::parse("brl").is_err(), "codes are upper case");
        let m: Money = serde_json::from_str(r#"{"amount": 29990, "currency": "BRL"}"#).unwrap();
        assert_eq!(m.amount, 29990);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"amount":29990,"currency":"BRL"}"#
        );
        assert!(serde_json::from_str::<Money>(r#"{"amount": 1, "currency": "ZZZ"}"#).is_err());
        assert!(
            serde_json::from_str::<Money>(r#"{"amount": 1.5, "currency": "USD"}"#).is_err(),
            "no fractional minor units"
        );
    }
}
