//! Who is typing in a channel right now. Each indication lives
//! `messaging.typing_ttl`. One node keeps the board in memory; in distributed
//! mode it is a Redis sorted set per channel (`typing:{channel}`: member = user,
//! score = expiry in ms of Redis's clock), so every instance answers alike and
//! an entry vanishes on its own, even if the node that wrote it dies.

use flowline_store::StoreError;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

pub(crate) enum Board {
    Memory(Mutex<HashMap<String, HashMap<String, i64>>>),
    Redis {
        conn: redis::aio::ConnectionManager,
        prefix: String,
    },
}

/// ARGV: user, ttl ms. Drops expired members, adds this one, keeps the key
/// no longer than its newest entry.
const MARK: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
";

const WHO: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
";

fn redis_err(e: redis::RedisError) -> StoreError {
    StoreError::Unreachable {
        target: "redis".into(),
        reason: e.to_string(),
    }
}

fn now_ms() -> i64 {
    flowline_core::Timestamp::now().as_micros() / 1000
}

impl Board {
    /// `user` is typing in `channel` for `ttl`.
    pub(crate) async fn mark(
        &self,
        channel: &str,
        user: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let ttl_ms = ttl.as_millis().max(1) as i64;
        match self {
            Board::Memory(m) => {
                let now = now_ms();
                let mut m = m.lock().expect("poisoned");
                // Bounded: expired entries and empty channels go on every write.
                m.retain(|_, users| {
                    users.retain(|_, exp| *exp > now);
                    !users.is_empty()
                });
                m.entry(channel.to_owned())
                    .or_default()
                    .insert(user.to_owned(), now + ttl_ms);
                Ok(())
            }
            Board::Redis { conn, prefix } => {
                let mut c = conn.clone();
                redis::Script::new(MARK)
                    .key(format!("{prefix}typing:{channel}"))
                    .arg(user)
                    .arg(ttl_ms)
                    .invoke_async::<()>(&mut c)
                    .await
                    .map_err(redis_err)
            }
        }
    }

    /// (user, expiry in ms since the epoch) of everyone typing in `channel`.
    pub(crate) async fn who(&self, channel: &str) -> Result<Vec<(String, i64)>, StoreError> {
        let mut out: Vec<(String, i64)> = match self {
            Board::Memory(m) => {
                let now = now_ms();
                let m = m.lock().expect("poisoned");
                m.get(channel)
                    .map(|users| {
                        users
                            .iter()
                            .filter(|(_, exp)| **exp > now)
                            .map(|(u, exp)| (u.clone(), *exp))
                            .collect()
                    })
                    .unwrap_or_default()
            }
            Board::Redis { conn, prefix } => {
                let mut c = conn.clone();
                let flat: Vec<(String, f64)> = redis::Script::new(WHO)
                    .key(format!("{prefix}typing:{channel}"))
                    .invoke_async(&mut c)
                    .await
                    .map_err(redis_err)?;
                flat.into_iter().map(|(u, exp)| (u, exp as i64)).collect()
            }
        };
        out.sort();
        Ok(out)
    }
}
