//! `tail`'s progress on standard error while it replays, for a person at a terminal: records so
//! far, their rate and how old the records it is at are, then one "caught up" line. Nothing
//! when standard error is a pipe or a file, so scripts see only what they saw before.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::{Duration, Instant};
use tapeline::types::{human_duration, Tick};

pub struct Replay {
    bar: Option<ProgressBar>,
    began: Instant,
    records: u64,
    live: bool,
    /// The replay ends at its end instead of following live.
    bounded: bool,
}

impl Replay {
    /// Shows progress when standard error is a terminal.
    pub fn start(bounded: bool) -> Replay {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} replaying: {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Replay { bar, began: Instant::now(), records: 0, live: false, bounded }
    }

    /// `count` records were printed, the last at `tick`.
    pub fn printed(&mut self, count: u64, tick: u64) {
        self.records += count;
        let Some(bar) = self.bar.as_ref().filter(|_| !self.live) else { return };
        let rate = self.records as f64 / self.began.elapsed().as_secs_f64().max(0.001);
        let age = human_duration(Duration::from_nanos(Tick::now().0.saturating_sub(tick)));
        bar.set_message(format!("{} records, {rate:.0}/s, at records of {age} ago", self.records));
    }

    /// The replay reached the tail: the progress line gives way to one line saying so.
    pub fn caught_up(&mut self) {
        if self.live {
            return;
        }
        self.live = true;
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            let then = if self.bounded { "" } else { "; following live" };
            eprintln!(
                "tapeline: caught up: {} records replayed in {}{then}",
                self.records,
                human_duration(self.began.elapsed())
            );
        }
    }

    /// Prints `line` on standard error without tearing the progress line.
    pub fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}
