//! The hash chain and its verification.
//!
//! Each record's hash covers its own fields and the previous record's hash,
//! so changing, removing or slipping in a record changes every hash after
//! it; [`verify`] recomputes the chain and says where it stops holding. What
//! a hash chain cannot show on its own is a rewrite of the whole tail from
//! some record on (with every later hash recomputed): compare the head
//! (`GET /admin/audit/verify` reports it) with a copy kept elsewhere for that.

use flowline_store::{on_pool, Db, StoreError};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

/// The `prev_hash` of record 1.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Records verification reads per query.
const PAGE: i64 = 500;

/// Findings [`verify`] reports at most: a bulk edit breaks every record it
/// touched, and one response must not carry a finding per row of the table.
pub const MAX_FINDINGS: usize = 1000;

/// What a record's hash covers, as stored.
///
/// The hash is the lowercase hex SHA-256 of this encoding, in this order:
///
/// ```text
/// "flowline-audit-v1"  (as a string, below: names the encoding)
/// seq                  i64
/// prev_hash            string
/// event_id             string
/// occurred_at          i64 (µs since the epoch)
/// recorded_at          i64 (µs since the epoch)
/// category             string
/// action               string
/// actor                optional string
/// subject              optional string
/// ip                   optional string
/// outcome              string
/// correlation_id       string
/// details              string (the stored JSON text, byte for byte)
///
/// i64:             8 bytes, big-endian two's complement
/// string:          0x01, its UTF-8 length as 8 bytes big-endian, its bytes
/// optional string: 0x00 when absent, else as a string
/// ```
///
/// Every field has a fixed width or a length prefix, so no two different
/// records encode to the same bytes (`"ab" + "c"` ≠ `"a" + "bc"`, absent ≠ empty).
#[derive(Debug, Clone, Copy)]
pub struct ChainFields<'a> {
    pub seq: i64,
    pub prev_hash: &'a str,
    pub event_id: &'a str,
    pub occurred_at: i64,
    pub recorded_at: i64,
    pub category: &'a str,
    pub action: &'a str,
    pub actor: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub outcome: &'a str,
    pub correlation_id: &'a str,
    pub details: &'a str,
}

impl ChainFields<'_> {
    /// The record's hash (64 lowercase hex digits).
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        let int = |h: &mut Sha256, v: i64| h.update(v.to_be_bytes());
        let text = |h: &mut Sha256, s: &str| {
            h.update([1u8]);
            h.update((s.len() as u64).to_be_bytes());
            h.update(s.as_bytes());
        };
        let opt = |h: &mut Sha256, s: Option<&str>| match s {
            None => h.update([0u8]),
            Some(s) => text(h, s),
        };
        text(&mut h, "flowline-audit-v1");
        int(&mut h, self.seq);
        text(&mut h, self.prev_hash);
        text(&mut h, self.event_id);
        int(&mut h, self.occurred_at);
        int(&mut h, self.recorded_at);
        text(&mut h, self.category);
        text(&mut h, self.action);
        opt(&mut h, self.actor);
        opt(&mut h, self.subject);
        opt(&mut h, self.ip);
        text(&mut h, self.outcome);
        text(&mut h, self.correlation_id);
        text(&mut h, self.details);
        format!("{:x}", h.finalize())
    }
}

/// What verification found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// The record's stored hash is not the hash of its fields: it was changed.
    Edited,
    /// Sequence numbers are missing before this one: records were deleted.
    Deleted,
    /// The record's `prev_hash` is not the stored hash of the record before
    /// it: that record was rewritten with a recomputed hash, or this one was
    /// inserted or moved.
    BrokenLink,
    /// The last record does not match the head row: records were removed
    /// from (or added to) the end without going through the chain.
    HeadMismatch,
}

/// One place where the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Finding {
    /// The record concerned (for `deleted`, the first missing one).
    pub seq: i64,
    pub kind: FindingKind,
    pub detail: String,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct VerifyReport {
    /// True when the chain holds (no findings, listed or not).
    pub ok: bool,
    /// Records read.
    pub records: u64,
    /// The head row's sequence number (0: nothing appended yet).
    pub head_seq: i64,
    /// The head row's hash: keep a copy elsewhere to detect a rewritten tail.
    pub head_hash: String,
    /// In chain order; empty when the chain holds. At most the limit
    /// ([`MAX_FINDINGS`] for [`verify`]): the first ones found.
    pub findings: Vec<Finding>,
    /// More findings existed than are listed (the walk still read and
    /// counted every record).
    pub truncated: bool,
}

