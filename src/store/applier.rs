//! Applying group commits to the index in the background, many in one sled batch.
//!
//! Why: each `apply_batch` costs sled two synchronous writes of its log buffers. Applied one by
//! one on the writer thread, that cost sat between every commit and the next; here a thread of
//! its own gathers the commits of up to [`GATHER`] (at most [`BATCH`]) into one batch, while the
//! writer goes on. Until a commit is applied, its pointers are in the view's overlay
//! (`view.rs`), so readers find them.
//!
//! Invariants:
//! - Commits are applied in the order the writer hands them over, each batch with the applied
//!   mark of its last commit and the producers' states as of it (the writer hands each commit's
//!   states over with it): the index never claims more than the commits it holds.
//! - [`Applier::drain`] returns once every commit handed over before it is applied: the writer
//!   drains before any record that removes or replaces pointers, and before it stops.
//! - A failure to apply stops the writer taking writes (the commits are in the log: a restart
//!   applies them again).

use super::index::Written;
use super::view::View;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

/// Commits waiting for the applier at most; the writer waits beyond (it is far behind).
const QUEUE: usize = 1024;
/// Commits applied in one sled batch at most.
const BATCH: usize = 256;
/// How long the applier gathers commits into one batch after the first.
const GATHER: std::time::Duration = std::time::Duration::from_millis(5);

/// The states of the producers a commit touched, after it (`None`: forgotten).
pub type ProducerStates = Vec<(Arc<str>, Option<Vec<u8>>)>;

enum Job {
    Apply(Box<Written>, ProducerStates),
    /// Answered once everything before it is applied.
    Drain(Sender<()>),
}

/// The applier thread's handle; owned by the writer.
pub struct Applier {
    jobs: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// Why applying failed, once it did.
    failed: Arc<OnceLock<String>>,
}

impl Applier {
    /// Starts the thread applying to `view`'s index.
    pub fn start(view: Arc<View>) -> Result<Applier> {
        let (jobs, inbox) = sync_channel(QUEUE);
        let failed = Arc::new(OnceLock::new());
        let failure = failed.clone();
        let thread = std::thread::Builder::new()
            .name("tapeline-applier".into())
            .spawn(move || run(&view, &inbox, &failure))
            .map_err(|source| Error::Io { context: "starting the applier thread".into(), source })?;
        Ok(Applier { jobs: Some(jobs), thread: Some(thread), failed })
    }

    /// Hands a commit over, with its producers' states.
    pub fn apply(&self, written: Written, producers: ProducerStates) -> Result<()> {
        self.checked()?;
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(Job::Apply(Box::new(written), producers)).is_ok());
        if sent {
            Ok(())
        } else {
            Err(self.stopped())
        }
    }

    /// Waits until every commit handed over is applied.
    pub fn drain(&self) -> Result<()> {
        let (done, wait) = std::sync::mpsc::channel();
        let sent = self.jobs.as_ref().is_some_and(|jobs| jobs.send(Job::Drain(done)).is_ok());
        if !sent || wait.recv().is_err() {
            return Err(self.stopped());
        }
        self.checked()
    }

    /// Fails once applying failed.
    pub fn checked(&self) -> Result<()> {
        match self.failed.get() {
            Some(cause) => Err(Error::Internal(format!("updating the index failed: {cause}"))),
            None => Ok(()),
        }
    }

    fn stopped(&self) -> Error {
        let cause = self.failed.get().cloned().unwrap_or_else(|| "the applier thread stopped".into());
        Error::Internal(format!("updating the index failed: {cause}"))
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        // Its inbox closed, the thread applies what waits and ends.
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(view: &View, inbox: &Receiver<Job>, failed: &OnceLock<String>) {
    while let Ok(first) = inbox.recv() {
        let began = std::time::Instant::now();
        let mut run = Vec::new();
        let mut producers: BTreeMap<Arc<str>, Option<Vec<u8>>> = BTreeMap::new();
        let mut drained = None;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Apply(written, states) => {
                    run.push(*written);
                    // Later commits' states replace earlier ones: the batch's are its last's.
                    producers.extend(states);
                }
                Job::Drain(done) => {
                    drained = Some(done);
                    break;
                }
            }
            if run.len() < BATCH {
                // Gathers for a while: a batch of many commits costs sled little more than one.
                let left = GATHER.saturating_sub(began.elapsed());
                next = inbox.recv_timeout(left).ok();
            }
        }
        if !run.is_empty() && failed.get().is_none() {
            let producers: ProducerStates = producers.into_iter().collect();
            match view.index().apply_all(&run, &producers) {
                Ok(_) => view.applied(&run.iter().flat_map(Written::pointers).collect::<Vec<_>>()),
                Err(err) => {
                    tracing::error!(cause = %err, "updating the index failed; the log takes no more writes");
                    let _ = failed.set(err.to_string());
                }
            }
        }
        if let Some(done) = drained {
            let _ = done.send(());
        }
    }
}
