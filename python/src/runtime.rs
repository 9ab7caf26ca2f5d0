//! Running an engine job from Python: off the GIL on a tokio runtime of its own, with
//! Ctrl-C checks and progress events handed to a Python callback.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balans_operators::{ProgressSink, RunSummary};
use pyo3::prelude::*;

use crate::error::{Error, Result};

/// How often the waiting thread takes the GIL to check for signals and report progress.
const POLL: Duration = Duration::from_millis(100);
/// How long a cancelled job's blocking workers get to stop and delete their working files
/// (the CLI waits as long).
const SHUTDOWN: Duration = Duration::from_secs(10);

/// One progress event, as handed to Python: `(kind, text, number)`.
#[derive(Debug, Clone)]
pub enum Event {
    /// A stage started, with its total when known.
    Started(String, Option<u64>),
    /// Units done in the current stage, with an optional message.
    Progress(u64, Option<String>),
    /// The stage finished.
    Finished(String),
    /// A warning (always shown, as a Python warning).
    Warning(String),
    /// A step message (evaluation, preprocessing).
    Step(String),
}

/// Collects the engine's progress events for the polling thread.
#[derive(Debug, Default)]
pub struct EventQueue {
    events: Mutex<Vec<Event>>,
    summary: Mutex<Option<RunSummary>>,
    cancel: Arc<AtomicBool>,
}

impl EventQueue {
    /// Adds `event`.
    pub fn push(&self, event: Event) {
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
    }

    fn drain(&self) -> Vec<Event> {
        self.events
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default()
    }

    /// The flag [`run_job`] raises when the job is cancelled (for jobs that poll one).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// The last run summary reported by the correction operators.
    pub fn summary(&self) -> Option<RunSummary> {
        self.summary.lock().ok().and_then(|s| s.clone())
    }
}

impl ProgressSink for EventQueue {
    fn stage_started(&self, stage: &str, total: Option<u64>) {
        self.push(Event::Started(stage.to_string(), total));
    }

    fn stage_progress(&self, done: u64, message: Option<String>) {
        self.push(Event::Progress(done, message));
    }

    fn stage_finished(&self, stage: &str) {
        self.push(Event::Finished(stage.to_string()));
    }

    fn warn(&self, message: &str) {
        self.push(Event::Warning(message.to_string()));
    }

    fn finished(&self, summary: &RunSummary) {
        if let Ok(mut slot) = self.summary.lock() {
            *slot = Some(summary.clone());
        }
    }
}

/// Hands pending events to `callback(kind, text, number)`.
fn deliver(queue: &EventQueue, callback: &Bound<'_, PyAny>) -> PyResult<()> {
    for event in queue.drain() {
        let (kind, text, number): (&str, Option<String>, Option<u64>) = match event {
            Event::Started(stage, total) => ("start", Some(stage), total),
            Event::Progress(done, message) => ("progress", message, Some(done)),
            Event::Finished(stage) => ("finish", Some(stage), None),
            Event::Warning(message) => ("warning", Some(message), None),
            Event::Step(message) => ("step", Some(message), None),
        };
        callback.call1((kind, text, number))?;
    }
    Ok(())
}

/// Runs `job` to completion with the GIL released. Every 100 ms the waiting thread takes
/// the GIL, delivers progress events to `callback` and checks for signals; a pending
/// `KeyboardInterrupt` (or an exception from the callback) cancels the job: its future is
/// dropped, its blocking workers get up to 10 s to stop and remove their working files, and
/// the exception is raised.
pub fn run_job<T, F>(
    py: Python<'_>,
    queue: Arc<EventQueue>,
    callback: Option<Bound<'_, PyAny>>,
    job: F,
) -> PyResult<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(rayon::current_num_threads().max(1))
        .enable_all()
        .build()
        .map_err(|e| Error::invalid(format!("cannot start the runtime: {e}")))?;
    let mut handle = runtime.spawn(job);
    let outcome = loop {
        let polled = py.detach(|| {
            runtime.block_on(async { tokio::time::timeout(POLL, &mut handle).await.ok() })
        });
        let interrupted = callback
            .as_ref()
            .map_or(Ok(()), |cb| deliver(&queue, cb))
            .and_then(|()| {
                if polled.is_none() {
                    py.check_signals()
                } else {
                    Ok(())
                }
            });
        match (polled, interrupted) {
            (Some(done), Ok(())) => break Ok(done),
            (_, Err(e)) => {
                queue.cancel.store(true, Ordering::Relaxed);
                handle.abort();
                py.detach(|| {
                    let _ = runtime.block_on(&mut handle);
                });
                break Err(e);
            }
            (None, Ok(())) => {}
        }
    };
    py.detach(|| runtime.shutdown_timeout(SHUTDOWN));
    match outcome? {
        Ok(result) => Ok(result?),
        Err(join) if join.is_panic() => Err(Error::Panic(panic_message(join.into_panic())).into()),
        Err(_) => Err(Error::Interrupted.into()),
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
