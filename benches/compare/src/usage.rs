//! What limited a figure: where the machine's time went while it was measured.
//!
//! A [`Meter`] reads the kernel's counters when a figure's measured phase starts and again when it
//! ends: the server's CPU time and the load generator's (`/proc/PID/stat`), the whole machine's
//! busy and I/O-wait time (`/proc/stat`), and the bytes through the loopback interface
//! (`/proc/net/dev`). [`Usage::limit`] names the resource that set the figure.

use serde::Serialize;
use std::collections::HashMap;
use std::time::Instant;

/// The machine is counted as saturated when its cores are busy this much of the time: the rest is
/// scheduling slack between the server and the load generator.
const SATURATED: f64 = 0.85;
/// Time the cores spent idle waiting for the disk beyond which the disk (fsync) is the wait.
const DISK_WAIT: f64 = 0.10;
/// `/proc` counts CPU time in these ticks per second (`USER_HZ`, 100 on every Linux ABI).
const TICKS_PER_SECOND: f64 = 100.0;

/// Where the time went while one figure was measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    pub seconds: f64,
    /// Cores' worth of CPU time the server used (user + system): 1.0 is one core all the time.
    pub server_cores: f64,
    /// The same for the load generator (this process: publishers and subscribers).
    pub generator_cores: f64,
    /// Fraction of the machine's CPU time busy (every process, the kernel included).
    pub busy: f64,
    /// Fraction of the machine's CPU time idle while waiting for disk I/O.
    pub iowait: f64,
    /// MB/s through the loopback interface (each byte counted once).
    pub loopback_mb_per_second: f64,
    /// The server thread that used the most CPU, and its cores' worth: a single-threaded stage
    /// can limit a figure while the machine has a core to spare.
    pub busiest_thread: String,
    pub busiest_thread_cores: f64,
}

/// What a figure was limited by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Both cores were busy: the figure is as fast as the CPU allows.
    Cpu,
    /// One server thread was busy all the time: the figure is as fast as that thread.
    Thread,
    /// The cores sat waiting for the disk (fsync).
    Disk,
    /// Neither: the figure runs at a rate it was asked for (live latency, handoff).
    OfferedRate,
    /// Neither, at full speed: the client waits for acks and round trips (latency-bound).
    RoundTrips,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::Cpu => "CPU",
            Limit::Thread => "one thread",
            Limit::Disk => "disk wait",
            Limit::OfferedRate => "offered rate",
            Limit::RoundTrips => "round trips",
        }
    }
}

impl Usage {
    /// What set the figure; `fixed_rate` when the workload sends at a rate it was given.
    pub fn limit(&self, fixed_rate: bool) -> Limit {
        if self.busy >= SATURATED {
            Limit::Cpu
        } else if self.busiest_thread_cores >= SATURATED {
            Limit::Thread
        } else if self.iowait >= DISK_WAIT {
            Limit::Disk
        } else if fixed_rate {
            Limit::OfferedRate
        } else {
            Limit::RoundTrips
        }
    }

    /// One table cell: the limit, then the numbers it was read from.
    pub fn cell(&self, fixed_rate: bool) -> String {
        format!(
            "{}: {:.0}% busy ({:.2} + {:.2} cores; {} {:.2}), {:.0}% io wait, {:.0} MB/s lo",
            self.limit(fixed_rate).name(),
            self.busy * 100.0,
            self.server_cores,
            self.generator_cores,
            self.busiest_thread,
            self.busiest_thread_cores,
            self.iowait * 100.0,
            self.loopback_mb_per_second
        )
    }
}

/// Counters read at the start of a measured phase.
pub struct Meter {
    server: Option<u32>,
    at: Instant,
    server_ticks: u64,
    threads: HashMap<String, (String, u64)>,
    generator_ticks: u64,
    machine: Machine,
    loopback: u64,
}

impl Meter {
    /// Starts measuring; `server` is the server's process id.
    pub fn start(server: Option<u32>) -> Meter {
        Meter {
            server,
            at: Instant::now(),
            server_ticks: server.map_or(0, |pid| process_ticks(&pid.to_string())),
            threads: server.map(threads).unwrap_or_default(),
            generator_ticks: process_ticks("self"),
            machine: Machine::read(),
            loopback: loopback_bytes(),
        }
    }

    /// What was used since [`Meter::start`].
    pub fn stop(&self) -> Usage {
        let seconds = self.at.elapsed().as_secs_f64().max(1e-9);
        let cores = |ticks: u64| ticks as f64 / TICKS_PER_SECOND / seconds;
        let machine = Machine::read();
        let total = machine.total.saturating_sub(self.machine.total).max(1) as f64;
        let (busiest_thread, busiest_ticks) = self
            .server
            .map(threads)
            .unwrap_or_default()
            .into_iter()
            .map(|(tid, (name, ticks))| {
                (name, ticks.saturating_sub(self.threads.get(&tid).map_or(0, |(_, t)| *t)))
            })
            .max_by_key(|(_, ticks)| *ticks)
            .unwrap_or_default();
        Usage {
            seconds,
            server_cores: cores(
                self.server
                    .map_or(0, |pid| process_ticks(&pid.to_string()))
                    .saturating_sub(self.server_ticks),
            ),
            generator_cores: cores(process_ticks("self").saturating_sub(self.generator_ticks)),
            busy: machine.busy.saturating_sub(self.machine.busy) as f64 / total,
            iowait: machine.iowait.saturating_sub(self.machine.iowait) as f64 / total,
            loopback_mb_per_second: loopback_bytes().saturating_sub(self.loopback) as f64 / seconds / 1e6,
            busiest_thread,
            busiest_thread_cores: cores(busiest_ticks),
        }
    }
}

/// User + system ticks of a process (every thread) or of one thread (`<pid>/task/<tid>`), from
/// its `stat`; 0 when unreadable.
fn process_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: fields are counted after its closing parenthesis, where
    // utime and stime are the 12th and 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
    rest.split_whitespace().skip(11).take(2).filter_map(|f| f.parse::<u64>().ok()).sum()
}

/// Every thread of process `pid`: its id, name and user + system ticks.
fn threads(pid: u32) -> HashMap<String, (String, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    tasks
        .map(|task| {
            let tid = task.file_name().to_string_lossy().into_owned();
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let ticks = process_ticks(&format!("{pid}/task/{tid}"));
            (tid, (name.trim().to_string(), ticks))
        })
        .collect()
}

/// The machine's CPU ticks from the first line of `/proc/stat`.
#[derive(Default)]
struct Machine {
    total: u64,
    busy: u64,
    iowait: u64,
}

impl Machine {
    fn read() -> Machine {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return Machine::default() };
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        let f: Vec<u64> = line.split_whitespace().skip(1).take(8).filter_map(|x| x.parse().ok()).collect();
        if f.len() < 8 {
            return Machine::default();
        }
        let (idle, iowait) = (f[3], f[4]);
        let total: u64 = f.iter().sum();
        Machine { total, busy: total - idle - iowait, iowait }
    }
}

/// Bytes received on the loopback interface so far (every byte sent on it is received once).
fn loopback_bytes() -> u64 {
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
