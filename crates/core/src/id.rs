//! Identifiers. Every id flowline mints is a UUIDv7: time-ordered, so ids sort
//! roughly by creation and index well in B-trees.

use uuid::Uuid;

/// A fresh UUIDv7.
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

/// A fresh correlation id (UUIDv7, simple form without dashes, as W3C trace ids are).
pub fn new_correlation_id() -> String {
    Uuid::now_v7().simple().to_string()
}
