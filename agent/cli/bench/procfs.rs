//! What the benchmarks read about a daemon under test from /proc: memory from
//! `/proc/<pid>/status`, CPU time per thread from `/proc/<pid>/task/*/schedstat`
//! (nanoseconds; `/proc/<pid>/stat` counts 10 ms clock ticks, too coarse for an idle
//! daemon).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::time::{Duration, Instant};

/// A `Vm…:` line of /proc/<pid>/status (`VmRSS:`, `VmHWM:`) in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// On-CPU time of each live thread of a process in nanoseconds, by thread id.
fn thread_cpu_ns(pid: u32) -> io::Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    for t in fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        if let Ok(s) = fs::read_to_string(t.path().join("schedstat")) {
            let ns = s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            out.insert(t.file_name().to_string_lossy().into_owned(), ns);
        }
    }
    Ok(out)
}

/// On-CPU time of all live threads of a process in nanoseconds.
pub fn cpu_ns(pid: u32) -> io::Result<u64> {
    Ok(thread_cpu_ns(pid)?.values().sum())
}

/// On-CPU time a process uses over `window`, in nanoseconds. Threads come and go within
/// it (the async runtime's blocking pool lets idle threads exit), and an exited thread's
/// time leaves /proc/<pid>/task, so a difference of two [`cpu_ns`] readings can even go
/// backwards. Each thread is sampled every 100 ms instead and its increments summed: only
/// a thread's last < 100 ms before it exits is missed.
pub fn cpu_ns_over(pid: u32, window: Duration) -> io::Result<u64> {
    let end = Instant::now() + window;
    let mut last = thread_cpu_ns(pid)?;
    let mut used = 0;
    while let Some(left) = end
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
    {
        std::thread::sleep(left.min(Duration::from_millis(100)));
        let now = thread_cpu_ns(pid)?;
        for (tid, ns) in &now {
            used += ns.saturating_sub(last.get(tid).copied().unwrap_or(0));
        }
        last = now;
    }
    Ok(used)
}
