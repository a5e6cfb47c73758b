//! The two hooks the data path runs at, behind one trait: native or generic
//! XDP (frames straight from the driver) and TC ingress (`sched_cls`, on the
//! kernel's socket buffer). The packet logic in `main.rs` is written once,
//! generic over [`Hook`]; what differs between the hooks lives here:
//!
//! - how the TCP/UDP checksum follows a NAT rewrite: XDP updates it in the
//!   frame (RFC 1624); TC asks the kernel (`bpf_l4_csum_replace`), which knows
//!   whether the checksum is complete or only the pseudo-header's part that a
//!   sender with TX checksum offload leaves for the device to finish
//!   (`CHECKSUM_PARTIAL`: every packet a local socket sends over a veth);
//! - how a frame is sent on: XDP_TX / XDP_REDIRECT, or `bpf_redirect` and
//!   `bpf_redirect_peer` (straight into a veth peer's ingress, skipping our
//!   side's egress path);
//! - how a frame is cut short (a reset), and what size the route lookup's MTU
//!   check uses (TC lets the kernel check the socket buffer, GSO included).
//!
//! Writes through packet pointers are the same on both hooks. On TC they keep
//! a `CHECKSUM_COMPLETE` socket buffer valid because every field the data path
//! writes directly is covered by a checksum it updates in the same frame (an
//! address by the IPv4 header's, a quoted packet by the ICMP message's); the
//! one exception, the L4 checksum's pseudo-header part, is left to the kernel's
//! helper, as the last write of the packet (it moves the packet, so no pointer
//! may be used after it).

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{
        bpf_check_mtu, bpf_l4_csum_replace, bpf_redirect, bpf_redirect_peer, bpf_skb_change_tail,
        bpf_skb_pull_data, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::{checksum, IFACE_F_PEER, IPPROTO_UDP, MAX_IFINDEX};

use crate::maps::IFACES;

/// What happens to the frame once the data path is done with it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// To the kernel's own stack.
    Pass,
    Drop,
    /// Forwarded out of the outcome's `ifindex` (the MACs are set).
    Out,
    /// Answered: sent back out of the interface it came in on (a reset, an
    /// echo reply).
    Bounce,
}

/// A verdict, the counter (`lb_common::counter`) it is counted under, and
/// the checksum update a rewrite left for the hook.
///
/// Every field is always written (no `Option` with a payload): a copy of a
/// partly undefined value may be lowered to a store of an unwritten register,
/// which the verifier refuses.
#[derive(Clone, Copy)]
pub struct Outcome {
    pub verdict: Verdict,
    /// Where `Verdict::Out` sends the frame.
    pub ifindex: u32,
    pub counter: u32,
    /// Meaningful when `fix.proto` is not 0.
    pub fix: L4Fix,
}

impl Outcome {
    #[inline(always)]
    pub const fn new(verdict: Verdict, counter: u32) -> Outcome {
        Outcome {
            verdict,
            ifindex: 0,
            counter,
            fix: L4Fix::NONE,
        }
    }

    /// Forwarded out of `ifindex`.
    #[inline(always)]
    pub const fn out(ifindex: u32, counter: u32) -> Outcome {
        Outcome {
            verdict: Verdict::Out,
            ifindex,
            counter,
            fix: L4Fix::NONE,
        }
    }

    /// The same outcome, with the packet's NAT rewrite to finish.
    #[inline(always)]
    pub const fn with_fix(self, fix: L4Fix) -> Outcome {
        Outcome { fix, ..self }
    }

    #[inline(always)]
    pub const fn pass(counter: u32) -> Outcome {
        Outcome::new(Verdict::Pass, counter)
    }

    #[inline(always)]
    pub const fn drop(counter: u32) -> Outcome {
        Outcome::new(Verdict::Drop, counter)
    }
}

/// The TCP/UDP checksum update a NAT rewrite owes: one address of the
/// pseudo-header and one port changed. Applied by the hook, last.
#[derive(Clone, Copy)]
pub struct L4Fix {
    /// Offset of the checksum field in the frame.
    pub offset: usize,
    pub proto: u8,
    pub old_addr: [u8; 4],
    pub new_addr: [u8; 4],
    pub old_port: [u8; 2],
    pub new_port: [u8; 2],
}

impl L4Fix {
    /// No update owed.
    pub const NONE: L4Fix = L4Fix {
        offset: 0,
        proto: 0,
        old_addr: [0; 4],
        new_addr: [0; 4],
        old_port: [0; 2],
        new_port: [0; 2],
    };
}

