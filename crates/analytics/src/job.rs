//! Job definitions and the pure half of the engine: which windows an element
//! belongs to and when a window is final. No I/O here, so the rules the
//! stored state follows can be read (and tested) in one place.

use flowline_core::{Envelope, Timestamp};
use serde::Serialize;
use std::time::Duration;

/// How a job groups its elements in event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Epoch-aligned, non-overlapping `[k·size, (k+1)·size)`.
    Tumbling { size: Duration },
    /// Epoch-aligned windows of `size` starting every `slide`: an element
    /// belongs to every window `[k·slide, k·slide + size)` containing it
    /// (`size / slide` of them when `slide` divides `size`).
    Sliding { size: Duration, slide: Duration },
    /// Per key, a session is a maximal run of elements each less than `gap`
    /// after the previous one. As a window it spans `[first, last + gap)`.
    Session { gap: Duration },
}

/// What a job keeps per window. Every window counts its elements; the
/// variants add one measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// The element count only.
    Count,
    /// Plus the sum of [`ElementValue::Amount`]s.
    Sum,
    /// Plus the number of distinct [`ElementValue::Member`]s (exact).
    Distinct,
    /// Plus p50 / p99 / max of [`ElementValue::DurationUs`]s.
    Latency,
}

/// What an element contributes beyond being counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElementValue {
    None,
    /// Minor units (revenue).
    Amount(i64),
    /// A member of a distinct count (a user id).
    Member(String),
    /// A duration in microseconds (request latency).
    DurationUs(i64),
}

/// One input element of a job: an event may yield several (a batch of
/// request samples), each with its own key and event time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub key: String,
    /// Event time: when it happened in the domain, not when it arrived.
    pub at: Timestamp,
    pub value: ElementValue,
}

/// Turns an event into the job's elements (none when it does not concern the
/// job). `Err` means the event is of a type the job consumes but its payload
/// is malformed: it is dead-lettered rather than silently skipped.
pub type Extractor = fn(&Envelope) -> Result<Vec<Element>, String>;

/// A stream-processing job over the log.
#[derive(Debug, Clone)]
pub struct Job {
    /// Stable: used in URLs and as the key of the job's stored state.
    pub name: &'static str,
    pub description: &'static str,
    pub window: WindowKind,
    pub aggregate: Aggregate,
    /// The key extractor.
    pub extract: Extractor,
    /// Watermark = the slowest active source's max event time − this (see
    /// [`Job::idle_timeout`]).
    pub out_of_orderness: Duration,
    /// A window stays open to late elements until watermark ≥ end + this.
    pub allowed_lateness: Duration,
    /// A source (topic partition) that delivered nothing to the job for this
    /// long, in processing time, no longer holds the watermark back. Zero:
    /// every source is idle at once, so the watermark follows the newest
    /// event time over all sources.
    pub idle_timeout: Duration,
}

/// How far ahead of the wall clock an event time may move the watermark: a
/// producer whose clock runs fast must not finalize every open window. The
/// element itself still goes to the windows of its own time.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// What the watermark knows about one input source of a job (µs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SourceMark {
    /// The source's largest event time, already capped at wall clock +
    /// [`MAX_CLOCK_SKEW`].
    pub max_event_time: i64,
    /// Wall-clock time of the source's last element.
    pub last_seen: i64,
}

pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Job {
    /// Checks the definition; the engine relies on positive sizes.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let positive = |d: Duration, what: &str| {
            if micros(d) > 0 {
                Ok(())
            } else {
                Err(format!("job {}: {what} must be at least 1 µs", self.name))
            }
        };
        match self.window {
            WindowKind::Tumbling { size } => positive(size, "size"),
            WindowKind::Sliding { size, slide } => {
                positive(size, "size")?;
                positive(slide, "slide")?;
                if slide > size {
                    return Err(format!("job {}: slide must not exceed size", self.name));
                }
                Ok(())
            }
            WindowKind::Session { gap } => positive(gap, "gap"),
        }
    }

    pub(crate) fn lateness_us(&self) -> i64 {
        micros(self.allowed_lateness)
    }

    /// The watermark the sources allow at wall-clock `now` (µs): the
    /// smallest max event time over the active sources (those with an
    /// element less than `idle_timeout` ago) − `out_of_orderness`; when every
    /// source is idle, the largest over all of them. `None` without sources.
    /// The caller keeps the larger of this and the stored watermark, so it
    /// never moves back.
    pub(crate) fn watermark_of(&self, sources: &[SourceMark], now: i64) -> Option<i64> {
        let idle = micros(self.idle_timeout);
        let active = sources
            .iter()
            .filter(|s| idle > 0 && now.saturating_sub(s.last_seen) < idle)
            .map(|s| s.max_event_time)
            .min();
        let t = active.or_else(|| sources.iter().map(|s| s.max_event_time).max())?;
        Some(t.saturating_sub(micros(self.out_of_orderness)))
    }

    /// Whether a window ending at `end` can no longer change.
    pub(crate) fn is_final(&self, end: i64, watermark: Option<i64>) -> bool {
        watermark.is_some_and(|w| w >= end.saturating_add(self.lateness_us()))
    }
}

