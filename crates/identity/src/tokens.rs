//! EdDSA (Ed25519) access tokens and the key ring that signs and verifies them.
//!
//! Verification is strict: the header's `alg` must be `EdDSA` (so `none` and
//! HS256-with-the-public-key confusion are refused before any key is touched),
//! the `kid` must name a key in the ring, and `exp`, `nbf`, `iss` and `aud` are
//! all checked. Rotation adds a new signing key; older public keys stay in the
//! ring (and in JWKS) so tokens they signed verify until they expire.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// An Ed25519 signing key with its key id.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pkcs8: Vec<u8>,
    public: [u8; 32],
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.kid)
    }
}

impl SigningKey {
    pub fn generate() -> SigningKey {
        let sk = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
        let pkcs8 = sk
            .to_pkcs8_der()
            .expect("encoding a fresh key")
            .as_bytes()
            .to_vec();
        SigningKey {
            kid: flowline_core::id::new_id().simple().to_string(),
            pkcs8,
            public: sk.verifying_key().to_bytes(),
        }
    }

    /// Restores a stored key (PKCS#8 DER).
    pub fn from_pkcs8(kid: impl Into<String>, der: &[u8]) -> Result<SigningKey, TokenError> {
        let sk = ed25519_dalek::SigningKey::from_pkcs8_der(der).map_err(|_| TokenError::BadKey)?;
        Ok(SigningKey {
            kid: kid.into(),
            pkcs8: der.to_vec(),
            public: sk.verifying_key().to_bytes(),
        })
    }

    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// The public half as a JWK (RFC 8037 OKP).
    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
            "kid": self.kid, "x": URL_SAFE_NO_PAD.encode(self.public),
        })
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    /// User id.
    pub sub: String,
    /// Session id: revoking the session revokes the token at once.
    pub sid: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm is not allowed")]
    AlgorithmNotAllowed,
    #[error("token key id is unknown")]
    UnknownKey,
    #[error("token is expired")]
    Expired,
    #[error("token is not yet valid")]
    NotYetValid,
    #[error("token audience or issuer is wrong")]
    WrongAudience,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("signing key is not valid")]
    BadKey,
}

/// Signs with the newest key; verifies with any key in the ring.
#[derive(Clone, Debug)]
pub struct KeyRing {
    issuer: String,
    audience: String,
    ttl_secs: i64,
    /// Newest last.
    keys: Vec<SigningKey>,
}

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 5;

impl KeyRing {
    pub fn new(issuer: &str, audience: &str, ttl_secs: i64, keys: Vec<SigningKey>) -> KeyRing {
        assert!(!keys.is_empty(), "a key ring needs a key");
        KeyRing {
            issuer: issuer.into(),
            audience: audience.into(),
            ttl_secs,
            keys,
        }
    }

    /// Adds a new signing key; earlier ones keep verifying.
    pub fn rotate(&mut self, key: SigningKey) {
        self.keys.push(key);
    }

