//! The latency distribution: durations kept with their multiplicity, so
//! percentiles are computed, not estimated.
//!
//! A duration is stored in microseconds rounded to three significant digits
//! (below 1 ms it is exact to the µs; 12.5 ms, 250 ms and 1.23 s are exact;
//! 12.345 ms is kept as 12.3 ms). That bounds a window to ~900 rows per
//! decade of latency however busy the endpoint, with at most 0.5 % error on
//! durations with more digits. The count, sum and max are kept exactly.

/// Rounds `us` (half up) to three significant digits; durations below 1 ms
/// (three digits of µs) are kept as they are. Negative durations become 0.
pub fn bucket(us: i64) -> i64 {
    let us = us.max(0);
    if us < 1000 {
        return us;
    }
    let mut step = 1i64;
    let mut v = us;
    while v >= 1000 {
        v /= 10;
        step *= 10;
    }
    (us + step / 2) / step * step
}

/// Nearest-rank percentile: the smallest stored value such that at least
/// `ceil(p/100 · N)` of the N values are ≤ it (rank at least 1). It is always
/// one of the observed values, never an interpolation. `sorted` holds
/// `(value, multiplicity)` in ascending value order. `None` when empty.
pub fn percentile(sorted: &[(i64, i64)], p: u32) -> Option<i64> {
    let total: i64 = sorted.iter().map(|(_, n)| n).sum();
    if total <= 0 {
        return None;
    }
    let rank = ((i64::from(p) * total + 99) / 100).max(1);
    let mut seen = 0;
    for (v, n) in sorted {
        seen += n;
        if seen >= rank {
            return Some(*v);
        }
    }
    sorted.last().map(|(v, _)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_three_significant_digits() {
        assert_eq!(bucket(-5), 0);
        assert_eq!(bucket(999), 999);
        assert_eq!(bucket(1000), 1000);
        assert_eq!(bucket(12_500), 12_500);
        assert_eq!(bucket(12_345), 12_300);
        assert_eq!(bucket(12_350), 12_400);
        assert_eq!(bucket(1_234_567), 1_230_000);
        assert_eq!(bucket(99_960), 100_000);
    }

    #[test]
    fn nearest_rank_picks_an_observed_value() {
        // 1..=10 once each: p50 → rank 5, p99 → rank 10, p10 → rank 1.
        let v: Vec<(i64, i64)> = (1..=10).map(|x| (x, 1)).collect();
        assert_eq!(percentile(&v, 50), Some(5));
        assert_eq!(percentile(&v, 99), Some(10));
        assert_eq!(percentile(&v, 10), Some(1));
        assert_eq!(percentile(&v, 0), Some(1));
        // Multiplicities count: [1×3, 7×1] → p50 = rank 2 = 1, p99 = rank 4 = 7.
        assert_eq!(percentile(&[(1, 3), (7, 1)], 50), Some(1));
        assert_eq!(percentile(&[(1, 3), (7, 1)], 99), Some(7));
        assert_eq!(percentile(&[], 50), None);
    }
}
