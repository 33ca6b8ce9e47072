//! Card and UPI input checks. A card number lives only in memory for the
//! length of the tokenization call: it is never stored, logged or echoed.

use flowline_core::{ErrorCode, Problem, Timestamp};
use flowline_http::ApiError;
use serde::Deserialize;

/// `POST /payments/tokens`. `Debug` is hand-written so the number and CVC
/// cannot reach a log line by accident.
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CardInput {
    /// Digits; spaces and dashes are ignored.
    pub number: String,
    pub exp_month: u32,
    /// Four digits (two are read as 20YY).
    pub exp_year: u32,
    pub cvc: String,
}

impl std::fmt::Debug for CardInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardInput")
            .field("number", &"<redacted>")
            .field("exp_month", &self.exp_month)
            .field("exp_year", &self.exp_year)
            .field("cvc", &"<redacted>")
            .finish()
    }
}

/// A checked card: the digits, brand and expiry.
pub struct Card {
    pub digits: String,
    pub brand: &'static str,
    pub exp_month: u32,
    pub exp_year: u32,
}

impl Card {
    pub fn last4(&self) -> String {
        self.digits[self.digits.len() - 4..].to_owned()
    }
}

pub fn luhn(digits: &str) -> bool {
    let mut sum = 0;
    for (i, b) in digits.bytes().rev().enumerate() {
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum % 10 == 0
}

pub fn brand(digits: &str) -> &'static str {
    let p2: u32 = digits[..2].parse().unwrap_or(0);
    let p4: u32 = digits[..4].parse().unwrap_or(0);
    match () {
        _ if digits.starts_with('4') => "visa",
        _ if (51..=55).contains(&p2) || (2221..=2720).contains(&p4) => "mastercard",
        _ if p2 == 34 || p2 == 37 => "amex",
        _ if p4 == 6011 || p2 == 65 => "discover",
        _ if p2 == 60 || p2 == 81 || p2 == 82 => "rupay",
        _ => "unknown",
    }
}

/// Checks number (Luhn), expiry (not past the end of its month) and CVC,
/// naming every bad field.
pub fn check(input: &CardInput, now: Timestamp) -> Result<Card, ApiError> {
    let mut errors: Vec<(&str, &str)> = Vec::new();
    let digits: String = input
        .number
        .chars()
        .filter(|c| *c != ' ' && *c != '-')
        .collect();
    let well_formed =
        (12..=19).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
    if !well_formed {
        errors.push(("number", "12 to 19 digits"));
    } else if !luhn(&digits) {
        errors.push(("number", "not a valid card number (checksum)"));
    }
    let year = if input.exp_year < 100 {
        input.exp_year + 2000
    } else {
        input.exp_year
    };
    if !(1..=12).contains(&input.exp_month) {
        errors.push(("exp_month", "1 to 12"));
    } else if !(2000..=2100).contains(&year) {
        errors.push(("exp_year", "a four-digit year"));
    } else {
        let (y, m) = now.year_month();
        if (year, input.exp_month) < (y, m) {
            errors.push(("exp_year", "the card has expired"));
        }
    }
    let brand = if well_formed {
        brand(&digits)
    } else {
        "unknown"
    };
    let cvc_len = if brand == "amex" { 4 } else { 3 };
    if input.cvc.len() != cvc_len || !input.cvc.bytes().all(|b| b.is_ascii_digit()) {
        errors.push(("cvc", if cvc_len == 4 { "4 digits" } else { "3 digits" }));
    }
    if !errors.is_empty() {
        let mut p = Problem::new(ErrorCode::InvalidCard).with_detail(format!(
            "the card was refused: {}",
            errors.iter().map(|e| e.1).collect::<Vec<_>>().join("; ")
        ));
        for (f, m) in errors {
            p = p.with_field(f, m);
        }
        return Err(p.into());
    }
    Ok(Card {
        digits,
        brand,
        exp_month: input.exp_month,
        exp_year: year,
    })
}

/// A UPI virtual payment address: `name@bank` (NPCI: 2 to 256 characters of
/// letters, digits, `.`, `-`, `_` before the `@`, letters after).
pub fn check_vpa(vpa: &str) -> Result<String, ApiError> {
    let ok = match vpa.split_once('@') {
        Some((name, bank)) => {
            (2..=256).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
                && (2..=64).contains(&bank.len())
                && bank.bytes().all(|b| b.is_ascii_alphabetic())
        }
        None => false,
    };
    if !ok {
        return Err(Problem::new(ErrorCode::InvalidVpa)
            .with_detail("a UPI address looks like name@bank")
            .with_field(
                "vpa",
                "name@bank: letters, digits, . - _ then @ and the bank handle",
            )
            .into());
    }
    Ok(vpa.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(number: &str, m: u32, y: u32, cvc: &str) -> CardInput {
        CardInput {
            number: number.into(),
            exp_month: m,
            exp_year: y,
            cvc: cvc.into(),
        }
    }

    #[test]
    fn cards_are_checked_by_luhn_expiry_and_cvc() {
        let now = Timestamp::parse_rfc3339("2026-11-21T00:00:00Z").unwrap();
        let c = check(&input("4242 4242 4242 4242", 12, 2030, "123"), now).unwrap();
        assert_eq!((c.brand, c.last4().as_str()), ("visa", "4242"));
        assert_eq!(
            check(&input("378282246310005", 1, 30, "1234"), now)
                .unwrap()
                .brand,
            "amex"
        );
        assert_eq!(
            check(&input("5555555555554444", 11, 2026, "123"), now)
                .unwrap()
                .brand,
            "mastercard"
        );
        let field = |i: CardInput| check(&i, now).err().unwrap().0.errors[0].field.clone();
        assert_eq!(field(input("4242424242424241", 12, 2030, "123")), "number");
        assert_eq!(
            field(input("4242424242424242", 10, 2026, "123")),
            "exp_year"
        );
        assert_eq!(
            field(input("4242424242424242", 13, 2030, "123")),
            "exp_month"
        );
        assert_eq!(field(input("4242424242424242", 12, 2030, "12")), "cvc");
        let e = check(&input("4242424242424241", 12, 2030, "123"), now)
            .err()
            .unwrap();
        assert_eq!(e.0.code, "invalid_card");
        assert!(!format!("{:?}", input("4242424242424242", 1, 1, "123")).contains("4242"));
    }

    #[test]
    fn vpas_look_like_name_at_bank() {
        assert_eq!(check_vpa("Success@razorpay").unwrap(), "success@razorpay");
        for bad in [
            "nobank",
            "a@b",
            "x@",
            "@bank",
            "two@at@bank",
            "sp ace@bank",
            "name@bank1",
        ] {
            assert_eq!(check_vpa(bad).unwrap_err().0.code, "invalid_vpa", "{bad}");
        }
    }
}