    /// Key ids in the ring.
    pub fn kids(&self) -> impl Iterator<Item = String> + '_ {
        self.keys.iter().map(|k| k.kid.clone())
    }

    pub fn current(&self) -> &SigningKey {
        self.keys.last().expect("non-empty")
    }

    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": self.keys.iter().rev().map(SigningKey::jwk).collect::<Vec<_>>() })
    }

    /// Issues an access token for `sub` in session `sid`, valid from `now` (unix seconds).
    pub fn issue(
        &self,
        sub: &str,
        sid: &str,
        roles: &[String],
        now: i64,
    ) -> (String, AccessClaims) {
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: sub.into(),
            sid: sid.into(),
            iat: now,
            nbf: now,
            exp: now + self.ttl_secs,
            jti: flowline_core::id::new_id().to_string(),
            roles: roles.to_vec(),
        };
        let key = self.current();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        let token =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(key.pkcs8_der()))
                .expect("signing with a valid Ed25519 key");
        (token, claims)
    }

    pub fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or(TokenError::UnknownKey)?;
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&[&self.audience]);
        v.set_issuer(&[&self.issuer]);
        v.validate_nbf = true;
        v.leeway = LEEWAY_SECS;
        v.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        use jsonwebtoken::errors::ErrorKind as K;
        jsonwebtoken::decode::<AccessClaims>(token, &DecodingKey::from_ed_der(&key.public), &v)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                K::ExpiredSignature => TokenError::Expired,
                K::ImmatureSignature => TokenError::NotYetValid,
                K::InvalidAudience | K::InvalidIssuer => TokenError::WrongAudience,
                K::InvalidAlgorithm => TokenError::AlgorithmNotAllowed,
                K::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn tokens_round_trip_and_survive_rotation() {
        let mut ring = KeyRing::new(
            "https://flowline.local",
            "flowline-api",
            900,
            vec![SigningKey::generate()],
        );
        let (t1, c1) = ring.issue("user-1", "sess-1", &["user".into()], now());
        assert_eq!(ring.verify(&t1).unwrap(), c1);
        assert_eq!(c1.exp - c1.iat, 900);
        let old_kid = ring.current().kid.clone();
        ring.rotate(SigningKey::generate());
        assert_ne!(ring.current().kid, old_kid);
        let (t2, _) = ring.issue("user-1", "sess-1", &[], now());
        assert!(
            ring.verify(&t1).is_ok(),
            "tokens of the previous key stay valid"
        );
        assert!(ring.verify(&t2).is_ok());
        let jwks = ring.jwks();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
        assert_eq!(jwks["keys"][0]["kid"], ring.current().kid.as_str());
        assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
        // A stored key restores to the same public key.
        let k = ring.current();
        assert_eq!(
            SigningKey::from_pkcs8(k.kid.clone(), k.pkcs8_der())
                .unwrap()
                .public_key(),
            k.public_key()
        );
    }

    #[test]
    fn token_attacks_are_refused() {
        let ring = KeyRing::new("iss", "aud", 900, vec![SigningKey::generate()]);
        let (good, claims) = ring.issue("u", "s", &[], now());
        let parts: Vec<&str> = good.split('.').collect();
        let kid = ring.current().kid.clone();

        // alg: none, no signature.
        let none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none", "typ": "JWT", "kid": kid})),
            parts[1]
        );
        assert!(
            matches!(
                ring.verify(&none),
                Err(TokenError::Malformed | TokenError::AlgorithmNotAllowed)
            ),
            "{:?}",
            ring.verify(&none)
        );

        // HS256 signed with the public key (key confusion).
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(kid.clone());
        let confused = jsonwebtoken::encode(
            &h,
            &claims,
            &EncodingKey::from_secret(&ring.current().public_key()),
        )
        .unwrap();
        assert_eq!(ring.verify(&confused), Err(TokenError::AlgorithmNotAllowed));

        // Tampered payload.
        let mut evil = claims.clone();
        evil.sub = "admin".into();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64(&serde_json::to_value(&evil).unwrap()),
            parts[2]
        );
        assert_eq!(ring.verify(&tampered), Err(TokenError::BadSignature));

        // Expired.
        let (old, _) = ring.issue("u", "s", &[], now() - 3600);
        assert_eq!(ring.verify(&old), Err(TokenError::Expired));
        // Not yet valid.
        let (future, _) = ring.issue("u", "s", &[], now() + 3600);
        assert_eq!(ring.verify(&future), Err(TokenError::NotYetValid));

        // Wrong audience / issuer: same key, other ring settings.
        let other = KeyRing::new("iss", "other-aud", 900, vec![ring.current().clone()]);
        let (t, _) = other.issue("u", "s", &[], now());
        assert_eq!(ring.verify(&t), Err(TokenError::WrongAudience));

        // Unknown kid: a key the ring never had.
        let stranger = KeyRing::new("iss", "aud", 900, vec![SigningKey::generate()]);
        let (t, _) = stranger.issue("u", "s", &[], now());
        assert_eq!(ring.verify(&t), Err(TokenError::UnknownKey));

        assert_eq!(ring.verify("not.a.jwt"), Err(TokenError::Malformed));
        assert_eq!(ring.verify(""), Err(TokenError::Malformed));
    }
}