/// The `[start, end)` windows (µs) containing `t`, oldest first. Empty for
/// session windows, which depend on the key's other elements.
pub fn windows_of(kind: WindowKind, t: i64) -> Vec<(i64, i64)> {
    match kind {
        WindowKind::Tumbling { size } => {
            let size = micros(size);
            let start = t.div_euclid(size) * size;
            vec![(start, start + size)]
        }
        WindowKind::Sliding { size, slide } => {
            let (size, slide) = (micros(size), micros(slide));
            let mut start = t.div_euclid(slide) * slide;
            let mut v = Vec::new();
            while start + size > t {
                v.push((start, start + size));
                start -= slide;
            }
            v.reverse();
            v
        }
        WindowKind::Session { .. } => Vec::new(),
    }
}

/// The window kind as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WindowSpec {
    /// `tumbling`, `sliding` or `session`.
    pub kind: &'static str,
    /// Window length (tumbling, sliding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_ms: Option<i64>,
    /// Distance between window starts (sliding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slide_ms: Option<i64>,
    /// Inactivity that ends a session (session).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap_ms: Option<i64>,
}

impl From<WindowKind> for WindowSpec {
    fn from(k: WindowKind) -> Self {
        let ms = |d: Duration| Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        match k {
            WindowKind::Tumbling { size } => WindowSpec {
                kind: "tumbling",
                size_ms: ms(size),
                slide_ms: None,
                gap_ms: None,
            },
            WindowKind::Sliding { size, slide } => WindowSpec {
                kind: "sliding",
                size_ms: ms(size),
                slide_ms: ms(slide),
                gap_ms: None,
            },
            WindowKind::Session { gap } => WindowSpec {
                kind: "session",
                size_ms: None,
                slide_ms: None,
                gap_ms: ms(gap),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000_000;

    #[test]
    fn tumbling_windows_are_epoch_aligned_and_half_open() {
        let k = WindowKind::Tumbling {
            size: Duration::from_secs(60),
        };
        assert_eq!(windows_of(k, 0), vec![(0, MIN)]);
        assert_eq!(windows_of(k, MIN - 1), vec![(0, MIN)]);
        assert_eq!(windows_of(k, MIN), vec![(MIN, 2 * MIN)]);
        assert_eq!(windows_of(k, -1), vec![(-MIN, 0)]);
    }

    #[test]
    fn a_sliding_element_belongs_to_size_over_slide_windows() {
        let k = WindowKind::Sliding {
            size: Duration::from_secs(300),
            slide: Duration::from_secs(60),
        };
        let t = 7 * MIN + 30_000_000; // 00:07:30
        let w = windows_of(k, t);
        assert_eq!(
            w,
            (3..=7)
                .map(|m| (m * MIN, m * MIN + 5 * MIN))
                .collect::<Vec<_>>()
        );
        // On a boundary the window starting there includes it, the one
        // ending there does not.
        let w = windows_of(k, 5 * MIN);
        assert_eq!(w.first(), Some(&(MIN, 6 * MIN)));
        assert_eq!(w.last(), Some(&(5 * MIN, 10 * MIN)));
        assert_eq!(w.len(), 5);
        // A slide that does not divide the size.
        let k = WindowKind::Sliding {
            size: Duration::from_secs(100),
            slide: Duration::from_secs(60),
        };
        assert_eq!(
            windows_of(k, 30_000_000),
            vec![(-MIN, 40_000_000), (0, 100_000_000)]
        );
        assert_eq!(windows_of(k, 45_000_000), vec![(0, 100_000_000)]);
    }

    #[test]
    fn a_window_is_final_once_the_watermark_passes_end_plus_lateness() {
        let job = Job {
            name: "t",
            description: "",
            window: WindowKind::Tumbling {
                size: Duration::from_secs(60),
            },
            aggregate: Aggregate::Count,
            extract: |_| Ok(Vec::new()),
            out_of_orderness: Duration::from_secs(5),
            allowed_lateness: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
        };
        assert!(!job.is_final(MIN, None));
        assert!(!job.is_final(MIN, Some(2 * MIN - 1)));
        assert!(job.is_final(MIN, Some(2 * MIN)));
        assert!(job.validate().is_ok());
        let bad = Job {
            window: WindowKind::Sliding {
                size: Duration::from_secs(60),
                slide: Duration::from_secs(120),
            },
            ..job
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn the_watermark_follows_the_slowest_active_source() {
        const S: i64 = 1_000_000;
        let job = Job {
            name: "t",
            description: "",
            window: WindowKind::Tumbling {
                size: Duration::from_secs(60),
            },
            aggregate: Aggregate::Count,
            extract: |_| Ok(Vec::new()),
            out_of_orderness: Duration::from_secs(5),
            allowed_lateness: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
        };
        let mark = |max_event_time, last_seen| SourceMark {
            max_event_time,
            last_seen,
        };
        let now = 1_000 * S;
        assert_eq!(job.watermark_of(&[], now), None);
        // Both active: the slower one decides.
        let both = [mark(3 * MIN, now - S), mark(MIN, now - 29 * S)];
        assert_eq!(job.watermark_of(&both, now), Some(MIN - 5 * S));
        // The slow one idle for the whole timeout: it no longer holds back.
        let one_idle = [mark(3 * MIN, now - S), mark(MIN, now - 30 * S)];
        assert_eq!(job.watermark_of(&one_idle, now), Some(3 * MIN - 5 * S));
        // All idle: the newest over all of them.
        let all_idle = [mark(2 * MIN, now - 40 * S), mark(3 * MIN, now - 31 * S)];
        assert_eq!(job.watermark_of(&all_idle, now), Some(3 * MIN - 5 * S));
        // A zero timeout: always the newest over all sources.
        let eager = Job {
            idle_timeout: Duration::ZERO,
            ..job
        };
        assert_eq!(eager.watermark_of(&both, now), Some(3 * MIN - 5 * S));
    }
}
