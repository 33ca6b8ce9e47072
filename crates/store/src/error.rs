use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot reach the database at {target}: {reason}")]
    Unreachable { target: String, reason: String },
    #[error(
        "{path}: not a valid SQLite database (corrupt, or not a flowline data file): {reason}"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error("unsupported database url `{0}` (expected sqlite://DIR or postgres://…)")]
    BadUrl(String),
    #[error("migration {scope}/{version} `{name}` failed: {source}")]
    Migration {
        scope: String,
        version: i64,
        name: String,
        source: sqlx::Error,
    },
    #[error("stored event {0} is not valid JSON")]
    CorruptEvent(String),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown consumer group `{0}`")]
    UnknownGroup(String),
    #[error("no dead letter {0}")]
    UnknownDeadLetter(i64),
    #[error("event bus: {0}")]
    Bus(String),
}
