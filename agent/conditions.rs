//! Conditions: whether uploads may run now and, if not, the one reason why.
//!
//! The decision is a pure function over observed facts so every combination is
//! unit-tested without I/O; probes that gather the facts live at the edges.

use serde::Serialize;

/// Why uploads are paused. One stable code per condition; shown in status and on MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// `fieldsync pause` or an MQTT `cmd/pause`.
    PausedByOperator,
    /// The remote refused our credentials (401/403); re-checked periodically.
    Auth,
    /// The remote does not answer.
    Offline,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PausedByOperator => "paused_by_operator",
            Reason::Auth => "auth",
            Reason::Offline => "offline",
        }
    }
}

/// What the probes and the uploader observed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Facts {
    pub operator_paused: bool,
    pub auth_failed: bool,
    pub offline: bool,
}

/// The reason uploads may not run, in priority order (an operator's pause explains more
/// than a symptom), or `None` when they may.
pub fn evaluate(f: &Facts) -> Option<Reason> {
    if f.operator_paused {
        Some(Reason::PausedByOperator)
    } else if f.auth_failed {
        Some(Reason::Auth)
    } else if f.offline {
        Some(Reason::Offline)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_table() {
        assert_eq!(evaluate(&Facts::default()), None);
        let f = |op, auth, off| Facts {
            operator_paused: op,
            auth_failed: auth,
            offline: off,
        };
        assert_eq!(
            evaluate(&f(true, true, true)),
            Some(Reason::PausedByOperator)
        );
        assert_eq!(evaluate(&f(false, true, true)), Some(Reason::Auth));
        assert_eq!(evaluate(&f(false, false, true)), Some(Reason::Offline));
        assert_eq!(
            evaluate(&f(true, false, false)),
            Some(Reason::PausedByOperator)
        );
    }
}
