//! BPF_PROG_TEST_RUN on crafted frames, in a namespace whose FIB and static
//! neighbours make every route lookup's answer (and so every output byte)
//! known. Shared by the kernel suite and `cargo xtask bench`.
//!
//! In namespace `x`: `x0` (02:00:00:00:01:01, 10.0.1.1/24) faces the client
//! 10.0.1.2 (02:00:00:00:01:02); `x1` (02:00:00:00:02:01, 10.0.2.1/24) faces
//! the backends 10.0.2.11 and 10.0.2.12 (02:00:00:00:02:11, :12).

use std::{net::Ipv4Addr, time::Duration};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};

use crate::netns::{veth, Netns};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
pub const B1: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 11);
pub const B2: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 12);
pub const X0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const X1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
pub const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x11];
pub const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x12];

/// XDP actions, as the program returns them.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// TC actions, as the program returns them.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// What the TC program returns where the XDP program returns `xdp`: both
/// ways of sending a frame on are a redirect at TC.
pub fn tc_action_of(xdp: u32) -> u32 {
    match xdp {
        XDP_PASS => TC_ACT_OK,
        XDP_DROP => TC_ACT_SHOT,
        XDP_TX | XDP_REDIRECT => TC_ACT_REDIRECT,
        other => panic!("no TC action for XDP action {other}"),
    }
}

pub struct TestRunNet {
    pub x: Netns,
    _y: Netns,
}

impl TestRunNet {
    /// Builds it; `tag` makes the namespace names unique (keep it short).
    pub fn new(tag: &str) -> TestRunNet {
        let x = Netns::new(&format!("{tag}x"));
        let y = Netns::new(&format!("{tag}y"));
        veth(&x, "x0", &y, "y0");
        veth(&x, "x1", &y, "y1");
        x.ip(&["link", "set", "x0", "address", "02:00:00:00:01:01"]);
        x.ip(&["link", "set", "x1", "address", "02:00:00:00:02:01"]);
        x.ip(&["addr", "add", "10.0.1.1/24", "dev", "x0"]);
        x.ip(&["addr", "add", "10.0.2.1/24", "dev", "x1"]);
        for (addr, mac, dev) in [
            ("10.0.1.2", "02:00:00:00:01:02", "x0"),
            ("10.0.2.11", "02:00:00:00:02:11", "x1"),
            ("10.0.2.12", "02:00:00:00:02:12", "x1"),
        ] {
            x.ip(&[
                "neigh",
                "replace",
                addr,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        x.sysctl("net.ipv4.ip_forward", "1");
        TestRunNet { x, _y: y }
    }
}

/// Runs `prog` on `frame` as if received on `ifindex`, `repeat` times (the
/// kernel reuses its own output as the next input when repeat > 1). Returns
/// the action, the output frame, and the kernel's average time per run.
pub fn run(
    prog: &mut Xdp,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<(u32, Vec<u8>, Duration), String> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    run_with(prog, frame, &ctx, repeat)
}

/// One test run of `prog` on `frame` with context `ctx`.
fn run_with<P>(
    prog: &mut P,
    frame: &[u8],
    ctx: &[u8],
    repeat: u32,
) -> Result<(u32, Vec<u8>, Duration), String>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 512];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(ctx),
        repeat,
        ..Default::default()
    };
    let r = prog.test_run(opts).map_err(|e| format!("{e:#}"))?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out, r.duration))
}

/// What the XDP program returns where the TC program returns `tc` (a
/// redirect read as XDP_REDIRECT, which is what the XDP program returns for
/// everything but forwarding out of the interface a frame came in on); an
/// action TC has no XDP twin for comes back as 1000 + it, matching nothing.
pub fn xdp_action_of(tc: u32) -> u32 {
    match tc {
        TC_ACT_OK => XDP_PASS,
        TC_ACT_SHOT => XDP_DROP,
        TC_ACT_REDIRECT => XDP_REDIRECT,
        other => 1000 + other,
    }
}

/// Like [`run`], for the TC program: the frame arrives at TC ingress of
/// `ifindex` (a linear socket buffer, its checksum state `CHECKSUM_NONE`).
pub fn run_tc(
    prog: &mut SchedClassifier,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<(u32, Vec<u8>, Duration), String> {
    // struct __sk_buff (192 bytes): ingress_ifindex at 36, ifindex at 40;
    // everything else zero, as the kernel requires of most fields.
    let mut ctx = vec![0u8; 192];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    run_with(prog, frame, &ctx, repeat)
}
