//! Redaction of log lines: the last line of defence, applied to the formatted
//! line, so a field logged carelessly anywhere (a header, an error message
//! quoting input) still cannot leak.
//!
//! - emails keep their first character and domain: `a***@example.com`;
//! - values of secret-named fields (`password`, `token`, `secret`,
//!   `authorization`, `card_number`, `cvv`, ...) in JSON (`"password":"…"`)
//!   or `key=value` form become `[REDACTED]`;
//! - `Bearer …` credentials and JWT-shaped strings become `[REDACTED]`;
//! - digit runs of 13–19 digits (spaces or dashes allowed) that pass the Luhn
//!   check become `[REDACTED-PAN]`.

use std::borrow::Cow;
use std::io::Write;
use tracing_subscriber::fmt::MakeWriter;

/// Secret field names. A name also matches as the last part of a longer one
/// (`db_password`, `session_token`, `x-api-key`), not as the first
/// (`tokens_issued`, `token_type`).
const SECRET_KEYS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "secret_key",
    "private_key",
    "token",
    "authorization",
    "cookie",
    "api_key",
    "api-key",
    "apikey",
    "credential",
    "credentials",
    "card_number",
    "cardnumber",
    "pan",
    "cvv",
    "cvc",
];

/// Keys whose unquoted value is a whole header value (`Basic abc`,
/// `a=1; b=2`), not one word.
const WHOLE_VALUE_KEYS: &[&str] = &["authorization", "cookie"];

/// The line with PII and secrets removed (borrowed when nothing matched).
pub fn redact(line: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(line);
    if let Some(s) = secret_fields(&out) {
        out = Cow::Owned(s);
    }
    if let Some(s) = bearer_and_jwt(&out) {
        out = Cow::Owned(s);
    }
    if let Some(s) = card_numbers(&out) {
        out = Cow::Owned(s);
    }
    if let Some(s) = emails(&out) {
        out = Cow::Owned(s);
    }
    out
}

/// `a***@example.com` for `ana@example.com`; what the identity context uses too.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

fn is_email_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._%+-".contains(&b)
}

fn is_domain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'-'
}

fn emails(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    let mut changed = false;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'@' {
            i += 1;
            continue;
        }
        let mut start = i;
        while start > 0 && is_email_local(bytes[start - 1]) {
            start -= 1;
        }
        let mut end = i + 1;
        while end < bytes.len() && is_domain(bytes[end]) {
            end += 1;
        }
        let domain = s[i + 1..end].trim_end_matches('.');
        let local = &s[start..i];
        let masked_already = local.ends_with("***");
        if !local.is_empty() && domain.contains('.') && !masked_already {
            out.push_str(&s[last..start]);
            out.push_str(&mask_email(&format!("{local}@{domain}")));
            last = i + 1 + domain.len();
            changed = true;
            i = last;
        } else {
            i += 1;
        }
    }
    changed.then(|| {
        out.push_str(&s[last..]);
        out
    })
}

/// `"key":"value"`, `"key": "value"`, `key=value` and `key="value"` with a
/// secret-named key: the value goes.
fn secret_fields(s: &str) -> Option<String> {
    let lower = s.to_ascii_lowercase();
    let bytes = s.as_bytes();
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    for key in SECRET_KEYS {
        let mut from = 0;
        while let Some(pos) = lower[from..].find(key) {
            let k0 = from + pos;
            let k1 = k0 + key.len();
            from = k1;
            // A whole key or the last part of one (`db_password`), not
            // the start of a longer word (`tokens_issued`, `token_type`).
            let before = k0.checked_sub(1).map(|i| bytes[i]);
            let after = bytes.get(k1).copied();
            if before.is_some_and(|b| b.is_ascii_alphanumeric())
                || after.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                continue;
            }
            let mut j = k1;
            // The key's closing quote: `"` in JSON, `\"` inside a JSON string.
            let escaped = bytes.get(j) == Some(&b'\\') && bytes.get(j + 1) == Some(&b'"');
            if escaped {
                j += 2;
            } else if matches!(bytes.get(j), Some(b'"') | Some(b'\'')) {
                j += 1;
            }
            while bytes.get(j) == Some(&b' ') {
                j += 1;
            }
            if !matches!(bytes.get(j), Some(b':') | Some(b'=')) {
                continue;
            }
            j += 1;
            while bytes.get(j) == Some(&b' ') {
                j += 1;
            }
            let (v0, v1) = if bytes.get(j) == Some(&b'\\') && bytes.get(j + 1) == Some(&b'"') {
                // A value quoted inside a JSON string: up to the next `\"`.
                let from = j + 2;
                let e = s[from..].find("\\\"").map_or(s.len(), |p| from + p);
                (from, e)
            } else if bytes.get(j) == Some(&b'"') {
                // A quoted value, with JSON escapes.
                let mut e = j + 1;
                while e < bytes.len() && bytes[e] != b'"' {
                    e += if bytes[e] == b'\\' { 2 } else { 1 };
                }
                (j + 1, e.min(bytes.len()))
            } else {
                // Unquoted: one word, or a whole header value; never past
                // the quote or line end that closes the surrounding text.
                let whole = WHOLE_VALUE_KEYS.contains(key);
                let mut e = j;
                while e < bytes.len()
                    && !matches!(bytes[e], b'"' | b'\\' | b'\r' | b'\n')
                    && (whole || !matches!(bytes[e], b' ' | b',' | b'}' | b'&' | b';'))
                {
                    e += 1;
                }
                (j, e)
            };
            if v1 > v0 && &s[v0..v1] != "[REDACTED]" {
                cuts.push((v0, v1));
            }
        }
    }
    splice(s, cuts, "[REDACTED]")
}

