//! Upstream health as the agent reports it: a circuit breaker that opens after consecutive
//! connection failures, combined with the last health probe's verdict. The combined state goes to
//! the gateway on the control stream, so it can prefer healthy replicas and answer at once when
//! none is.
//!
//! This is the state machine only: no I/O, no clock (every call takes `now`), so it is tested
//! without either. The probes that feed it live in `probe`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_codec::control::HealthState;
use tokio::sync::watch;
use tracing::{info, warn};

/// The state the gateway is told, with a short reason.
pub(crate) type Report = (HealthState, String);

#[derive(Debug, Default)]
struct State {
    /// Connection failures in a row.
    failures: u32,
    /// When the breaker opened (and the last failure while open).
    open_since: Option<Instant>,
    /// A trial request is under way while the breaker is open.
    trial: bool,
    /// The last error that counted.
    last_error: String,
    /// The last probe's failure (`None`: it passed, or no probe ran yet).
    probe_failure: Option<String>,
    /// Something (a probe or a request) reached the upstream since start.
    reached: bool,
}

impl State {
    fn report(&self) -> Report {
        if self.open_since.is_some() {
            (HealthState::Unhealthy, format!("circuit open: {}", self.last_error))
        } else if let Some(failure) = &self.probe_failure {
            (HealthState::Unhealthy, failure.clone())
        } else if self.reached {
            (HealthState::Healthy, String::new())
        } else {
            (HealthState::Unknown, String::new())
        }
    }
}

/// Health of the upstream(s), shared by every stream and session. The state lives under one
/// lock (held for a few instructions, never across an `.await`); `report` only announces its
/// changes to the sessions.
#[derive(Debug)]
pub(crate) struct Health {
    state: Mutex<State>,
    report: watch::Sender<Report>,
    failures_to_open: u32,
    cooldown: Duration,
}

/// Whether a request may go upstream now.
#[derive(Debug)]
pub(crate) enum Admission<'a> {
    /// Yes.
    Go,
    /// Yes, as the one trial while the breaker is open; resolve it with [`Health::record`].
    Trial(TrialGuard<'a>),
    /// No: the breaker is open. The reason, for the log.
    Refuse(String),
}

/// Releases the trial slot if the trial request ends without a verdict (client gone, timeout).
#[derive(Debug)]
pub(crate) struct TrialGuard<'a>(&'a Health);

impl Drop for TrialGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().trial = false;
    }
}

