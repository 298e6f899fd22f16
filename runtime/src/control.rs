//! What a caller of the loop controls while it runs: a [`Cancel`] token (cancel from another
//! thread, or a deadline) checked before every model call, and a [`StepObserver`] called with
//! each step's trace as it finishes, which may stop the run.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::reasoning::{HeldPassage, StepTrace};

/// Cancellation of one run: [`Cancel::cancel`] from any thread (clones share the flag), and an
/// optional deadline after which the run stops by itself. The loop and the runtime's step model
/// check it before every model call (the prefill and each decoded token), so a cancelled run
/// frees its thread within one model call.
#[derive(Debug, Clone)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    started: Instant,
    deadline: Option<Instant>,
}

impl Default for Cancel {
    fn default() -> Self {
        Cancel::new()
    }
}

impl PartialEq for Cancel {
    /// The same token (clones of one another), not an equal-looking one.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.flag, &other.flag) && self.deadline == other.deadline
    }
}

impl Cancel {
    /// A token without a deadline.
    pub fn new() -> Self {
        Cancel {
            flag: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
            deadline: None,
        }
    }

    /// A token that expires at `deadline`.
    pub fn with_deadline(deadline: Instant) -> Self {
        Cancel {
            deadline: Some(deadline),
            ..Cancel::new()
        }
    }

    /// Cancels the run (and every clone of this token).
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }

    /// Whether the run should stop (cancelled, or past the deadline).
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The deadline, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// `Ok` while the run may go on; [`Error::Cancelled`] once cancelled,
    /// [`Error::DeadlineExceeded`] once past the deadline.
    pub fn check(&self) -> Result<()> {
        if self.flag.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        match self.deadline {
            Some(d) if Instant::now() >= d => Err(Error::DeadlineExceeded {
                after_ms: d.saturating_duration_since(self.started).as_secs_f64() * 1e3,
            }),
            _ => Ok(()),
        }
    }
}

/// The function of a [`StepObserver`]: a finished step's trace and every passage held so far
/// (the step's prompt held the first `trace.held`).
type ObserveFn = dyn Fn(&StepTrace, &[HeldPassage]) -> ControlFlow<()> + Send + Sync;

/// Called with each step's trace as soon as the step finishes (before the next retrieval);
/// `ControlFlow::Break(())` stops the run with [`Error::Cancelled`]. Shared and cheap to clone
/// (options holding one stay `Clone`).
#[derive(Clone)]
pub struct StepObserver(Arc<ObserveFn>);

impl StepObserver {
    /// An observer calling `f` with each step's trace and the passages held so far.
    pub fn new(
        f: impl Fn(&StepTrace, &[HeldPassage]) -> ControlFlow<()> + Send + Sync + 'static,
    ) -> Self {
        StepObserver(Arc::new(f))
    }

    /// Reports one step.
    pub fn on_step(&self, step: &StepTrace, held: &[HeldPassage]) -> ControlFlow<()> {
        (self.0)(step, held)
    }
}

impl std::fmt::Debug for StepObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepObserver(..)")
    }
}

impl PartialEq for StepObserver {
    /// The same observer (clones of one another).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The controls of one run of [`crate::reason_with`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoopControl {
    /// Stops the run from outside or at a deadline.
    pub cancel: Option<Cancel>,
    /// Sees each step as it finishes.
    pub observer: Option<StepObserver>,
}

impl LoopControl {
    /// Checks the cancel token, if any.
    pub fn check(&self) -> Result<()> {
        self.cancel.as_ref().map_or(Ok(()), Cancel::check)
    }

    /// Reports a finished step to the observer, if any; a `Break` is [`Error::Cancelled`].
    pub fn report(&self, step: &StepTrace, held: &[HeldPassage]) -> Result<()> {
        match self.observer.as_ref().map(|o| o.on_step(step, held)) {
            Some(ControlFlow::Break(())) => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_token_reports_cancellation_and_its_deadline_apart() {
        let c = Cancel::new();
        assert!(c.check().is_ok());
        let clone = c.clone();
        clone.cancel();
        assert!(c.is_cancelled());
        assert!(matches!(c.check(), Err(Error::Cancelled)));

        let past = Cancel::with_deadline(Instant::now());
        std::thread::sleep(Duration::from_millis(2));
        assert!(past.is_cancelled());
        assert!(matches!(past.check(), Err(Error::DeadlineExceeded { .. })));

        let later = Cancel::with_deadline(Instant::now() + Duration::from_secs(3600));
        assert!(later.check().is_ok());
        assert_ne!(later, Cancel::new());
        assert_eq!(later, later.clone());
    }
}
