//! Parse, don't validate: an `Email` or a `Password` that exists is acceptable.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("email address is not valid: {0}")]
    BadEmail(&'static str),
    #[error("password is too weak: {0}")]
    WeakPassword(&'static str),
}

/// A syntactically valid, normalised (trimmed, lower-cased) email address.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Email, CredentialError> {
        let s = raw.trim().to_lowercase();
        if s.len() > 254 {
            return Err(CredentialError::BadEmail("longer than 254 characters"));
        }
        let (local, domain) = s
            .rsplit_once('@')
            .ok_or(CredentialError::BadEmail("no @"))?;
        if local.is_empty() || local.len() > 64 {
            return Err(CredentialError::BadEmail(
                "local part must be 1 to 64 characters",
            ));
        }
        let labels: Vec<&str> = domain.split('.').collect();
        let label_ok = |l: &&str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        };
        if labels.len() < 2 || !labels.iter().all(label_ok) {
            return Err(CredentialError::BadEmail(
                "domain must look like example.com",
            ));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) || local.contains('@') {
            return Err(CredentialError::BadEmail("no spaces or control characters"));
        }
        Ok(Email(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `j***@example.com`: for logs, which never carry raw PII.
    /// `a***@example.com`: the form logs, audit records and the audit
    /// context's per-account rule all see (one definition, the redactor's).
    pub fn masked(&self) -> String {
        flowline_telemetry::redact::mask_email(&self.0)
    }
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Email({})", self.masked())
    }
}

/// A password that meets the policy (NIST SP 800-63B style: length over
/// composition rules, and not a well-known password). Never printed.
#[derive(Clone)]
pub struct Password(String);

/// Passwords every credential-stuffing list starts with.
const COMMON: &[&str] = &[
    "password",
    "password1",
    "password123",
    "12345678",
    "123456789",
    "1234567890",
    "qwertyuiop",
    "iloveyou",
    "letmein1",
    "welcome1",
    "admin123",
    "abc12345",
    "qwerty123",
    "11111111",
    "passw0rd",
    "trustno1",
    "sunshine1",
    "football1",
    "baseball1",
    "monkey123",
];

impl Password {
    pub const MIN_CHARS: usize = 10;
    pub const MAX_BYTES: usize = 128;

    pub fn parse(raw: &str) -> Result<Password, CredentialError> {
        if raw.chars().count() < Self::MIN_CHARS {
            return Err(CredentialError::WeakPassword("at least 10 characters"));
        }
        // Bounded: hashing cost must not grow with attacker-chosen input.
        if raw.len() > Self::MAX_BYTES {
            return Err(CredentialError::WeakPassword("at most 128 bytes"));
        }
        let first = raw.chars().next();
        if raw.chars().all(|c| Some(c) == first) {
            return Err(CredentialError::WeakPassword("not one repeated character"));
        }
        if COMMON.contains(&raw.to_lowercase().as_str()) {
            return Err(CredentialError::WeakPassword("too common"));
        }
        Ok(Password(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_bad_ones_refused() {
        let e = Email::parse("  Ana.Souza+shop@Example.COM ").unwrap();
        assert_eq!(e.as_str(), "ana.souza+shop@example.com");
        assert_eq!(e.masked(), "a***@example.com");
        assert!(!format!("{e:?}").contains("souza"));
        for bad in [
            "",
            "no-at",
            "@example.com",
            "a@",
            "a@localhost",
            "a b@example.com",
            "a@-x.com",
            "a@ex..com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Email::parse(&format!("{}@example.com", "a".repeat(65))).is_err());
    }

    #[test]
    fn password_policy() {
        assert!(Password::parse("correct horse battery").is_ok());
        for (bad, why) in [
            ("short", "at least 10"),
            ("aaaaaaaaaaaa", "repeated"),
            ("Password123", "common"),
        ] {
            let e = Password::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(Password::parse(&"x1".repeat(65)).is_err(), "over 128 bytes");
        let p = Password::parse("correct horse battery").unwrap();
        assert_eq!(format!("{p:?}"), "Password(***)");
    }
}
