//! The identity context: users, sessions, tokens, and the audit events they cause.

use crate::credentials::{Email, Password};
use crate::password::PasswordHasher;
use crate::sessions::{Rotation, Session, SessionStore, SqlSessionStore};
use crate::tokens::{KeyRing, SigningKey};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use flowline_core::{Envelope, ErrorCode, EventDraft, Problem, Timestamp};
use flowline_http::{ApiError, Principal, RequestContext};
use flowline_store::outbox::{self, Relay};
use flowline_store::{Db, Migration, StoreError, Tx};
use rand_core::RngCore;
use serde::Serialize;
use sha2::Digest;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub const USER_TOPIC: &str = "user.events";
pub const AUDIT_TOPIC: &str = "audit.events";

pub const MIGRATIONS: &[Migration] = &[Migration {
    scope: "identity",
    version: 1,
    name: "init",
    sqlite: include_str!("../migrations/0001_init.sql"),
    postgres: include_str!("../migrations/0001_init.sql"),
}];

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub issuer: String,
    pub audience: String,
    pub access_ttl: Duration,
    pub session_ttl: Duration,
    pub hash_concurrency: usize,
    /// Failed logins for one account before each further attempt must wait.
    pub lockout_threshold: u32,
    /// The longest an account is slowed down after failures (never locked for good).
    pub lockout_max_delay: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            issuer: "flowline".into(),
            audience: "flowline-api".into(),
            access_ttl: Duration::from_secs(15 * 60),
            session_ttl: Duration::from_secs(7 * 24 * 3600),
            hash_concurrency: 2,
            lockout_threshold: 5,
            lockout_max_delay: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct User {
    pub id: String,
    pub email: String,
    pub display_name: String,
    pub role: String,
    pub status: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    pub session_id: String,
}

/// The user columns that change one at a time.
#[derive(Debug, Clone, Copy)]
enum UserColumn {
    DisplayName,
    PasswordHash,
    Status,
}

/// Where a login comes from (kept with the session).
#[derive(Debug, Clone, Default)]
pub struct Device {
    pub user_agent: String,
    pub ip: String,
}

pub struct Identity {
    pub db: Db,
    relay: Relay,
    hasher: PasswordHasher,
    keys: RwLock<KeyRing>,
    sessions: Arc<dyn SessionStore>,
    pub config: IdentityConfig,
    /// Sessions known active, with when that was checked. Revocations in this
    /// process evict at once; entries older than `ACTIVE_CACHE_TTL` are re-read.
    active: Mutex<HashMap<String, (i64, Instant)>>,
    /// Failed logins per account: (count, last failure).
    failures: Mutex<HashMap<String, (u32, Instant)>>,
    /// Tokens whose signature and claims were verified, by exact token text.
    /// Ed25519 verification dominates an authenticated request; a token seen
    /// before is only re-checked for expiry (its session is checked every time).
    verified: Mutex<HashMap<String, crate::tokens::AccessClaims>>,
    /// Bumped by every revocation: a session read that raced one is not cached.
    revocations: std::sync::atomic::AtomicU64,
}

const ACTIVE_CACHE_TTL: Duration = Duration::from_secs(5);

fn now_secs() -> i64 {
    Timestamp::now().as_micros() / 1_000_000
}

