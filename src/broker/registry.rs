//! The subscriptions running now, as the status page and the metrics show them: each pump keeps
//! its entry up to date as it sends, and the entry leaves the registry when the pump ends.

use super::subscription::SlowConsumer;
use crate::types::Tick;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Every subscription running now, by the order they started.
#[derive(Debug, Default)]
pub struct Registry {
    next: AtomicU64,
    running: Mutex<BTreeMap<u64, Arc<Progress>>>,
}

/// Who asked for a subscription, as the status page names them.
#[derive(Debug, Clone, Default)]
pub struct Client {
    /// The connection's peer address, empty when not known.
    pub peer: String,
    /// The authenticated principal, empty when the server does not authenticate.
    pub principal: String,
}

/// One subscription as it goes: what it selected, and how far it got.
#[derive(Debug)]
pub struct Progress {
    pub id: u64,
    pub client: Client,
    /// The names and patterns asked for.
    pub selection: Vec<String>,
    pub slow: SlowConsumer,
    pub started: SystemTime,
    live: AtomicBool,
    last_sent: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
}

/// A subscription's progress at one moment.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Past `CaughtUp`: following the live tail.
    pub live: bool,
    /// The newest tick delivered (0 before any).
    pub last_sent: Tick,
    pub records: u64,
    pub bytes: u64,
}

/// How much of a selection logs and the status page show: a client may select 1,024 patterns of
/// 255 bytes.
const SHOWN_SELECTION: usize = 200;

impl Progress {
    /// The selection for people: the patterns, cut after about 200 bytes with how many there are.
    pub fn selection_text(&self) -> String {
        let all = self.selection.join(" ");
        if all.len() <= SHOWN_SELECTION {
            return all;
        }
        let mut cut = SHOWN_SELECTION;
        while !all.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}… ({} patterns)", &all[..cut], self.selection.len())
    }

    pub fn seen(&self) -> Seen {
        Seen {
            live: self.live.load(Ordering::Relaxed),
            last_sent: Tick(self.last_sent.load(Ordering::Relaxed)),
            records: self.records.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// A subscription's place in the registry; it leaves when this is dropped.
#[derive(Debug)]
pub struct Entry {
    registry: Arc<Registry>,
    progress: Arc<Progress>,
}

impl Registry {
    /// Enters a subscription starting now.
    pub fn enter(self: &Arc<Self>, client: Client, selection: Vec<String>, slow: SlowConsumer) -> Entry {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let progress = Arc::new(Progress {
            id,
            client,
            selection,
            slow,
            started: SystemTime::now(),
            live: AtomicBool::new(false),
            last_sent: AtomicU64::new(0),
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        self.lock().insert(id, progress.clone());
        Entry { registry: self.clone(), progress }
    }

    /// The subscriptions running now, oldest first.
    pub fn running(&self) -> Vec<Arc<Progress>> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Progress>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Entry {
    /// The subscription as the registry shows it.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// A batch of `records` records and `bytes` bytes went out; everything up to `last_sent` is
    /// delivered.
    pub fn sent(&self, records: u64, bytes: u64, last_sent: Tick) {
        self.progress.records.fetch_add(records, Ordering::Relaxed);
        self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.delivered(last_sent);
    }

    /// Everything up to `tick` is delivered (or skipped by the slow-consumer policy).
    pub fn delivered(&self, tick: Tick) {
        self.progress.last_sent.fetch_max(tick.0, Ordering::Relaxed);
    }

    /// The replay is over: the subscription follows the live tail.
    pub fn caught_up(&self) {
        self.progress.live.store(true, Ordering::Relaxed);
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.progress.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_shows_its_progress_and_leaves_when_dropped() {
        let registry = Arc::new(Registry::default());
        let a = registry.enter(Client::default(), vec!["a/**".into()], SlowConsumer::CatchUp);
        let b = registry.enter(Client::default(), vec!["b".into()], SlowConsumer::Latest);
        a.sent(3, 300, Tick(30));
        a.delivered(Tick(20));
        a.caught_up();
        let running = registry.running();
        assert_eq!(running.iter().map(|p| p.selection[0].as_str()).collect::<Vec<_>>(), ["a/**", "b"]);
        let seen = running[0].seen();
        assert!(seen.live && seen.last_sent == Tick(30) && seen.records == 3 && seen.bytes == 300);
        drop(a);
        assert_eq!(registry.running().len(), 1);
        drop(b);
        assert!(registry.running().is_empty());
    }
}
