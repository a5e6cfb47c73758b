//! The data path's clock. A flow's last-seen time is the kernel's tick
//! counter (`bpf_jiffies64()`: inlined by the JIT, where a nanosecond clock
//! is a helper call on every packet). The daemon reads it through
//! `/proc/timer_list`, which prints the monotonic clock and the tick counter
//! together: read twice, 100 ms apart, that gives the tick rate (the
//! kernel's `CONFIG_HZ`); after that, ticks follow from the monotonic clock.

use std::{
    io::{BufRead, BufReader},
    sync::OnceLock,
    time::Duration,
};

/// Tick rates Linux is built with.
const RATES: [u64; 4] = [100, 250, 300, 1000];

/// (ticks, monotonic ns) at one instant, and the tick rate.
struct Calibration {
    ticks: u64,
    at_ns: u64,
    hz: u64,
}

static CALIBRATION: OnceLock<Calibration> = OnceLock::new();

/// The monotonic clock and the tick counter, from `/proc/timer_list`. The
/// file is generated as it is read: one read into a buffer large enough for
/// all of it keeps its clock line and its tick line close in time (read in
/// small chunks, under load, the two were seen 100 ms apart).
fn sample() -> Option<(u64, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open("/proc/timer_list").ok()?;
    let mut buf = vec![0u8; 4 << 20];
    let n = f.read(&mut buf).ok()?;
    let mut now_ns = None;
    for line in BufReader::new(&buf[..n]).lines() {
        let line = line.ok()?;
        if let Some(rest) = line.strip_prefix("now at ") {
            now_ns = rest.split_whitespace().next()?.parse().ok();
        } else if let Some(rest) = line.strip_prefix("jiffies: ") {
            return Some((rest.trim().parse().ok()?, now_ns?));
        }
    }
    None
}

fn calibration() -> &'static Calibration {
    CALIBRATION.get_or_init(|| {
        let fallback = || Calibration {
            ticks: 0,
            at_ns: monotonic_ns(),
            hz: 250,
        };
        let Some((j0, t0)) = sample() else {
            tracing::warn!("cannot read /proc/timer_list: flow idle times are approximate");
            return fallback();
        };
        std::thread::sleep(Duration::from_millis(100));
        let Some((j1, t1)) = sample() else {
            return fallback();
        };
        let measured = (j1 - j0) * 1_000_000_000 / (t1 - t0).max(1);
        let hz = RATES
            .into_iter()
            .min_by_key(|r| r.abs_diff(measured))
            .unwrap_or(250);
        Calibration {
            ticks: j1,
            at_ns: t1,
            hz,
        }
    })
}

/// The kernel's tick counter now (what `bpf_jiffies64()` returns).
pub fn jiffies_now() -> u64 {
    let c = calibration();
    c.ticks + (monotonic_ns().saturating_sub(c.at_ns)) * c.hz / 1_000_000_000
}

/// The kernel's tick rate (ticks a second).
pub fn hz() -> u64 {
    calibration().hz
}

/// `d` in ticks.
pub fn jiffies(d: Duration) -> u64 {
    d.as_nanos() as u64 * calibration().hz / 1_000_000_000
}

/// CLOCK_MONOTONIC in nanoseconds (the clock of `bpf_ktime_get_ns()`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_follow_the_kernel() {
        let _ = calibration();
        let before = jiffies_now();
        let Some((kernel, _)) = sample() else {
            panic!("/proc/timer_list is unreadable: the daemon needs it (root)");
        };
        let after = jiffies_now();
        // The kernel's counter, read between our two: within a tenth of a
        // second of that window.
        let slack = calibration().hz / 10;
        assert!(
            before.saturating_sub(slack) <= kernel && kernel <= after + slack,
            "ours {before}..{after} vs the kernel's {kernel}"
        );
        assert!(RATES.contains(&calibration().hz));
    }
}
