//! Fault injection for the order sagas, for failure drills and tests: the
//! `orders.failpoints` setting (`FLOWLINE__ORDERS__FAILPOINTS`), e.g.
//! `"confirm_stock:do=fatal;charge_payment:undo=fail:3"`.
//!
//! Each entry names a step and a phase (`do` or `undo`) and what its attempts
//! do before calling the participant:
//! - `fatal`: fail for good (the saga compensates);
//! - `fail:N`: fail the first N attempts as retryable, then go on;
//! - `delay:MS`: wait MS milliseconds (a slow participant; past the step's
//!   timeout it is a timeout).
//!
//! Keyed by attempt number, so a fault behaves the same after a restart.
//! Unset (the default), nothing is checked.

use flowline_saga::{StepCtx, StepError};
use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Fatal,
    Fail(u32),
    Delay(Duration),
}

#[derive(Debug, Clone, Default)]
pub struct Failpoints(HashMap<String, Fault>);

impl Failpoints {
    /// A malformed entry is an error naming it.
    pub fn parse(spec: &str) -> Result<Failpoints, String> {
        let mut map = HashMap::new();
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let bad =
                || format!("cannot read `{entry}` (expected step:do|undo=fatal|fail:N|delay:MS)");
            let (point, action) = entry.split_once('=').ok_or_else(bad)?;
            let (_, phase) = point.split_once(':').ok_or_else(bad)?;
            if !matches!(phase, "do" | "undo") {
                return Err(bad());
            }
            let fault = match action.split_once(':') {
                None if action == "fatal" => Fault::Fatal,
                Some(("fail", n)) => Fault::Fail(n.parse().map_err(|_| bad())?),
                Some(("delay", ms)) => {
                    Fault::Delay(Duration::from_millis(ms.parse().map_err(|_| bad())?))
                }
                _ => return Err(bad()),
            };
            map.insert(point.to_owned(), fault);
        }
        Ok(Failpoints(map))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Applies the fault set for this step and phase, if any.
    pub async fn check(&self, ctx: &StepCtx) -> Result<(), StepError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let phase = ctx.command_id.rsplit(':').next().unwrap_or("do");
        let Some(fault) = self.0.get(&format!("{}:{phase}", ctx.step)) else {
            return Ok(());
        };
        match *fault {
            Fault::Fatal => Err(StepError::fatal(format!(
                "We could not complete your order. [failpoint {}:{phase}]",
                ctx.step
            ))),
            Fault::Fail(n) if ctx.attempt <= n => Err(StepError::retryable(format!(
                "failpoint {}:{phase} (attempt {} of {n})",
                ctx.step, ctx.attempt
            ))),
            Fault::Fail(_) => Ok(()),
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_and_bad_ones_are_named() {
        let f = Failpoints::parse(
            "confirm_stock:do=fatal; charge_payment:undo=fail:3;reserve_stock:do=delay:250",
        )
        .unwrap();
        assert_eq!(f.0["confirm_stock:do"], Fault::Fatal);
        assert_eq!(f.0["charge_payment:undo"], Fault::Fail(3));
        assert_eq!(
            f.0["reserve_stock:do"],
            Fault::Delay(Duration::from_millis(250))
        );
        for bad in ["x=fatal", "x:later=fatal", "x:do=explode", "x:do=fail:many"] {
            let e = Failpoints::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(Failpoints::parse("").unwrap().is_empty());
    }
}
