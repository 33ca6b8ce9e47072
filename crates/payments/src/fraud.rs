//! Rules run before authorization. Each rule that fires adds to a score and
//! names itself; at or above the threshold the payment is declined with
//! `fraud_suspected` and never reaches the provider.

use serde::Serialize;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct FraudConfig {
    /// The sliding window the velocity rules count over.
    pub velocity_window: Duration,
    /// Payment attempts per user in the window before this one is suspect.
    pub max_per_user: i64,
    /// Attempts with one card (by fingerprint, across tokens and users).
    pub max_per_card: i64,
    /// Minor units at or above which a payment is refused outright.
    pub decline_amount: i64,
    /// Minor units at or above which a payment counts as high.
    pub review_amount: i64,
    pub threshold: u32,
}

impl Default for FraudConfig {
    fn default() -> Self {
        FraudConfig {
            velocity_window: Duration::from_secs(600),
            max_per_user: 10,
            max_per_card: 5,
            decline_amount: 100_000_000,
            review_amount: 200_000,
            threshold: 70,
        }
    }
}

/// What the rules saw.
pub struct Signals {
    pub amount: i64,
    pub user_attempts: i64,
    pub card_attempts: i64,
    pub card_country: Option<String>,
    pub billing_country: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub score: u32,
    pub reasons: Vec<&'static str>,
    pub rejected: bool,
}

pub fn assess(cfg: &FraudConfig, s: &Signals) -> Verdict {
    let mut score = 0;
    let mut reasons = Vec::new();
    let mut fire = |points: u32, reason: &'static str| {
        score += points;
        reasons.push(reason);
    };
    if s.user_attempts >= cfg.max_per_user {
        fire(80, "velocity_user");
    }
    if s.card_attempts >= cfg.max_per_card {
        fire(80, "velocity_card");
    }
    if s.amount >= cfg.decline_amount {
        fire(100, "amount_above_limit");
    } else if s.amount >= cfg.review_amount {
        fire(40, "high_amount");
    }
    if let (Some(card), Some(billing)) = (&s.card_country, &s.billing_country) {
        if card != billing {
            fire(40, "country_mismatch");
        }
    }
    Verdict {
        rejected: score >= cfg.threshold,
        score,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals() -> Signals {
        Signals {
            amount: 1000,
            user_attempts: 0,
            card_attempts: 0,
            card_country: Some("US".into()),
            billing_country: Some("US".into()),
        }
    }

    #[test]
    fn rules_add_up_to_a_verdict() {
        let cfg = FraudConfig::default();
        assert_eq!(assess(&cfg, &signals()).score, 0);
        let mut s = signals();
        s.billing_country = Some("BR".into());
        let v = assess(&cfg, &s);
        assert_eq!((v.score, v.rejected), (40, false));
        s.amount = cfg.review_amount;
        let v = assess(&cfg, &s);
        assert_eq!((v.score, v.rejected), (80, true));
        assert_eq!(v.reasons, ["high_amount", "country_mismatch"]);
        let mut s = signals();
        s.user_attempts = cfg.max_per_user;
        assert!(assess(&cfg, &s).rejected);
        let mut s = signals();
        s.amount = cfg.decline_amount;
        assert_eq!(assess(&cfg, &s).reasons, ["amount_above_limit"]);
    }
}