/// A hook the data path runs at.
pub trait Hook: EbpfContext {
    /// Start and end of the frame's directly readable bytes.
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole frame's length (on TC, more than the directly readable
    /// part when the payload lies in pages of its own).
    fn frame_len(&self) -> usize;
    /// The interface the frame arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// The length the route lookup's MTU check is given for an IPv4 packet of
    /// `tot_len` bytes; 0 lets the kernel check the packet itself.
    fn mtu_check_len(&self, tot_len: u16) -> u16;
    /// Whether the frame, as it will leave `ifindex` (which the route lookup
    /// found fits its MTU as a whole), also fits as segments: a GSO socket
    /// buffer is always "forwardable" to the lookup, but leaves as segments
    /// of its own size, which the egress MTU must take.
    /// `mtu`, when not 0, is the egress MTU already known.
    fn segments_fit(&self, ifindex: u32, mtu: u32) -> bool;
    /// Cuts the frame to its first `len` bytes; false if it cannot. Every
    /// packet pointer is invalid afterwards.
    fn truncate(&self, len: usize) -> bool;
    /// Applies the L4 checksum update of a NAT rewrite. Every packet pointer
    /// is invalid afterwards (on TC).
    fn fix_l4(&self, fix: &L4Fix);
    /// The hook's return code for the outcome.
    fn action(&self, o: &Outcome) -> i32;
}

impl Hook for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }

    #[inline(always)]
    fn mtu_check_len(&self, tot_len: u16) -> u16 {
        tot_len
    }

    #[inline(always)]
    fn segments_fit(&self, _ifindex: u32, _mtu: u32) -> bool {
        // A frame is its own only segment here; the lookup checked its length.
        true
    }

    #[inline(always)]
    fn truncate(&self, len: usize) -> bool {
        let have = XdpContext::data_end(self) - XdpContext::data(self);
        if have <= len {
            return true;
        }
        // SAFETY: shrinking the frame by what lies past `len`.
        unsafe { bpf_xdp_adjust_tail(self.ctx, -((have - len) as i32)) == 0 }
    }

    #[inline(always)]
    fn fix_l4(&self, f: &L4Fix) {
        let start = XdpContext::data(self);
        if start + f.offset + 2 > XdpContext::data_end(self) {
            return;
        }
        let c = (start + f.offset) as *mut [u8; 2];
        // SAFETY: the two bytes are inside the frame (checked above).
        unsafe {
            *c = if f.proto == IPPROTO_UDP {
                let c = checksum::udp_replace4(*c, f.old_addr, f.new_addr);
                checksum::udp_replace2(c, f.old_port, f.new_port)
            } else {
                let c = checksum::replace4(*c, f.old_addr, f.new_addr);
                checksum::replace2(c, f.old_port, f.new_port)
            };
        }
    }

    #[inline(always)]
    fn action(&self, o: &Outcome) -> i32 {
        (match o.verdict {
            Verdict::Pass => xdp_action::XDP_PASS,
            Verdict::Drop => xdp_action::XDP_DROP,
            Verdict::Out if o.ifindex == Hook::ingress_ifindex(self) => xdp_action::XDP_TX,
            // SAFETY: plain helper call; it returns XDP_REDIRECT or XDP_ABORTED.
            Verdict::Out => unsafe { bpf_redirect(o.ifindex, 0) as u32 },
            // By redirect rather than XDP_TX: the same wire, but a redirect
            // flushes at once on every driver, while veth holds XDP_TX frames
            // until its peer's next poll unless the peer runs XDP itself
            // (seen here: resets arriving seconds late). Answers are rare.
            // SAFETY: as above.
            Verdict::Bounce => unsafe { bpf_redirect(Hook::ingress_ifindex(self), 0) as u32 },
        }) as i32
    }
}

/// `bpf_l4_csum_replace` flags: the changed field is part of the
/// pseudo-header; a UDP checksum of 0 means "none" and stays so.
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
/// `bpf_check_mtu` flag: check a GSO packet's segments, not its whole length.
const BPF_MTU_CHK_SEGS: u64 = 1;

/// Headers the data path may read, made directly readable when the socket
/// buffer holds fewer in its linear part: Ethernet, IPv4 with options, and
/// an ICMP error quoting IPv4 with options and 8 bytes of TCP/UDP.
pub const TC_HEADERS: u32 = 14 + 60 + 8 + 60 + 8;

