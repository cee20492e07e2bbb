//! Small measurement helpers: latency percentiles, throughput units, the resident
//! memory of a process, and a short description of the machine for the report.

use std::time::Duration;

use anyhow::Context as _;

/// Latency percentiles of one side of one figure.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Latency {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) samples: usize,
}

impl Latency {
    pub(crate) fn from_samples(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self {
            p50_ms: ms(percentile(&samples, 0.50)),
            p99_ms: ms(percentile(&samples, 0.99)),
            samples: samples.len(),
        }
    }
}

/// Nearest-rank percentile of sorted samples (zero when there are none).
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Throughput in MB/s (10^6 bytes per second).
pub(crate) fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

/// `num / den`, or 0 when the denominator is 0 (a figure that measured nothing).
pub(crate) fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 { num / den } else { 0.0 }
}

/// Rounds to three decimals, so the JSON stays readable.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Resident set size of this process in KiB (`VmRSS` in `/proc/self/status`).
pub(crate) fn rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line in /proc/self/status")
}

/// User + system time from a `/proc/.../stat` line (10 ms resolution: Linux
/// reports it in USER_HZ = 100 ticks). Returns the command name too.
fn parse_stat(stat: &str) -> anyhow::Result<(&str, Duration)> {
    // The command name sits in parentheses and may hold spaces; utime and stime
    // are fields 14 and 15, i.e. the 12th and 13th after the name.
    let (head, rest) = stat.rsplit_once(')').context("malformed stat line")?;
    let comm = head.split_once('(').map_or("", |(_, c)| c);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("malformed stat line")
    };
    Ok((comm, Duration::from_millis((tick(11)? + tick(12)?) * 10)))
}

/// CPU time (user + system) this process has used so far, all threads.
pub(crate) fn cpu_time() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?;
    Ok(parse_stat(&stat)?.1)
}

/// The roles sharing this process, told apart by the names of their runtime's
/// threads (see [`crate::rig::Runtimes`]).
pub(crate) const ROLES: [&str; 4] = ["client", "fixture", "edge", "cloud"];

/// Calls `f` with the name and CPU time of each of this process's threads.
fn each_thread(mut f: impl FnMut(&str, Duration)) -> anyhow::Result<()> {
    let tasks = std::fs::read_dir("/proc/self/task").context("read /proc/self/task")?;
    for task in tasks {
        let path = task.context("read /proc/self/task")?.path().join("stat");
        // A thread may exit between listing and reading.
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        let (comm, cpu) = parse_stat(&stat)?;
        f(comm, cpu);
    }
    Ok(())
}

/// CPU time used so far by each of [`ROLES`]; threads that are not a role's
/// (the main thread, the bench's own runtime) count as the client.
pub(crate) fn cpu_by_role() -> anyhow::Result<[Duration; 4]> {
    let mut out = [Duration::ZERO; 4];
    each_thread(|comm, cpu| {
        let role = ROLES
            .iter()
            .position(|r| comm == format!("tb-{r}"))
            .unwrap_or(0);
        out[role] += cpu;
    })?;
    Ok(out)
}

/// CPU time used so far by the threads whose name starts with `prefix`
/// (Linux keeps the first 15 bytes of a thread's name).
pub(crate) fn cpu_of_threads(prefix: &str) -> anyhow::Result<Duration> {
    let mut out = Duration::ZERO;
    each_thread(|comm, cpu| {
        if comm.starts_with(prefix) {
            out += cpu;
        }
    })?;
    Ok(out)
}

/// The one-minute load average: how busy the shared machine was.
pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// What the report says about the machine.
#[derive(Debug)]
pub(crate) struct Machine {
    pub(crate) nproc: usize,
    pub(crate) cpu_model: String,
    pub(crate) kernel: String,
    pub(crate) mem_total_gib: f64,
}

impl Machine {
    /// Reads `/proc`; anything unreadable is reported as unknown rather than failing.
    pub(crate) fn probe() -> Self {
        let nproc = std::thread::available_parallelism().map_or(0, usize::from);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
        let mem_total_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
        Self {
            nproc,
            cpu_model,
            kernel,
            mem_total_gib,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let line = "42 (tb-edge x) S 1 2 3 4 5 6 7 8 9 10 123 45 0 0 20 0 1 0";
        let (comm, cpu) = parse_stat(line).expect("parse");
        assert_eq!(comm, "tb-edge x");
        assert_eq!(cpu, Duration::from_millis(1680));
        assert!(cpu_time().is_ok());
        assert!(cpu_by_role().is_ok());
        assert!(cpu_of_threads("tb-").is_ok());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let lat = Latency::from_samples(samples);
        assert_eq!(lat.p50_ms, 50.0);
        assert_eq!(lat.p99_ms, 99.0);
        assert_eq!(Latency::from_samples(Vec::new()).p99_ms, 0.0);
        let one = Latency::from_samples(vec![Duration::from_millis(7)]);
        assert_eq!((one.p50_ms, one.p99_ms), (7.0, 7.0));
    }
}
