//! Address and port rewriting with incremental checksum updates (RFC 1624).

use lb_common::checksum;
use network_types::ip::Ipv4Hdr;

use crate::parse::{Packet, L4};

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
pub fn rewrite_dst(p: &Packet, addr: [u8; 4], port: [u8; 2]) {
    // SAFETY: parse() checked every header is inside the frame.
    unsafe {
        let old = (*p.ip).dst_addr;
        (*p.ip).dst_addr = addr;
        (*p.ip).check = checksum::replace4((*p.ip).check, old, addr);
        match p.l4 {
            L4::Tcp(t) => {
                let c = checksum::replace4((*t).check, old, addr);
                (*t).check = checksum::replace2(c, (*t).dest, port);
                (*t).dest = port;
            }
            L4::Udp(u) => {
                let c = checksum::udp_replace4((*u).check, old, addr);
                (*u).check = checksum::udp_replace2(c, (*u).dst, port);
                (*u).dst = port;
            }
        }
    }
}

/// Rewrites the source (backend to client: the reply comes from the VIP again).
#[inline(always)]
pub fn rewrite_src(p: &Packet, addr: [u8; 4], port: [u8; 2]) {
    // SAFETY: as above.
    unsafe {
        let old = (*p.ip).src_addr;
        (*p.ip).src_addr = addr;
        (*p.ip).check = checksum::replace4((*p.ip).check, old, addr);
        match p.l4 {
            L4::Tcp(t) => {
                let c = checksum::replace4((*t).check, old, addr);
                (*t).check = checksum::replace2(c, (*t).source, port);
                (*t).source = port;
            }
            L4::Udp(u) => {
                let c = checksum::udp_replace4((*u).check, old, addr);
                (*u).check = checksum::udp_replace2(c, (*u).src, port);
                (*u).src = port;
            }
        }
    }
}
