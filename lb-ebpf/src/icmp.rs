//! ICMP: echo requests to a VIP are answered in place; errors that quote a
//! packet of a tracked flow (fragmentation needed, port unreachable, time
//! exceeded...) are rewritten so the end that sent the quoted packet
//! recognises it, and forwarded there.
//!
//! - An error addressed to a VIP quotes a reply the client could not take
//!   (VIP -> client): it goes to the flow's backend, the VIP in it (outer
//!   destination, quoted source) replaced by the backend.
//! - An error on its way to a client that quotes a packet we sent to a backend
//!   (client -> backend): the quoted destination becomes the VIP again, and so
//!   does the outer source when the backend itself sent the error.
//!
//! Every checksum that covers a rewritten field is updated incrementally: the
//! outer IPv4 header's, the quoted IPv4 header's, the quoted TCP/UDP header's
//! (when the quote reaches it) and the ICMP message's.

use lb_common::{checksum, counter, firewall::Firewall, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use network_types::ip::Ipv4Hdr;

use crate::{
    backend_ref, firewall,
    forward::{self, Kind},
    hook::{Hook, Outcome, Verdict},
    maps::{CONNTRACK, REVERSE},
    nat,
    parse::{ptr_at, Icmp},
};

const ECHO_REPLY: u8 = 0;
const DEST_UNREACH: u8 = 3;
const ECHO_REQUEST: u8 = 8;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;
/// TTL of the echo replies the data path sends (Linux's default).
const REPLY_TTL: u8 = 64;

/// Handles one ICMP message.
#[inline(always)]
pub fn handle<H: Hook>(ctx: &H, fw: &Firewall, m: &Icmp) -> Outcome {
    // SAFETY: parse() checked both headers are inside the frame.
    let (kind, dst) = unsafe { ((*m.icmp)[0], (*m.ip).dst_addr) };
    let to_vip = firewall::is_vip(dst);
    match kind {
        ECHO_REQUEST if to_vip && firewall::echo_reply(fw) => {
            echo_reply(m);
            return Outcome::new(Verdict::Bounce, counter::ICMP_ECHO_REPLIED);
        }
        DEST_UNREACH | TIME_EXCEEDED | PARAMETER_PROBLEM => {
            if let Some(done) = error(ctx, m, to_vip) {
                return done;
            }
        }
        _ => {}
    }
    if to_vip && firewall::closed(fw, dst) {
        return Outcome::drop(counter::DROP_ICMP);
    }
    Outcome::pass(counter::PASS_OTHER_PROTO)
}

/// Turns an echo request into its reply, to be sent back out of the
/// interface it came in on.
#[inline(always)]
fn echo_reply(m: &Icmp) {
    // SAFETY: parse() checked every header written here is inside the frame.
    unsafe {
        let ip = m.ip;
        let (src, dst) = ((*ip).src_addr, (*ip).dst_addr);
        // Swapping the addresses leaves the header's sum unchanged.
        (*ip).src_addr = dst;
        (*ip).dst_addr = src;
        let (ttl, proto) = ((*ip).ttl, (*ip).proto);
        (*ip).ttl = REPLY_TTL;
        (*ip).check = checksum::replace2((*ip).check, [ttl, proto], [REPLY_TTL, proto]);
        let h = &mut *m.icmp;
        let check = checksum::replace2([h[2], h[3]], [h[0], h[1]], [ECHO_REPLY, h[1]]);
        h[0] = ECHO_REPLY;
        [h[2], h[3]] = check;
        let eth = m.eth;
        core::mem::swap(&mut (*eth).src_addr, &mut (*eth).dst_addr);
    }
}

/// The packet an error quotes: its IPv4 header and the first 8 bytes of its
/// TCP/UDP header (ports, and the UDP checksum), all inside the error's packet.
struct Quote {
    ip: *mut Ipv4Hdr,
    l4: *mut [u8; 8],
    l4_offset: usize,
    proto: u8,
}

#[inline(always)]
fn quote<H: Hook>(ctx: &H, m: &Icmp) -> Option<Quote> {
    let offset = m.offset + 8;
    let ip = ptr_at::<Ipv4Hdr, _>(ctx, offset)?;
    // SAFETY: ip is inside the frame.
    let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
    let ihl = ((vihl & 0x0f) as usize) << 2;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    let l4_offset = offset + ihl;
    if l4_offset + 8 > m.end {
        return None;
    }
    let l4 = ptr_at::<[u8; 8], _>(ctx, l4_offset)?;
    Some(Quote {
        ip,
        l4,
        l4_offset,
        proto,
    })
}

/// An ICMP error about a tracked flow, rewritten and forwarded; None if it is
/// about no flow of ours (the caller passes or drops it).
#[inline(always)]
fn error<H: Hook>(ctx: &H, m: &Icmp, to_vip: bool) -> Option<Outcome> {
    let q = quote(ctx, m)?;
    // SAFETY: quote() checked the quoted headers are inside the frame.
    let (qsrc, qdst, qsport, qdport) = unsafe {
        let l4 = &*q.l4;
        (
            (*q.ip).src_addr,
            (*q.ip).dst_addr,
            [l4[0], l4[1]],
            [l4[2], l4[3]],
        )
    };
    // SAFETY: parse() checked the IPv4 header is inside the frame.
    let (src, dst) = unsafe { ((*m.ip).src_addr, (*m.ip).dst_addr) };
    // The quoted packet's flow, seen from the other end: the client's flow
    // if it quotes our reply VIP -> client, the reply table's entry if it
    // quotes a packet we sent client -> backend.
    let key = lb_common::FlowKey::new(qdst, qsrc, qdport, qsport, q.proto);
    if to_vip {
        // SAFETY: the value is copied out at once.
        let flow = unsafe { CONNTRACK.get(key).copied() }?;
        let b = backend_ref(flow.backend).filter(|b| b.generation == flow.generation)?;
        let route = forward::lookup(
            ctx,
            m.ip,
            &lb_common::FlowKey::new(src, b.addr, [0; 2], [0; 2], IPPROTO_ICMP),
        );
        if route.kind == Kind::Local {
            return Some(Outcome::pass(counter::PASS_OTHER_PROTO));
        }
        if !nat::decrement_ttl(m.ip) {
            return Some(Outcome::pass(counter::PASS_TTL_EXPIRED));
        }
        // SAFETY: as above.
        unsafe {
            (*m.ip).dst_addr = b.addr;
            (*m.ip).check = checksum::replace4((*m.ip).check, dst, b.addr);
        }
        rewrite_quote(ctx, m, &q, true, b.addr, b.port);
        return Some(forward::send(m.eth, &route, counter::ICMP_TO_BACKEND));
    }
    // SAFETY: the value is copied out at once.
    let rev = unsafe { REVERSE.get(key).copied() }?;
    let new_src = if src == qdst { rev.vip } else { src };
    let route = forward::lookup(
        ctx,
        m.ip,
        &lb_common::FlowKey::new(new_src, dst, [0; 2], [0; 2], IPPROTO_ICMP),
    );
    if route.kind == Kind::Local {
        return Some(Outcome::pass(counter::PASS_OTHER_PROTO));
    }
    if !nat::decrement_ttl(m.ip) {
        return Some(Outcome::pass(counter::PASS_TTL_EXPIRED));
    }
    // SAFETY: as above.
    unsafe {
        (*m.ip).src_addr = new_src;
        (*m.ip).check = checksum::replace4((*m.ip).check, src, new_src);
    }
    rewrite_quote(ctx, m, &q, false, rev.vip, rev.vport);
    Some(forward::send(m.eth, &route, counter::ICMP_TO_CLIENT))
}

/// Rewrites one end of the quoted packet (its source if `source`, else its
/// destination) to `addr`:`port`, updating the quoted IPv4 and TCP/UDP
/// checksums and the ICMP checksum, which covers them all.
#[inline(always)]
fn rewrite_quote<H: Hook>(
    ctx: &H,
    m: &Icmp,
    q: &Quote,
    source: bool,
    addr: [u8; 4],
    port: [u8; 2],
) {
    let check_offset = q.l4_offset + if q.proto == IPPROTO_TCP { 16 } else { 6 };
    let l4_check = if check_offset + 2 <= m.end {
        ptr_at::<[u8; 2], _>(ctx, check_offset)
    } else {
        None
    };
    // SAFETY: parse() and quote() checked every header written here is inside
    // the frame, and ptr_at() the quoted L4 checksum.
    unsafe {
        let ip = q.ip;
        let old_addr = if source {
            (*ip).src_addr
        } else {
            (*ip).dst_addr
        };
        let old_ip_check = (*ip).check;
        if source {
            (*ip).src_addr = addr;
        } else {
            (*ip).dst_addr = addr;
        }
        (*ip).check = checksum::replace4(old_ip_check, old_addr, addr);
        let h = &mut *m.icmp;
        let mut icmp_check = checksum::replace4([h[2], h[3]], old_addr, addr);
        icmp_check = checksum::replace2(icmp_check, old_ip_check, (*ip).check);
        let l4 = &mut *q.l4;
        let at = if source { 0 } else { 2 };
        let old_port = [l4[at], l4[at + 1]];
        [l4[at], l4[at + 1]] = port;
        icmp_check = checksum::replace2(icmp_check, old_port, port);
        if let Some(c) = l4_check {
            let old = *c;
            let new = if q.proto == IPPROTO_TCP {
                checksum::replace2(checksum::replace4(old, old_addr, addr), old_port, port)
            } else {
                checksum::udp_replace2(checksum::udp_replace4(old, old_addr, addr), old_port, port)
            };
            *c = new;
            icmp_check = checksum::replace2(icmp_check, old, new);
        }
        [h[2], h[3]] = icmp_check;
    }
}