impl Health {
    /// A breaker that opens after `failures_to_open` connection failures in a row and lets one
    /// trial through each `cooldown` while open.
    pub(crate) fn new(failures_to_open: u32, cooldown: Duration) -> Self {
        Self {
            state: Mutex::default(),
            report: watch::Sender::new((HealthState::Unknown, String::new())),
            failures_to_open: failures_to_open.max(1),
            cooldown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes of the reported state, starting with the current one.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Report> {
        self.report.subscribe()
    }

    /// How long the breaker waits between trials.
    pub(crate) fn cooldown(&self) -> Duration {
        self.cooldown
    }

    /// Asks to send a request upstream at `now`.
    pub(crate) fn admit(&self, now: Instant) -> Admission<'_> {
        let mut state = self.lock();
        let Some(since) = state.open_since else {
            return Admission::Go;
        };
        if now.saturating_duration_since(since) >= self.cooldown && !state.trial {
            state.trial = true;
            return Admission::Trial(TrialGuard(self));
        }
        Admission::Refuse(format!(
            "{} connection failures in a row (last: {}); retrying",
            state.failures, state.last_error
        ))
    }

    /// The outcome, at `now`, of connecting to the upstream: `Ok` once a connection was made
    /// (whatever the response), `Err` when it could not be.
    pub(crate) fn record(&self, now: Instant, outcome: Result<(), &str>) {
        let mut state = self.lock();
        match outcome {
            Ok(()) => {
                if state.failures == 0 && state.reached && !state.trial {
                    // The common case: nothing to change, nobody to tell.
                    return;
                }
                if state.open_since.is_some() {
                    info!("upstream reachable again; circuit breaker closed");
                }
                state.failures = 0;
                state.open_since = None;
                state.reached = true;
            }
            Err(err) => {
                state.failures = state.failures.saturating_add(1);
                state.last_error = err.to_owned();
                if state.open_since.is_some() || state.failures >= self.failures_to_open {
                    if state.open_since.is_none() {
                        warn!(failures = state.failures, err, "upstream unreachable; circuit breaker open");
                    }
                    state.open_since = Some(now);
                }
            }
        }
        state.trial = false;
        self.publish(&state);
    }

    /// Whether the breaker is open.
    pub(crate) fn is_open(&self) -> bool {
        self.lock().open_since.is_some()
    }

    /// The verdict of a health probe: a pass also closes the breaker (the upstream is back).
    pub(crate) fn probe_result(&self, result: Result<(), String>) {
        let mut state = self.lock();
        if result.is_ok() {
            state.failures = 0;
            state.open_since = None;
            state.reached = true;
        }
        state.probe_failure = result.err();
        self.publish(&state);
    }

    fn publish(&self, state: &State) {
        let report = state.report();
        self.report.send_if_modified(|current| {
            let changed = *current != report;
            *current = report;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(5);

    fn state(health: &Health) -> HealthState {
        health.subscribe().borrow().0
    }

    #[test]
    fn opens_after_failures_in_a_row_and_lets_one_trial_through_per_cooldown() {
        let health = Health::new(3, COOLDOWN);
        let t0 = Instant::now();
        assert_eq!(state(&health), HealthState::Unknown);
        health.record(t0, Ok(()));
        assert_eq!(state(&health), HealthState::Healthy);
        health.record(t0, Err("refused"));
        health.record(t0, Err("refused"));
        assert!(matches!(health.admit(t0), Admission::Go), "two failures do not open it");
        health.record(t0, Err("refused"));
        assert!(health.is_open());
        assert_eq!(state(&health), HealthState::Unhealthy);
        assert!(matches!(health.admit(t0 + COOLDOWN / 2), Admission::Refuse(_)));
        // After the cool-down: exactly one trial.
        let trial = health.admit(t0 + COOLDOWN);
        assert!(matches!(trial, Admission::Trial(_)));
        assert!(matches!(health.admit(t0 + COOLDOWN), Admission::Refuse(_)), "one trial at a time");
        drop(trial);
        // A trial that ended without a verdict frees the slot.
        let trial = health.admit(t0 + COOLDOWN);
        assert!(matches!(trial, Admission::Trial(_)));
        drop(trial);
        // A failed trial restarts the cool-down from its own time.
        health.record(t0 + COOLDOWN, Err("refused"));
        assert!(matches!(health.admit(t0 + COOLDOWN + COOLDOWN / 2), Admission::Refuse(_)));
        // A successful one closes the breaker.
        let trial = health.admit(t0 + 2 * COOLDOWN);
        assert!(matches!(trial, Admission::Trial(_)));
        health.record(t0 + 2 * COOLDOWN, Ok(()));
        drop(trial);
        assert!(!health.is_open());
        assert!(matches!(health.admit(t0 + 2 * COOLDOWN), Admission::Go));
        assert_eq!(state(&health), HealthState::Healthy);
    }

    #[test]
    fn a_success_resets_the_count_of_failures() {
        let health = Health::new(2, COOLDOWN);
        let t0 = Instant::now();
        health.record(t0, Err("refused"));
        health.record(t0, Ok(()));
        health.record(t0, Err("refused"));
        assert!(!health.is_open());
    }

    #[test]
    fn probes_decide_the_report_and_a_passing_probe_closes_the_breaker() {
        let health = Health::new(1, COOLDOWN);
        let t0 = Instant::now();
        health.probe_result(Err("status 500".into()));
        assert_eq!(*health.subscribe().borrow(), (HealthState::Unhealthy, "status 500".into()));
        health.probe_result(Ok(()));
        assert_eq!(state(&health), HealthState::Healthy);
        health.record(t0, Err("refused"));
        assert!(health.is_open());
        health.probe_result(Ok(()));
        assert!(!health.is_open());
        assert_eq!(state(&health), HealthState::Healthy);
    }
}
