//! Per-CPU counters: no atomics and no contention on the packet path.

use lb_common::Traffic;

use crate::maps::{BACKEND_TRAFFIC, COUNTERS};

/// Counts one packet under `outcome` (a `lb_common::counter` index).
#[inline(always)]
pub fn count(outcome: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(outcome) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

/// Which direction a packet of a flow travelled.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to backend; `new_flow` when this packet created the flow.
    Forward { new_flow: bool },
    /// Backend to client.
    Reply,
}

#[inline(always)]
fn add(t: *mut Traffic, dir: Direction, sent: bool, bytes: u64) {
    // SAFETY: per-CPU slot, as above.
    let t = unsafe { &mut *t };
    match dir {
        Direction::Forward { new_flow } => {
            if sent {
                t.packets += 1;
                t.bytes += bytes;
            }
            if new_flow {
                t.new_flows += 1;
            }
        }
        Direction::Reply if sent => {
            t.reply_packets += 1;
            t.reply_bytes += bytes;
        }
        Direction::Reply => {}
    }
}

/// Adds one packet of `bytes` to its backend's traffic counters: the one
/// counter update of a forwarded packet (`sent`: the data path sent it; a
/// packet it rewrote and passed to the kernel to send is counted under its
/// outcome instead). The daemon derives the service's traffic and the
/// `FORWARDED` and `REPLIES` totals from these.
#[inline(always)]
pub fn traffic(backend: u32, dir: Direction, sent: bool, bytes: u64) {
    if let Some(t) = BACKEND_TRAFFIC.get_ptr_mut(backend) {
        add(t, dir, sent, bytes);
    }
}

/// At most this many data-path log lines per second per CPU (`verbose-logs`):
/// a flood of bad packets must not become a flood of log lines.
#[cfg(feature = "verbose-logs")]
const LOG_LINES_PER_SEC: u64 = 10;

/// Per-CPU log budget: [current second, lines logged in it].
#[cfg(feature = "verbose-logs")]
#[aya_ebpf::macros::map(name = "LOG_BUDGET")]
static LOG_BUDGET: aya_ebpf::maps::PerCpuArray<[u64; 2]> =
    aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);

/// Whether one more log line fits this second's budget (and spends it).
#[cfg(feature = "verbose-logs")]
#[inline(always)]
pub fn log_allowed() -> bool {
    let Some(b) = LOG_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: plain helper call; b is this CPU's slot.
    unsafe {
        let now = aya_ebpf::helpers::bpf_ktime_get_ns() / 1_000_000_000;
        if (*b)[0] != now {
            (*b)[0] = now;
            (*b)[1] = 0;
        }
        if (*b)[1] >= LOG_LINES_PER_SEC {
            return false;
        }
        (*b)[1] += 1;
    }
    true
}