impl VerifyReport {
    /// True when the chain holds: nothing was found, listed or not.
    pub fn is_ok(&self) -> bool {
        self.findings.is_empty() && !self.truncated
    }
}

/// Findings up to a limit; past it, only the fact that there were more.
struct Findings {
    list: Vec<Finding>,
    max: usize,
    truncated: bool,
}

impl Findings {
    fn push(&mut self, f: Finding) {
        if self.list.len() < self.max {
            self.list.push(f);
        } else {
            self.truncated = true;
        }
    }
}

/// A stored record's chain columns.
struct Stored {
    seq: i64,
    event_id: String,
    occurred_at: i64,
    recorded_at: i64,
    category: String,
    action: String,
    actor: Option<String>,
    subject: Option<String>,
    ip: Option<String>,
    outcome: String,
    correlation_id: String,
    details: String,
    prev_hash: String,
    hash: String,
}

impl Stored {
    fn fields(&self) -> ChainFields<'_> {
        ChainFields {
            seq: self.seq,
            prev_hash: &self.prev_hash,
            event_id: &self.event_id,
            occurred_at: self.occurred_at,
            recorded_at: self.recorded_at,
            category: &self.category,
            action: &self.action,
            actor: self.actor.as_deref(),
            subject: self.subject.as_deref(),
            ip: self.ip.as_deref(),
            outcome: &self.outcome,
            correlation_id: &self.correlation_id,
            details: &self.details,
        }
    }
}

macro_rules! stored_row {
    ($r:expr) => {{
        let r = $r;
        Stored {
            seq: r.try_get("seq")?,
            event_id: r.try_get("event_id")?,
            occurred_at: r.try_get("occurred_at")?,
            recorded_at: r.try_get("recorded_at")?,
            category: r.try_get("category")?,
            action: r.try_get("action")?,
            actor: r.try_get("actor")?,
            subject: r.try_get("subject")?,
            ip: r.try_get("ip")?,
            outcome: r.try_get("outcome")?,
            correlation_id: r.try_get("correlation_id")?,
            details: r.try_get("details")?,
            prev_hash: r.try_get("prev_hash")?,
            hash: r.try_get("hash")?,
        }
    }};
}

/// Walks the chain in sequence order, a page at a time, recomputing every
/// hash, and reports each record that was edited, deleted, inserted or
/// moved, and a head that does not match the last record.
///
/// Records appended while it runs (past the head it read first) are left to
/// the next run. Lists at most [`MAX_FINDINGS`] findings (see
/// [`verify_with_limit`]).
pub async fn verify(db: &Db) -> Result<VerifyReport, StoreError> {
    verify_with_limit(db, MAX_FINDINGS).await
}