fn random_token(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand_core::OsRng.fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

fn hash_token(t: &str) -> String {
    sha2::Sha256::digest(t.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

type UserRow = (String, String, String, String, String, String, i64);
const USER_COLUMNS: &str = "id, email, display_name, password_hash, role, status, created_at";

fn user_of(r: &UserRow) -> User {
    User {
        id: r.0.clone(),
        email: r.1.clone(),
        display_name: r.2.clone(),
        role: r.4.clone(),
        status: r.5.clone(),
        created_at: Timestamp::from_micros(r.6).to_rfc3339(),
    }
}

fn problem(code: ErrorCode, detail: impl Into<String>) -> ApiError {
    Problem::new(code).with_detail(detail).into()
}

fn display_name(raw: &str) -> Result<String, ApiError> {
    let n = raw.trim();
    if n.is_empty() || n.chars().count() > 100 || n.chars().any(char::is_control) {
        return Err(Problem::new(ErrorCode::ValidationFailed)
            .with_detail("display_name must be 1 to 100 printable characters")
            .with_field("display_name", "1..=100 printable characters")
            .into());
    }
    Ok(n.to_owned())
}

impl Identity {
    /// Opens the identity database, applies migrations, loads (or creates) the signing key.
    pub async fn open(
        db: Db,
        relay: Relay,
        config: IdentityConfig,
    ) -> Result<Identity, StoreError> {
        db.migrate(outbox::KERNEL_MIGRATIONS).await?;
        db.migrate(MIGRATIONS).await?;
        let keys = load_keys(&db).await?;
        let keys = match keys.is_empty() {
            true => vec![insert_key(&db).await?],
            false => keys,
        };
        let ring = KeyRing::new(
            &config.issuer,
            &config.audience,
            config.access_ttl.as_secs() as i64,
            keys,
        );
        Ok(Identity {
            sessions: Arc::new(SqlSessionStore { db: db.clone() }),
            db,
            relay,
            hasher: PasswordHasher::new(config.hash_concurrency),
            keys: RwLock::new(ring),
            config,
            active: Mutex::default(),
            failures: Mutex::default(),
            verified: Mutex::default(),
            revocations: Default::default(),
        })
    }

    /// Keeps sessions in `store` instead of the identity database (e.g. a
    /// `RedisSessionStore` shared by every node).
    pub fn with_session_store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.sessions = store;
        self
    }

    pub fn jwks(&self) -> serde_json::Value {
        self.keys.read().expect("poisoned").jwks()
    }

    /// Re-reads the signing keys (a `flowline keys rotate` elsewhere adds one).
    pub async fn reload_keys(&self) -> Result<(), StoreError> {
        let keys = load_keys(&self.db).await?;
        if keys.is_empty() {
            return Ok(());
        }
        let mut ring = self.keys.write().expect("poisoned");
        let removed = ring.kids().any(|k| !keys.iter().any(|n| n.kid == k));
        *ring = KeyRing::new(
            &self.config.issuer,
            &self.config.audience,
            self.config.access_ttl.as_secs() as i64,
            keys,
        );
        if removed {
            // Tokens of a withdrawn key must not live on in the cache.
            self.verified.lock().expect("poisoned").clear();
        }
        Ok(())
    }

    /// Adds a new signing key; returns its kid.
    pub async fn rotate_keys(&self) -> Result<String, StoreError> {
        let key = insert_key(&self.db).await?;
        let kid = key.kid.clone();
        self.keys.write().expect("poisoned").rotate(key);
        Ok(kid)
    }

    async fn emit(
        &self,
        tx: &mut Tx,
        ctx: &RequestContext,
        draft: EventDraft,
    ) -> Result<(), StoreError> {
        outbox::enqueue(
            tx,
            &Envelope::stamp(draft, &ctx.correlation_id, Some(&ctx.request_id)),
        )
        .await
    }

    /// Records an audit event on its own (no state change goes with it).
    pub async fn audit(
        &self,
        ctx: &RequestContext,
        event_type: &str,
        key: &str,
        payload: serde_json::Value,
    ) {
        let result = async {
            let mut tx = self.db.begin().await?;
            self.emit(
                &mut tx,
                ctx,
                EventDraft::new(AUDIT_TOPIC, event_type, key, payload),
            )
            .await?;
            tx.commit().await
        }
        .await;
        match result {
            Ok(()) => self.relay.notify(),
            Err(e) => tracing::error!(error = %e, event_type, "cannot record audit event"),
        }
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<UserRow>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE email = $1");
        Ok(flowline_store::on_pool!(&self.db, |p| sqlx::query_as(
            &sql
        )
        .bind(email)
        .fetch_optional(p)
        .await)?)
    }

    async fn user_by_id(&self, id: &str) -> Result<Option<UserRow>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
        Ok(flowline_store::on_pool!(&self.db, |p| sqlx::query_as(
            &sql
        )
        .bind(id)
        .fetch_optional(p)
        .await)?)
    }

    /// Creates a user (and its `user.registered` event) in one transaction.
    pub async fn create_user(
        &self,
        ctx: &RequestContext,
        email: &str,
        password: &str,
        name: &str,
        admin: bool,
    ) -> Result<User, ApiError> {
        let email =
            Email::parse(email).map_err(|e| problem(ErrorCode::InvalidEmail, e.to_string()))?;
        let password = Password::parse(password)
            .map_err(|e| problem(ErrorCode::WeakPassword, e.to_string()))?;
        let name = display_name(name)?;
        if self.user_by_email(email.as_str()).await?.is_some() {
            return Err(Problem::new(ErrorCode::EmailTaken).into());
        }
        let hash = self.hasher.hash(&password).await.map_err(|e| {
            tracing::error!(error = %e, "hashing failed");
            ApiError::from(Problem::new(ErrorCode::Internal))
        })?;
        let id = flowline_core::id::new_id().to_string();
        let now = Timestamp::now().as_micros();
        let role = if admin { "admin" } else { "user" };
        let mut tx = self.db.begin().await?;
        let inserted = flowline_store::on_tx!(&mut tx, |c| {
            sqlx::query(
            "INSERT INTO users (id, email, display_name, password_hash, role, status, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 'active', $6, $6)"
        )
        .bind(&id)
        .bind(email.as_str())
        .bind(&name)
        .bind(&hash)
        .bind(role)
        .bind(now)
        .execute(c)
        .await
        .map(|_| ())
        });
        if let Err(e) = inserted {
            // Lost a race with another registration of the same address.
            if e.as_database_error()
                .is_some_and(|d| d.is_unique_violation())
            {
                return Err(Problem::new(ErrorCode::EmailTaken).into());
            }
            return Err(StoreError::from(e).into());
        }
        self.emit(
            &mut tx,
            ctx,
            EventDraft::new(
                USER_TOPIC,
                "user.registered",
                &id,
                serde_json::json!({ "user_id": id, "email": email.as_str(), "display_name": name, "role": role }),
            ),
        )
        .await?;
        tx.commit().await?;
        self.relay.notify();
        tracing::info!(user_id = %id, email = %email.masked(), role, "user registered");
        Ok(User {
            id,
            email: email.as_str().to_owned(),
            display_name: name,
            role: role.into(),
            status: "active".into(),
            created_at: Timestamp::from_micros(now).to_rfc3339(),
        })
    }

    pub async fn register(
        &self,
        ctx: &RequestContext,
        device: &Device,
        email: &str,
        password: &str,
        name: &str,
    ) -> Result<(User, TokenPair), ApiError> {
        let user = self.create_user(ctx, email, password, name, false).await?;
        let tokens = self
            .start_session(&user.id, &user.role, device, None)
            .await?;
        Ok((user, tokens))
    }

    /// Opens a session. With `login`, the `auth.login_succeeded` audit event
    /// commits in the same transaction as the session.
    async fn start_session(
        &self,
        user_id: &str,
        role: &str,
        device: &Device,
        login: Option<&RequestContext>,
    ) -> Result<TokenPair, ApiError> {
        let now = now_secs();
        let session = Session {
            id: random_token(18),
            user_id: user_id.to_owned(),
            user_agent: device.user_agent.chars().take(256).collect(),
            ip: device.ip.clone(),
            created_at: now,
            last_seen: now,
            expires_at: now + self.config.session_ttl.as_secs() as i64,
            revoked_at: None,
        };
        let refresh = random_token(32);
        let event = login.map(|ctx| {
            let payload = serde_json::json!({
                "user_id": user_id, "session_id": session.id, "ip": device.ip, "user_agent": session.user_agent,
            });
            let draft = EventDraft::new(AUDIT_TOPIC, "auth.login_succeeded", user_id, payload);
            Envelope::stamp(draft, &ctx.correlation_id, Some(&ctx.request_id))
        });
        self.sessions
            .create(&session, &hash_token(&refresh), event.as_ref())
            .await?;
        if event.is_some() {
            self.relay.notify();
        }
        Ok(self.tokens_for(user_id, role, &session.id, refresh, now))
    }

    fn tokens_for(
        &self,
        user_id: &str,
        role: &str,
        sid: &str,
        refresh: String,
        now: i64,
    ) -> TokenPair {
        let (access, claims) =
            self.keys
                .read()
                .expect("poisoned")
                .issue(user_id, sid, &[role.to_owned()], now);
        TokenPair {
            access_token: access,
            refresh_token: refresh,
            token_type: "Bearer",
            expires_in: claims.exp - now,
            session_id: sid.to_owned(),
        }
    }

    /// How long `email` must still wait after repeated failures.
    /// How long this client must still wait before trying `email` again.
    /// Failures count per (account, client address): a guesser slows itself
    /// down, not the owner signing in from elsewhere.
    fn throttled(&self, key: &str) -> Option<Duration> {
        let f = self.failures.lock().expect("poisoned");
        let (count, last) = f.get(key)?;
        if *count < self.config.lockout_threshold {
            return None;
        }
        let exp = (*count - self.config.lockout_threshold).min(16);
        let delay = Duration::from_secs(1u64 << exp).min(self.config.lockout_max_delay);
        let elapsed = last.elapsed();
        (elapsed < delay).then(|| delay - elapsed)
    }

    fn record_failure(&self, key: String) {
        let mut f = self.failures.lock().expect("poisoned");
        if f.len() >= 100_000 && !f.contains_key(&key) {
            // Forget only what can no longer slow anyone down; never wipe live
            // counters (that would let a flood reset every account's).
            let idle = self.config.lockout_max_delay * 4;
            f.retain(|_, (_, last)| last.elapsed() < idle);
            if f.len() >= 100_000 {
                return;
            }
        }
        let e = f.entry(key).or_insert((0, Instant::now()));
        e.0 += 1;
        e.1 = Instant::now();
    }

    pub async fn login(
        &self,
        ctx: &RequestContext,
        device: &Device,
        email: &str,
        password: &str,
    ) -> Result<(User, TokenPair), ApiError> {
        let parsed = Email::parse(email).ok();
        // Only well-formed addresses are counted: bounded keys (≤ 254 bytes).
        let throttle_key = parsed
            .as_ref()
            .map(|e| format!("{}|{}", e.as_str(), device.ip));
        if let Some(wait) = throttle_key.as_deref().and_then(|k| self.throttled(k)) {
            return Err(ApiError::from(
                Problem::new(ErrorCode::RateLimited)
                    .with_detail("too many failed logins for this account from here; retry later"),
            )
            .with_retry_after(wait));
        }
        let row = match &parsed {
            Some(e) => self.user_by_email(e.as_str()).await?,
            None => None,
        };
        // Unknown users verify the dummy hash: same work, same answer, same time.
        let ok = self
            .hasher
            .verify(password, row.as_ref().map(|r| r.3.as_str()))
            .await;
        let masked = parsed
            .as_ref()
            .map(Email::masked)
            .unwrap_or_else(|| "invalid".into());
        let user_agent: String = device.user_agent.chars().take(256).collect();
        let Some(row) = row.filter(|_| ok) else {
            if let Some(k) = throttle_key {
                self.record_failure(k);
            }
            self.audit(ctx, "auth.login_failed", &masked, serde_json::json!({
                "email": masked, "ip": device.ip, "user_agent": user_agent, "reason": "invalid_credentials",
            }))
            .await;
            return Err(Problem::new(ErrorCode::InvalidCredentials).into());
        };
        if let Some(k) = &throttle_key {
            self.failures.lock().expect("poisoned").remove(k);
        }
        let user = user_of(&row);
        if user.status == "banned" {
            self.audit(
                ctx,
                "auth.login_failed",
                &user.id,
                serde_json::json!({
                    "user_id": user.id, "ip": device.ip, "reason": "account_banned",
                }),
            )
            .await;
            return Err(Problem::new(ErrorCode::AccountBanned).into());
        }
        let tokens = self
            .start_session(&user.id, &user.role, device, Some(ctx))
            .await?;
        // A ban that committed while this login ran: its session sweep may have
        // missed ours, so look again and end it ourselves.
        let status = self.user_by_id(&user.id).await?.map(|r| r.5);
        if status.as_deref() != Some("active") {
            self.revoke_session(&tokens.session_id, "banned").await?;
            return Err(Problem::new(ErrorCode::AccountBanned).into());
        }
        Ok((user, tokens))
    }

    pub async fn refresh(
        &self,
        ctx: &RequestContext,
        refresh_token: &str,
    ) -> Result<TokenPair, ApiError> {
        let now = now_secs();
        let new = random_token(32);
        match self
            .sessions
            .rotate(&hash_token(refresh_token), &hash_token(&new), now)
            .await?
        {
            Rotation::Unknown => Err(Problem::new(ErrorCode::TokenInvalid).into()),
            Rotation::Reused { session_id } => {
                // A spent token came back: someone holds a copy. End the whole family.
                self.revoke_session(&session_id, "refresh_token_reused")
                    .await?;
                let user = self
                    .sessions
                    .get(&session_id)
                    .await?
                    .map(|s| s.user_id)
                    .unwrap_or_default();
                self.audit(
                    ctx,
                    "auth.refresh_token_reused",
                    &user,
                    serde_json::json!({
                        "user_id": user, "session_id": session_id,
                    }),
                )
                .await;
                Err(Problem::new(ErrorCode::RefreshTokenReused).into())
            }
            Rotation::Rotated { session_id } => {
                let session = self.sessions.get(&session_id).await?;
                let Some(session) = session.filter(|s| s.is_active(now)) else {
                    return Err(Problem::new(ErrorCode::TokenInvalid).into());
                };
                let row = self.user_by_id(&session.user_id).await?;
                let Some(user) = row.as_ref().map(user_of).filter(|u| u.status == "active") else {
                    return Err(Problem::new(ErrorCode::TokenInvalid).into());
                };
                self.sessions.touch(&session_id, now).await?;
                Ok(self.tokens_for(&user.id, &user.role, &session_id, new, now))
            }
        }
    }

    async fn revoke_session(&self, sid: &str, reason: &str) -> Result<bool, StoreError> {
        use std::sync::atomic::Ordering;
        let revoked = self.sessions.revoke(sid, reason, now_secs()).await;
        // After the write: any read that cached the session before it is undone
        // here, and any read still in flight sees the counter move.
        self.revocations.fetch_add(1, Ordering::SeqCst);
        self.active.lock().expect("poisoned").remove(sid);
        revoked
    }

    async fn revoke_all(
        &self,
        user_id: &str,
        keep: Option<&str>,
        reason: &str,
    ) -> Result<usize, StoreError> {
        let ids = self
            .sessions
            .revoke_all(user_id, keep, reason, now_secs())
            .await?;
        self.revocations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut active = self.active.lock().expect("poisoned");
        for id in &ids {
            active.remove(id);
        }
        Ok(ids.len())
    }

    /// Verifies an access token and that its session is still active.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, ApiError> {
        let now = now_secs();
        let seen = self.verified.lock().expect("poisoned").get(token).cloned();
        let claims = match seen {
            // The verifier's leeway applies to cached claims too.
            Some(c) if c.exp + 5 > now => c,
            _ => {
                let c = self
                    .keys
                    .read()
                    .expect("poisoned")
                    .verify(token)
                    .map_err(|e| {
                        tracing::debug!(error = %e, "token refused");
                        ApiError::from(Problem::new(ErrorCode::TokenInvalid))
                    })?;
                let mut v = self.verified.lock().expect("poisoned");
                if v.len() >= 100_000 {
                    v.retain(|_, c| c.exp + 5 > now);
                    if v.len() >= 100_000 {
                        v.clear();
                    }
                }
                v.insert(token.to_owned(), c.clone());
                c
            }
        };
        // A shared store is read on every request: a logout on another node
        // must take effect here at once, not after ACTIVE_CACHE_TTL.
        let shared = self.sessions.shared();
        let cached = !shared
            && self
                .active
                .lock()
                .expect("poisoned")
                .get(&claims.sid)
                .is_some_and(|(exp, at)| *exp > now && at.elapsed() < ACTIVE_CACHE_TTL);
        if !cached {
            use std::sync::atomic::Ordering;
            let generation = self.revocations.load(Ordering::SeqCst);
            let session = self.sessions.get(&claims.sid).await?;
            let Some(s) = session.filter(|s| s.is_active(now) && s.user_id == claims.sub) else {
                return Err(Problem::new(ErrorCode::TokenInvalid).into());
            };
            if !shared {
                let mut active = self.active.lock().expect("poisoned");
                // A revocation since our read may be of this very session: answer
                // from the read, but do not remember it.
                if self.revocations.load(Ordering::SeqCst) == generation {
                    if active.len() > 100_000 {
                        active.clear();
                    }
                    active.insert(claims.sid.clone(), (s.expires_at, Instant::now()));
                }
            }
        }
        Ok(Principal {
            user_id: claims.sub,
            session_id: claims.sid,
            roles: claims.roles,
        })
    }

    pub async fn logout(&self, p: &Principal) -> Result<(), ApiError> {
        self.revoke_session(&p.session_id, "logout").await?;
        Ok(())
    }

    pub async fn logout_all(&self, p: &Principal) -> Result<usize, ApiError> {
        Ok(self.revoke_all(&p.user_id, None, "logout_all").await?)
    }

    pub async fn sessions(&self, p: &Principal) -> Result<Vec<Session>, ApiError> {
        Ok(self.sessions.list(&p.user_id, now_secs()).await?)
    }

    /// Ends one of the caller's sessions (another user's is "not found").
    pub async fn end_session(&self, p: &Principal, id: &str) -> Result<(), ApiError> {
        match self.sessions.get(id).await? {
            Some(s) if s.user_id == p.user_id && s.revoked_at.is_none() => {
                self.revoke_session(id, "ended_by_user").await?;
                Ok(())
            }
            _ => Err(Problem::new(ErrorCode::NotFound)
                .with_detail("no such session")
                .into()),
        }
    }

    pub async fn me(&self, p: &Principal) -> Result<User, ApiError> {
        let row = self.user_by_id(&p.user_id).await?;
        row.as_ref()
            .map(user_of)
            .ok_or_else(|| Problem::new(ErrorCode::TokenInvalid).into())
    }

    pub async fn update_me(
        &self,
        ctx: &RequestContext,
        p: &Principal,
        name: &str,
    ) -> Result<User, ApiError> {
        let name = display_name(name)?;
        let event = EventDraft::new(
            USER_TOPIC,
            "user.updated",
            &p.user_id,
            serde_json::json!({ "user_id": p.user_id, "changed": ["display_name"], "display_name": name }),
        );
        self.set_user(ctx, &p.user_id, UserColumn::DisplayName, &name, vec![event])
            .await?;
        self.me(p).await
    }

    /// Changes the password and ends every other session of the user.
    pub async fn change_password(
        &self,
        ctx: &RequestContext,
        p: &Principal,
        current: &str,
        new: &str,
    ) -> Result<usize, ApiError> {
        let row = self
            .user_by_id(&p.user_id)
            .await?
            .ok_or_else(|| ApiError::from(Problem::new(ErrorCode::TokenInvalid)))?;
        if !self.hasher.verify(current, Some(&row.3)).await {
            return Err(Problem::new(ErrorCode::InvalidCredentials)
                .with_detail("current password is incorrect")
                .into());
        }
        let new =
            Password::parse(new).map_err(|e| problem(ErrorCode::WeakPassword, e.to_string()))?;
        let hash = self
            .hasher
            .hash(&new)
            .await
            .map_err(|_| ApiError::from(Problem::new(ErrorCode::Internal)))?;
        let event = EventDraft::new(
            AUDIT_TOPIC,
            "auth.password_changed",
            &p.user_id,
            serde_json::json!({ "user_id": p.user_id, "session_id": p.session_id }),
        );
        self.set_user(
            ctx,
            &p.user_id,
            UserColumn::PasswordHash,
            &hash,
            vec![event],
        )
        .await?;
        Ok(self
            .revoke_all(&p.user_id, Some(&p.session_id), "password_changed")
            .await?)
    }

    /// Sets one column of a user and records `events`, in one transaction.
    /// False if there is no such user (nothing is written then).
    async fn set_user(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        column: UserColumn,
        value: &str,
        events: Vec<EventDraft>,
    ) -> Result<bool, StoreError> {
        let sql = match column {
            UserColumn::DisplayName => {
                "UPDATE users SET display_name = $2, updated_at = $3 WHERE id = $1"
            }
            UserColumn::PasswordHash => {
                "UPDATE users SET password_hash = $2, updated_at = $3 WHERE id = $1"
            }
            UserColumn::Status => "UPDATE users SET status = $2, updated_at = $3 WHERE id = $1",
        };
        let mut tx = self.db.begin().await?;
        let n = flowline_store::on_tx!(&mut tx, |c| sqlx::query(sql)
            .bind(user_id)
            .bind(value)
            .bind(Timestamp::now().as_micros())
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        if n == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        for e in events {
            self.emit(&mut tx, ctx, e).await?;
        }
        tx.commit().await?;
        self.relay.notify();
        Ok(true)
    }

    /// Bans a user: status, every session ended, `user.banned` emitted.
    pub async fn ban(
        &self,
        ctx: &RequestContext,
        admin: &Principal,
        user_id: &str,
    ) -> Result<User, ApiError> {
        let events = vec![
            EventDraft::new(
                USER_TOPIC,
                "user.banned",
                user_id,
                serde_json::json!({ "user_id": user_id, "banned_by": admin.user_id }),
            ),
            EventDraft::new(
                AUDIT_TOPIC,
                "admin.user_banned",
                user_id,
                serde_json::json!({ "user_id": user_id, "admin_id": admin.user_id }),
            ),
        ];
        if !self
            .set_user(ctx, user_id, UserColumn::Status, "banned", events)
            .await?
        {
            return Err(Problem::new(ErrorCode::NotFound)
                .with_detail("no such user")
                .into());
        }
        let ended = self.revoke_all(user_id, None, "banned").await?;
        tracing::info!(user_id, sessions_ended = ended, "user banned");
        let row = self.user_by_id(user_id).await?;
        row.as_ref()
            .map(user_of)
            .ok_or_else(|| Problem::new(ErrorCode::NotFound).into())
    }
}

async fn load_keys(db: &Db) -> Result<Vec<SigningKey>, StoreError> {
    let rows: Vec<(String, String)> = flowline_store::on_pool!(db, |p| sqlx::query_as(
        "SELECT kid, pkcs8 FROM signing_keys ORDER BY created_at, kid"
    )
    .fetch_all(p)
    .await)?;
    rows.into_iter()
        .map(|(kid, der)| {
            let der = STANDARD
                .decode(der)
                .map_err(|_| StoreError::CorruptEvent(format!("signing key {kid}")))?;
            SigningKey::from_pkcs8(kid.clone(), &der)
                .map_err(|_| StoreError::CorruptEvent(format!("signing key {kid}")))
        })
        .collect()
}

async fn insert_key(db: &Db) -> Result<SigningKey, StoreError> {
    let key = SigningKey::generate();
    flowline_store::on_pool!(write db, |p| sqlx::query(
        "INSERT INTO signing_keys (kid, pkcs8, created_at) VALUES ($1, $2, $3)"
    )
    .bind(&key.kid)
    .bind(STANDARD.encode(key.pkcs8_der()))
    .bind(Timestamp::now().as_micros())
    .execute(p)
    .await
    .map(|_| ()))?;
    Ok(key)
}