fn bearer_and_jwt(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut cuts = Vec::new();
    let lower = s.to_ascii_lowercase();
    let mut from = 0;
    while let Some(pos) = lower[from..].find("bearer ") {
        let v0 = from + pos + "bearer ".len();
        let mut v1 = v0;
        while v1 < bytes.len() && is_token_byte(bytes[v1]) {
            v1 += 1;
        }
        if v1 > v0 {
            cuts.push((v0, v1));
        }
        from = v1.max(v0);
    }
    // JWTs: base64url `eyJ…` with two dots.
    let mut from = 0;
    while let Some(pos) = s[from..].find("eyJ") {
        let v0 = from + pos;
        let mut v1 = v0;
        while v1 < bytes.len() && is_token_byte(bytes[v1]) {
            v1 += 1;
        }
        if s[v0..v1].matches('.').count() >= 2 {
            cuts.push((v0, v1));
        }
        from = v1.max(v0 + 3);
    }
    splice(s, cuts, "[REDACTED]")
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.~+/=".contains(&b)
}

fn card_numbers(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut cuts = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        // Not inside a word or a number's fraction (`6.2718281828459045`).
        if !bytes[i].is_ascii_digit()
            || (i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'.'))
        {
            i += 1;
            continue;
        }
        // Greedy run of digits with single spaces/dashes between them.
        let mut j = i;
        let mut digits = Vec::new();
        let mut end = i;
        while j < bytes.len() {
            if bytes[j].is_ascii_digit() {
                digits.push(bytes[j] - b'0');
                j += 1;
                end = j;
            } else if matches!(bytes[j], b' ' | b'-')
                && bytes.get(j + 1).is_some_and(u8::is_ascii_digit)
                && digits.len() < 19
            {
                j += 1;
            } else {
                break;
            }
        }
        let next = bytes.get(end).copied();
        let fraction = next == Some(b'.') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit);
        let bounded = !next.is_some_and(|b| b.is_ascii_alphanumeric()) && !fraction;
        if (13..=19).contains(&digits.len()) && bounded && luhn(&digits) {
            cuts.push((i, end));
        }
        i = end.max(i + 1);
    }
    splice(s, cuts, "[REDACTED-PAN]")
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if !i.is_multiple_of(2) {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Replaces the (possibly overlapping) ranges with `with`.
fn splice(s: &str, mut cuts: Vec<(usize, usize)>, with: &str) -> Option<String> {
    if cuts.is_empty() {
        return None;
    }
    cuts.sort_unstable();
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for (a, b) in cuts {
        if a < last {
            continue;
        }
        out.push_str(&s[last..a]);
        out.push_str(with);
        last = b;
    }
    out.push_str(&s[last..]);
    Some(out)
}

/// A `MakeWriter` whose writers buffer one formatted event and write it
/// redacted, in one call, when dropped.
pub struct RedactingWriter<M> {
    inner: M,
}

impl<M> RedactingWriter<M> {
    pub fn new(inner: M) -> Self {
        RedactingWriter { inner }
    }
}

pub struct RedactGuard<W: Write> {
    buf: Vec<u8>,
    inner: W,
}

impl<W: Write> Write for RedactGuard<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for RedactGuard<W> {
    fn drop(&mut self) {
        let line = String::from_utf8_lossy(&self.buf);
        let _ = self.inner.write_all(redact(&line).as_bytes());
        let _ = self.inner.flush();
    }
}

impl<'a, M> MakeWriter<'a> for RedactingWriter<M>
where
    M: MakeWriter<'a>,
{
    type Writer = RedactGuard<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactGuard {
            buf: Vec::with_capacity(256),
            inner: self.inner.make_writer(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_masked_once() {
        assert_eq!(
            redact(r#"{"email":"ana.maria@example.com","x":1}"#),
            r#"{"email":"a***@example.com","x":1}"#
        );
        assert_eq!(
            redact("to bob@mail.example.org."),
            "to b***@mail.example.org."
        );
        // Already masked (identity masks before logging) stays as is.
        assert_eq!(redact("a***@example.com"), "a***@example.com");
        assert_eq!(
            redact("no at sign, user@localhost"),
            "no at sign, user@localhost"
        );
    }

    #[test]
    fn secret_fields_lose_their_values() {
        let line = r#"{"password":"correct horse","refresh_token": "abc.def","tokens_issued":3}"#;
        assert_eq!(
            redact(line),
            r#"{"password":"[REDACTED]","refresh_token": "[REDACTED]","tokens_issued":3}"#
        );
        assert_eq!(
            redact("login password=hunter22 user=ana"),
            "login password=[REDACTED] user=ana"
        );
        assert_eq!(
            redact(r#"{"password":"with \"quote\" inside","n":1}"#),
            r#"{"password":"[REDACTED]","n":1}"#
        );
    }

    #[test]
    fn prefixed_names_escaped_json_and_header_values() {
        assert_eq!(
            redact(
                r#"{"db_password":"p1","client_secret":"s2","x-api-key":"k3","token_type":"Bearer"}"#
            ),
            r#"{"db_password":"[REDACTED]","client_secret":"[REDACTED]","x-api-key":"[REDACTED]","token_type":"Bearer"}"#
        );
        // JSON inside a JSON string (a logged body or `?value`).
        assert_eq!(
            redact(r#"{"message":"body {\"password\":\"hunter22\",\"n\":1}"}"#),
            r#"{"message":"body {\"password\":\"[REDACTED]\",\"n\":1}"}"#
        );
        // A query string inside a JSON string keeps the line valid JSON.
        assert_eq!(
            redact(r#"{"msg":"GET /x?refresh_token=abc","status":200}"#),
            r#"{"msg":"GET /x?refresh_token=[REDACTED]","status":200}"#
        );
        // Header values go whole, and never swallow the next line.
        assert_eq!(
            redact("authorization: Basic dXNlcjpwYXNz\nnext line"),
            "authorization: [REDACTED]\nnext line"
        );
        assert_eq!(redact("cookie=a=1; b=2\nx"), "cookie=[REDACTED]\nx");
    }

    #[test]
    fn bearer_tokens_and_jwts_go() {
        let jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl";
        assert_eq!(
            redact(&format!("authz Bearer {jwt} ok")),
            "authz Bearer [REDACTED] ok"
        );
        assert_eq!(redact(&format!("saw {jwt}")), "saw [REDACTED]");
    }

    #[test]
    fn card_numbers_that_pass_luhn_go() {
        assert_eq!(
            redact("card 4111 1111 1111 1111 ok"),
            "card [REDACTED-PAN] ok"
        );
        assert_eq!(redact("card 4111-1111-1111-1111"), "card [REDACTED-PAN]");
        assert_eq!(redact("pan=5555555555554444;"), "pan=[REDACTED];");
        assert_eq!(redact("x 5555555555554444 y"), "x [REDACTED-PAN] y");
        // Not Luhn-valid, or too short: ids and timestamps survive.
        assert_eq!(redact("id 4111111111111112"), "id 4111111111111112");
        assert_eq!(redact("at 1700000000000"), "at 1700000000000");
        assert_eq!(redact("uuid 0190a1b2c3d4"), "uuid 0190a1b2c3d4");
        // Floats keep their digits (a JSON log line must stay JSON).
        assert_eq!(
            redact(r#"{"ms":6.4111111111111111}"#),
            r#"{"ms":6.4111111111111111}"#
        );
        assert_eq!(redact("x 4111111111111111.25"), "x 4111111111111111.25");
    }

    #[test]
    fn writer_redacts_each_line() {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = buf.clone();
        let make = RedactingWriter::new(move || Sink(sink.clone()));
        {
            let mut w = make.make_writer();
            w.write_all(b"user ana@example.com password=x1 ").unwrap();
            w.write_all(b"4111111111111111\n").unwrap();
        }
        let got = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        assert_eq!(
            got,
            "user a***@example.com password=[REDACTED] [REDACTED-PAN]\n"
        );
    }

    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