/// Whether the kernel took a VLAN tag off the frame before TC saw it: the
/// data path does not handle tagged traffic (at XDP it sees the tag and
/// passes the frame), so it is passed here too.
#[inline(always)]
pub fn tc_vlan_tagged(ctx: &TcContext) -> bool {
    // SAFETY: the context is the program's own __sk_buff.
    unsafe { (*ctx.skb.skb).vlan_present != 0 }
}

/// Makes the first [`TC_HEADERS`] bytes (or the whole packet, if shorter)
/// directly readable. Almost always a no-op: a socket buffer's headers are
/// linear.
#[inline(always)]
pub fn tc_pull_headers(ctx: &TcContext) {
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let len = ctx.len();
    if linear < len && linear < TC_HEADERS {
        let want = if len < TC_HEADERS { len } else { TC_HEADERS };
        // SAFETY: plain helper call; on failure the parser sees the shorter
        // linear part and passes or drops by its rules.
        unsafe { bpf_skb_pull_data(ctx.skb.skb, want) };
    }
}

impl Hook for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context is the program's own __sk_buff.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn mtu_check_len(&self, tot_len: u16) -> u16 {
        // A GSO packet is checked by its segments (`segments_fit`); for it
        // the lookup checks nothing.
        // SAFETY: the context is the program's own __sk_buff.
        if unsafe { (*self.skb.skb).gso_size } != 0 {
            0
        } else {
            tot_len
        }
    }

    #[inline(always)]
    fn segments_fit(&self, ifindex: u32, mtu: u32) -> bool {
        // SAFETY: the context is the program's own __sk_buff.
        let gso_size = unsafe { (*self.skb.skb).gso_size };
        // A segment is its payload plus at most 120 bytes of IPv4 and TCP
        // headers: when that fits the known MTU, no helper call is needed.
        if gso_size == 0 || (mtu != 0 && gso_size + 120 <= mtu) {
            return true;
        }
        let mut mtu_len: u32 = 0;
        // SAFETY: plain helper call; with BPF_MTU_CHK_SEGS the kernel checks
        // the length of each segment a GSO packet will be cut into.
        unsafe {
            bpf_check_mtu(
                self.skb.skb as *mut _,
                ifindex,
                &mut mtu_len,
                0,
                BPF_MTU_CHK_SEGS,
            ) == 0
        }
    }

    #[inline(always)]
    fn truncate(&self, len: usize) -> bool {
        // SAFETY: plain helper call.
        unsafe { bpf_skb_change_tail(self.skb.skb, len as u32, 0) == 0 }
    }

    #[inline(always)]
    fn fix_l4(&self, f: &L4Fix) {
        let udp = if f.proto == IPPROTO_UDP {
            BPF_F_MARK_MANGLED_0
        } else {
            0
        };
        // SAFETY: plain helper calls on the program's own socket buffer; the
        // kernel checks the offset. The values are the fields' bytes as they
        // lie in the packet, as the helper expects.
        unsafe {
            bpf_l4_csum_replace(
                self.skb.skb,
                f.offset as u32,
                u32::from_ne_bytes(f.old_addr) as u64,
                u32::from_ne_bytes(f.new_addr) as u64,
                BPF_F_PSEUDO_HDR | udp | 4,
            );
            // A VIP port equal to the backend's (80 to 80) needs no second
            // call: each is a real function call.
            if f.old_port != f.new_port {
                bpf_l4_csum_replace(
                    self.skb.skb,
                    f.offset as u32,
                    u16::from_ne_bytes(f.old_port) as u64,
                    u16::from_ne_bytes(f.new_port) as u64,
                    udp | 2,
                );
            }
        }
    }

    #[inline(always)]
    fn action(&self, o: &Outcome) -> i32 {
        match o.verdict {
            Verdict::Pass => TC_ACT_OK,
            Verdict::Drop => TC_ACT_SHOT,
            Verdict::Out => tc_send(o.ifindex),
            Verdict::Bounce => tc_send(Hook::ingress_ifindex(self)),
        }
    }
}

/// Sends out of `ifindex`: into its veth peer's ingress when the daemon says
/// the peer is the next hop and lives in another namespace (no egress path,
/// no backlog queue), else through the device's egress.
#[inline(always)]
fn tc_send(ifindex: u32) -> i32 {
    let peer = ifindex < MAX_IFINDEX && IFACES.get(ifindex).is_some_and(|f| *f & IFACE_F_PEER != 0);
    // SAFETY: plain helper calls; they return TC_ACT_REDIRECT or TC_ACT_SHOT.
    unsafe {
        if peer {
            bpf_redirect_peer(ifindex, 0) as i32
        } else {
            bpf_redirect(ifindex, 0) as i32
        }
    }
}
