//! Address and port rewriting. The IPv4 header's checksum is updated here
//! (RFC 1624); the TCP/UDP checksum's update is handed back as an [`L4Fix`]
//! for the hook to apply, last (see `hook.rs` for why).

use lb_common::checksum;
use network_types::ip::Ipv4Hdr;

use crate::{
    hook::L4Fix,
    parse::{Packet, L4},
};

/// Decrements the TTL as a router does, or returns false when it would expire.
#[inline(always)]
pub fn decrement_ttl(ip: *mut Ipv4Hdr) -> bool {
    // SAFETY: the caller parsed ip as inside the frame.
    unsafe {
        let ttl = (*ip).ttl;
        if ttl <= 1 {
            return false;
        }
        // TTL is the high byte of the 16-bit word it shares with the protocol.
        let proto = (*ip).proto;
        (*ip).ttl = ttl - 1;
        (*ip).check = checksum::replace2((*ip).check, [ttl, proto], [ttl - 1, proto]);
    }
    true
}

/// Rewrites the destination (client to backend: DNAT).
#[inline(always)]
pub fn rewrite_dst(p: &Packet, addr: [u8; 4], port: [u8; 2]) -> L4Fix {
    // SAFETY: parse() checked every header is inside the frame.
    unsafe {
        let old_addr = (*p.ip).dst_addr;
        (*p.ip).dst_addr = addr;
        (*p.ip).check = checksum::replace4((*p.ip).check, old_addr, addr);
        let old_port = match p.l4 {
            L4::Tcp(t) => core::mem::replace(&mut (*t).dest, port),
            L4::Udp(u) => core::mem::replace(&mut (*u).dst, port),
        };
        fix(p, old_addr, addr, old_port, port)
    }
}

/// Makes the (rewritten) TCP segment a reset: RST, with ACK if it carried
/// one, nothing else; its sequence number is the client's, the one the
/// backend expects next. Its payload stays: a reset's data is ignored.
/// `fix` takes the flags' change along with the port's, as one word.
#[inline(always)]
pub fn into_reset(p: &Packet, fix: &mut L4Fix) {
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    let L4::Tcp(t) = p.l4 else {
        return;
    };
    // SAFETY: parse() checked the TCP header is inside the frame; its data
    // offset and flags are the 16-bit word at byte 12.
    unsafe {
        let w = (t as *mut u8).add(12) as *mut [u8; 2];
        let old = *w;
        let new = [old[0], if old[1] & ACK != 0 { RST | ACK } else { RST }];
        *w = new;
        fix.new_port = checksum::merge2(fix.old_port, fix.new_port, old, new);
        fix.old_port = [0, 0];
    }
}

/// Rewrites the source (backend to client: the reply comes from the VIP again).
#[inline(always)]
pub fn rewrite_src(p: &Packet, addr: [u8; 4], port: [u8; 2]) -> L4Fix {
    // SAFETY: as above.
    unsafe {
        let old_addr = (*p.ip).src_addr;
        (*p.ip).src_addr = addr;
        (*p.ip).check = checksum::replace4((*p.ip).check, old_addr, addr);
        let old_port = match p.l4 {
            L4::Tcp(t) => core::mem::replace(&mut (*t).source, port),
            L4::Udp(u) => core::mem::replace(&mut (*u).src, port),
        };
        fix(p, old_addr, addr, old_port, port)
    }
}

#[inline(always)]
fn fix(
    p: &Packet,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> L4Fix {
    L4Fix {
        offset: p.l4_check_offset(),
        proto: p.proto,
        old_addr,
        new_addr,
        old_port,
        new_port,
    }
}