/// [`verify`], listing at most `max_findings` findings (the first in chain
/// order) and setting `truncated` when there were more. Every record is
/// still read, checked and counted in `records`.
pub async fn verify_with_limit(db: &Db, max_findings: usize) -> Result<VerifyReport, StoreError> {
    let mut findings = Findings {
        list: Vec::new(),
        max: max_findings,
        truncated: false,
    };
    let head: Option<(i64, String)> = on_pool!(db, |p| sqlx::query_as(
        "SELECT seq, hash FROM audit_head WHERE id = 1"
    )
    .fetch_optional(p)
    .await)?;
    if head.is_none() {
        findings.push(Finding {
            seq: 0,
            kind: FindingKind::HeadMismatch,
            detail: "the head row is missing".into(),
        });
    }
    let bound = head.as_ref().map_or(i64::MAX, |h| h.0);
    let mut records = 0u64;
    let mut prev_seq = 0i64;
    let mut prev_hash = GENESIS_HASH.to_owned();
    loop {
        let page: Vec<Stored> = on_pool!(db, |p| {
            let rows = sqlx::query(
                "SELECT seq, event_id, occurred_at, recorded_at, category, action, actor, subject,
                        ip, outcome, correlation_id, details, prev_hash, hash
                 FROM audit_records WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
            )
            .bind(prev_seq)
            .bind(bound)
            .bind(PAGE)
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| Ok(stored_row!(r)))
                .collect::<Result<Vec<_>, StoreError>>()
        })?;
        let full = page.len() as i64 == PAGE;
        for r in page {
            records += 1;
            if r.seq != prev_seq + 1 {
                let (first, last) = (prev_seq + 1, r.seq - 1);
                let which = if first == last {
                    format!("record {first} is missing")
                } else {
                    format!("records {first} to {last} are missing")
                };
                findings.push(Finding {
                    seq: first,
                    kind: FindingKind::Deleted,
                    detail: format!("{which}: the chain jumps from {prev_seq} to {}", r.seq),
                });
            } else if r.prev_hash != prev_hash {
                findings.push(Finding {
                    seq: r.seq,
                    kind: FindingKind::BrokenLink,
                    detail: format!(
                        "prev_hash {} is not the hash of record {prev_seq} ({prev_hash})",
                        r.prev_hash
                    ),
                });
            }
            let computed = r.fields().hash();
            if computed != r.hash {
                findings.push(Finding {
                    seq: r.seq,
                    kind: FindingKind::Edited,
                    detail: format!(
                        "stored hash {} but the record's fields hash to {computed}",
                        r.hash
                    ),
                });
            }
            prev_seq = r.seq;
            prev_hash = r.hash;
        }
        if !full {
            break;
        }
    }
    if let Some((head_seq, head_hash)) = &head {
        if prev_seq < *head_seq {
            let which = if prev_seq + 1 == *head_seq {
                format!("record {head_seq} is missing")
            } else {
                format!("records {} to {head_seq} are missing", prev_seq + 1)
            };
            findings.push(Finding {
                seq: *head_seq,
                kind: FindingKind::HeadMismatch,
                detail: format!(
                    "the head is at {head_seq} but the last record is {prev_seq}: {which}"
                ),
            });
        } else if prev_hash != *head_hash {
            findings.push(Finding {
                seq: *head_seq,
                kind: FindingKind::HeadMismatch,
                detail: format!(
                    "the head's hash {head_hash} is not record {head_seq}'s hash {prev_hash}"
                ),
            });
        }
    }
    // One statement, so both numbers come from one snapshot: an append in
    // flight moves both or neither.
    let (max_seq, head_now): (Option<i64>, Option<i64>) = on_pool!(db, |p| {
        sqlx::query_as(
        "SELECT (SELECT max(seq) FROM audit_records), (SELECT seq FROM audit_head WHERE id = 1)"
    )
    .fetch_one(p)
    .await
    })?;
    if let (Some(max), Some(h)) = (max_seq, head_now) {
        if max > h {
            findings.push(Finding {
                seq: h + 1,
                kind: FindingKind::HeadMismatch,
                detail: format!(
                    "records {} to {max} lie beyond the head ({h}): added outside the chain",
                    h + 1
                ),
            });
        }
    }
    let (head_seq, head_hash) = head.unwrap_or((0, String::new()));
    let Findings {
        list, truncated, ..
    } = findings;
    Ok(VerifyReport {
        ok: list.is_empty() && !truncated,
        records,
        head_seq,
        head_hash,
        findings: list,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ChainFields<'static> {
        ChainFields {
            seq: 1,
            prev_hash: GENESIS_HASH,
            event_id: "e1",
            occurred_at: 10,
            recorded_at: 11,
            category: "authentication",
            action: "auth.login_failed",
            actor: Some("ab"),
            subject: Some("c"),
            ip: None,
            outcome: "failure",
            correlation_id: "c1",
            details: "{}",
        }
    }

    #[test]
    fn the_encoding_is_unambiguous_and_covers_every_field() {
        let b = base();
        let h = b.hash();
        assert_eq!(h.len(), 64);
        assert!(h
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(h, base().hash(), "deterministic");
        let shifted = ChainFields {
            actor: Some("a"),
            subject: Some("bc"),
            ..b
        };
        assert_ne!(shifted.hash(), h, "field boundaries are part of the hash");
        assert_ne!(
            ChainFields { ip: Some(""), ..b }.hash(),
            h,
            "absent ≠ empty"
        );
        let variants = [
            ChainFields { seq: 2, ..b },
            ChainFields {
                prev_hash: "x",
                ..b
            },
            ChainFields {
                event_id: "e2",
                ..b
            },
            ChainFields {
                occurred_at: 9,
                ..b
            },
            ChainFields {
                recorded_at: 12,
                ..b
            },
            ChainFields {
                category: "admin",
                ..b
            },
            ChainFields {
                action: "auth.login_succeeded",
                ..b
            },
            ChainFields { actor: None, ..b },
            ChainFields { subject: None, ..b },
            ChainFields {
                outcome: "success",
                ..b
            },
            ChainFields {
                correlation_id: "c2",
                ..b
            },
            ChainFields {
                details: "{ }",
                ..b
            },
        ];
        for v in variants {
            assert_ne!(v.hash(), h, "{v:?}");
        }
    }
}
