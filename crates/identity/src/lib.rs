//! flowline-identity: who a caller is.
//!
//! This crate holds the identity context's security primitives: parsed
//! credentials (`Email`, `Password`), Argon2id hashing on a bounded blocking
//! pool with constant-shape verification for unknown users, and EdDSA access
//! tokens with a rotating key ring published as JWKS. The HTTP flows
//! (register, login, refresh rotation, sessions) build on these.

pub mod credentials;
pub mod password;
pub mod routes;
pub mod service;
pub mod sessions;
pub mod sessions_redis;
pub mod tokens;

pub use credentials::{CredentialError, Email, Password};
pub use password::PasswordHasher;
pub use service::{Device, Identity, IdentityConfig, TokenPair, User};
pub use sessions::{Rotation, Session, SessionStore, SqlSessionStore};
pub use sessions_redis::RedisSessionStore;
pub use tokens::{AccessClaims, KeyRing, SigningKey, TokenError};
