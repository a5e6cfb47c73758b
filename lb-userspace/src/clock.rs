//! The data path's clock. A flow's last-seen time is the kernel's tick
//! counter (`bpf_jiffies64()`: inlined by the JIT, where a nanosecond clock
//! is a helper call on every packet). The daemon reads it in
//! `/proc/timer_list`, paired with the monotonic clock around that read:
//! read twice, 100 ms apart, that gives the tick rate (the kernel's
//! `CONFIG_HZ`); after that, ticks follow from the monotonic clock.

use std::{sync::OnceLock, time::Duration};

/// Tick rates Linux is built with.
const RATES: [u64; 4] = [100, 250, 300, 1000];

/// (ticks, monotonic ns) at one instant, and the tick rate.
struct Calibration {
    ticks: u64,
    at_ns: u64,
    hz: u64,
}

static CALIBRATION: OnceLock<Calibration> = OnceLock::new();

/// The tick counter and the monotonic clock at one instant, from
/// `/proc/timer_list`. The file is generated as it is read, a record per
/// `read` (a single read of any size returned only its 82-byte header here),
/// so it is read until the `jiffies:` line; that value is paired with the
/// monotonic clock around the read that brought it, not with the file's own
/// `now at` line, which was printed reads earlier (under load, 100 ms
/// earlier was seen).
fn sample() -> Option<(u64, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open("/proc/timer_list").ok()?;
    let mut buf = vec![0u8; 1 << 16];
    let mut text = Vec::new();
    loop {
        let before = monotonic_ns();
        let n = f.read(&mut buf).ok()?;
        let after = monotonic_ns();
        if n == 0 {
            return None;
        }
        text.extend_from_slice(&buf[..n]);
        if let Some(ticks) = jiffies_line(&text) {
            return Some((ticks, before + (after - before) / 2));
        }
    }
}

/// The value of the first whole `jiffies: N` line of `text`.
fn jiffies_line(text: &[u8]) -> Option<u64> {
    let mut lines = text.split(|b| *b == b'\n').peekable();
    while let Some(line) = lines.next() {
        // A line is whole when a newline ended it (another piece follows).
        lines.peek()?;
        if let Some(rest) = line.strip_prefix(b"jiffies: ") {
            return std::str::from_utf8(rest).ok()?.trim().parse().ok();
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
            panic!("no tick counter in /proc/timer_list: the daemon needs it (root)");
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

    #[test]
    fn the_jiffies_line_is_taken_only_when_whole() {
        let text = b"now at 1 nsecs\n  .idle_jiffies   : 7\njiffies: 4303834731\n";
        assert_eq!(jiffies_line(text), Some(4_303_834_731));
        assert_eq!(jiffies_line(b"jiffies: 43038"), None, "cut mid-number");
        assert_eq!(jiffies_line(b"  .last_jiffies   : 9\n"), None);
    }
}
