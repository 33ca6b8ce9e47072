//! The gateway's response cache for GET routes that declare it.
//!
//! A route opts in with a [`CachePolicy`]: a TTL, whether the response is
//! personal (keyed per user), and the tag it belongs to. Entries are dropped by
//! tag when an event says the underlying data changed (`invalidate_tag`), and
//! expire by TTL otherwise. Only 200 responses are stored.

use crate::Principal;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct CachePolicy {
    pub ttl: Duration,
    /// Keyed per caller; tagged `user:{id}` so a user's events drop it.
    pub per_user: bool,
    /// Whether the query string selects a different response. When it does
    /// not, it stays out of the key (callers cannot mint entries with it).
    pub vary_query: bool,
}

struct Entry {
    body: Bytes,
    content_type: Option<HeaderValue>,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    tags: HashMap<String, HashSet<String>>,
}

/// Bounded in-process response cache with tag invalidation.
pub struct ResponseCache {
    inner: Mutex<Inner>,
    max_entries: usize,
    pub hits: Counter,
    pub misses: Counter,
    pub invalidations: Counter,
}

impl ResponseCache {
    pub fn new(max_entries: usize) -> ResponseCache {
        ResponseCache {
            inner: Mutex::default(),
            max_entries,
            hits: Counter::default(),
            misses: Counter::default(),
            invalidations: Counter::default(),
        }
    }

    fn get(&self, key: &str) -> Option<(Bytes, Option<HeaderValue>)> {
        let mut inner = self.inner.lock().expect("poisoned");
        match inner.entries.get(key) {
            Some(e) if e.expires > Instant::now() => Some((e.body.clone(), e.content_type.clone())),
            Some(_) => {
                inner.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&self, key: String, tag: Option<String>, entry: Entry) {
        let mut inner = self.inner.lock().expect("poisoned");
        if inner.entries.len() >= self.max_entries {
            let now = Instant::now();
            inner.entries.retain(|_, e| e.expires > now);
            if inner.entries.len() >= self.max_entries {
                inner.entries.clear();
            }
            let Inner { entries, tags } = &mut *inner;
            tags.retain(|_, keys| {
                keys.retain(|k| entries.contains_key(k));
                !keys.is_empty()
            });
        }
        if let Some(tag) = tag {
            inner.tags.entry(tag).or_default().insert(key.clone());
        }
        inner.entries.insert(key, entry);
    }

    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "flowline_response_cache_hits",
            "Gateway response cache hits",
            self.hits.clone(),
        );
        registry.register(
            "flowline_response_cache_misses",
            "Gateway response cache misses",
            self.misses.clone(),
        );
        registry.register(
            "flowline_response_cache_invalidations",
            "Gateway response cache entries dropped by events",
            self.invalidations.clone(),
        );
    }

    /// Drops every entry under `tag`. Returns how many.
    pub fn invalidate_tag(&self, tag: &str) -> usize {
        let mut inner = self.inner.lock().expect("poisoned");
        let keys = inner.tags.remove(tag).unwrap_or_default();
        let n = keys
            .iter()
            .filter(|k| inner.entries.remove(*k).is_some())
            .count();
        self.invalidations.inc_by(n as u64);
        n
    }
}

/// Middleware: serve from the cache or store a fresh 200. Runs after
/// authentication (it needs the principal for personal responses).
pub async fn cached(
    State((cache, policy)): State<(Arc<ResponseCache>, CachePolicy)>,
    req: Request,
    next: Next,
) -> Response {
    if req.method() != axum::http::Method::GET {
        return next.run(req).await;
    }
    let principal = req
        .extensions()
        .get::<Principal>()
        .map(|p| p.user_id.clone());
    if policy.per_user && principal.is_none() {
        return next.run(req).await;
    }
    let user = if policy.per_user {
        principal.clone().unwrap_or_default()
    } else {
        String::new()
    };
    let key = format!(
        "{}|{}|{}",
        req.uri().path(),
        req.uri().query().unwrap_or(""),
        user
    );
    if let Some((body, ct)) = cache.get(&key) {
        cache.hits.inc();
        let mut res = (StatusCode::OK, body).into_response();
        if let Some(ct) = ct {
            res.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        res.headers_mut()
            .insert("x-cache", HeaderValue::from_static("hit"));
        return res;
    }
    cache.misses.inc();
    let res = next.run(req).await;
    if res.status() != StatusCode::OK {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "").into_response();
    };
    let tag = policy.per_user.then(|| format!("user:{user}"));
    cache.put(
        key,
        tag,
        Entry {
            body: bytes.clone(),
            content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
            expires: Instant::now() + policy.ttl,
        },
    );
    parts
        .headers
        .insert("x-cache", HeaderValue::from_static("miss"));
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_drop_their_entries_and_ttl_expires() {
        let c = ResponseCache::new(10);
        let e = |ms| Entry {
            body: Bytes::from_static(b"x"),
            content_type: None,
            expires: Instant::now() + Duration::from_millis(ms),
        };
        c.put("a".into(), Some("user:1".into()), e(60_000));
        c.put("b".into(), Some("user:2".into()), e(60_000));
        c.put("old".into(), None, e(0));
        assert!(c.get("a").is_some());
        assert!(c.get("old").is_none(), "expired");
        assert_eq!(c.invalidate_tag("user:1"), 1);
        assert!(c.get("a").is_none());
        assert!(c.get("b").is_some());
        for i in 0..20 {
            c.put(format!("k{i}"), None, e(60_000));
        }
        assert!(c.inner.lock().unwrap().entries.len() <= 10, "bounded");
    }
}
