//! Argon2id with OWASP's parameters (m = 19456 KiB, t = 2, p = 1).
//!
//! Hashing is CPU-bound and holds ~19 MiB per call, so it runs on a fixed pool
//! of `max_concurrent` dedicated threads: at most that many hashes at once,
//! whatever the request rate, and each thread keeps reusing its own memory
//! (tokio's general blocking pool hands jobs to whichever thread is free, which
//! measured ~20% slower per hash). Unknown users are verified against a dummy
//! hash so a login takes the same time whether or not the account exists.

use crate::credentials::Password;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use std::sync::Arc;
use tokio::sync::Semaphore;

pub const M_COST_KIB: u32 = 19_456;
pub const T_COST: u32 = 2;
pub const P_COST: u32 = 1;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Clone)]
pub struct PasswordHasher {
    /// Bounds the queue: callers wait here, not in an unbounded channel.
    permits: Arc<Semaphore>,
    jobs: std::sync::mpsc::SyncSender<Job>,
    /// Verified against when the user does not exist (same cost, always false).
    dummy: Arc<str>,
}

fn argon() -> Argon2<'static> {
    let params = Params::new(M_COST_KIB, T_COST, P_COST, None).expect("valid Argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("hashing pool closed")]
    Closed,
}

impl PasswordHasher {
    pub fn new(max_concurrent: usize) -> PasswordHasher {
        let salt = SaltString::generate(&mut OsRng);
        let dummy = argon()
            .hash_password(b"flowline-dummy-password", &salt)
            .expect("hashing a constant cannot fail")
            .to_string();
        let threads = max_concurrent.max(1);
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(threads * 16);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return, // every hasher dropped
                    }
                })
                .expect("spawn hashing thread");
        }
        PasswordHasher {
            permits: Arc::new(Semaphore::new(threads * 16)),
            jobs,
            dummy: dummy.into(),
        }
    }

    /// Runs `f` on a hashing thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| HashError::Closed)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| HashError::Closed)?;
        rx.await.map_err(|_| HashError::Closed)
    }

    /// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
    pub async fn hash(&self, password: &Password) -> Result<String, HashError> {
        let pw = password.expose().to_owned();
        self.run(move || {
            let salt = SaltString::generate(&mut OsRng);
            argon()
                .hash_password(pw.as_bytes(), &salt)
                .map(|h| h.to_string())
        })
        .await?
        .map_err(|e| HashError::Hash(e.to_string()))
    }

    /// True only if `stored` is present and matches. With `stored = None` the
    /// dummy hash is verified, so the caller cannot tell the cases apart by time.
    pub async fn verify(&self, password: &str, stored: Option<&str>) -> bool {
        let known = stored.is_some();
        let phc = stored
            .map(str::to_owned)
            .unwrap_or_else(|| self.dummy.to_string());
        let pw = password.to_owned();
        let ok = self
            .run(move || Self::verify_blocking(&phc, &pw))
            .await
            .unwrap_or(false);
        ok && known
    }

    /// Verifies synchronously on this thread (benchmarks: the raw rate).
    pub fn verify_blocking(phc: &str, password: &str) -> bool {
        PasswordHash::new(phc)
            .is_ok_and(|h| argon().verify_password(password.as_bytes(), &h).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hashes_verify_and_unknown_users_cost_the_same() {
        let h = PasswordHasher::new(2);
        let pw = Password::parse("correct horse battery").unwrap();
        let phc = h.hash(&pw).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert_ne!(phc, h.hash(&pw).await.unwrap(), "salted");
        assert!(h.verify("correct horse battery", Some(&phc)).await);
        assert!(!h.verify("correct horse batterz", Some(&phc)).await);
        assert!(
            !h.verify("correct horse battery", Some("not a phc string"))
                .await
        );

        // Unknown user: false, after doing the same work as a real verify. The
        // fastest of several runs is compared, so a busy machine cannot skew it.
        let mut unknown = std::time::Duration::MAX;
        let mut known = std::time::Duration::MAX;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            assert!(!h.verify("correct horse battery", None).await);
            unknown = unknown.min(t.elapsed());
            let t = std::time::Instant::now();
            assert!(!h.verify("wrong password here", Some(&phc)).await);
            known = known.min(t.elapsed());
        }
        let ratio = unknown.as_secs_f64() / known.as_secs_f64();
        assert!(
            (0.4..2.5).contains(&ratio),
            "unknown {unknown:?} vs known {known:?}"
        );
    }
}
