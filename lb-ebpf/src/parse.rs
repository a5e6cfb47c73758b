//! Bounds-checked header parsing: Ethernet, IPv4 (with options), TCP, UDP.
//!
//! The rules (also in the README):
//! - not IPv4 (ARP, IPv6, VLAN-tagged, or shorter than an Ethernet header): pass;
//! - an IPv4 header that is truncated, has IHL < 5, a version other than 4, or a
//!   total length that does not fit the frame or the headers: drop (malformed);
//! - a fragment (MF set or offset non-zero): pass, the data path does not reassemble;
//! - neither TCP, UDP nor ICMP: pass (unless the firewall drops it, see main.rs);
//! - a truncated TCP/UDP/ICMP header or a TCP data offset < 5: drop (malformed).
//!
//! IP options are carried through untouched: the L4 header is found after them.

use lb_common::{counter, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

use crate::hook::Hook;

use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

/// A pointer to a `T` at `offset` into the frame, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T, H: Hook>(ctx: &H, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The L4 header of a parsed packet.
pub enum L4 {
    Tcp(*mut TcpHdr),
    Udp(*mut UdpHdr),
}

/// A TCP or UDP over IPv4 packet whose headers are all inside the frame.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub l4: L4,
    /// Offset of the TCP/UDP header in the frame.
    pub l4_off: usize,
    pub proto: u8,
}

impl Packet {
    /// Source and destination ports, network byte order.
    #[inline(always)]
    pub fn ports(&self) -> ([u8; 2], [u8; 2]) {
        // SAFETY: parse() checked that the header is inside the frame.
        unsafe {
            match self.l4 {
                L4::Tcp(t) => ((*t).source, (*t).dest),
                L4::Udp(u) => ((*u).src, (*u).dst),
            }
        }
    }

    /// The IPv4 header's Don't Fragment bit.
    #[inline(always)]
    pub fn dont_fragment(&self) -> bool {
        // SAFETY: parse() checked that the header is inside the frame.
        unsafe { u16::from_be_bytes((*self.ip).frags) & IP_DF != 0 }
    }

    /// Offset of the TCP/UDP checksum in the frame.
    #[inline(always)]
    pub fn l4_check_offset(&self) -> usize {
        match self.l4 {
            L4::Tcp(_) => self.l4_off + 16,
            L4::Udp(_) => self.l4_off + 6,
        }
    }

    /// FIN or RST: the sender is ending the connection.
    #[inline(always)]
    pub fn is_tcp_close(&self) -> bool {
        match self.l4 {
            // SAFETY: parse() checked that the header is inside the frame.
            L4::Tcp(t) => unsafe { (*t).fin() != 0 || (*t).rst() != 0 },
            L4::Udp(_) => false,
        }
    }

    /// TCP FIN.
    #[inline(always)]
    pub fn is_tcp_fin(&self) -> bool {
        match self.l4 {
            // SAFETY: parse() checked that the header is inside the frame.
            L4::Tcp(t) => unsafe { (*t).fin() != 0 },
            L4::Udp(_) => false,
        }
    }

    /// TCP RST.
    #[inline(always)]
    pub fn is_tcp_rst(&self) -> bool {
        match self.l4 {
            // SAFETY: parse() checked that the header is inside the frame.
            L4::Tcp(t) => unsafe { (*t).rst() != 0 },
            L4::Udp(_) => false,
        }
    }

    /// A SYN with ACK: the server's half of a handshake.
    #[inline(always)]
    pub fn is_tcp_syn_ack(&self) -> bool {
        match self.l4 {
            // SAFETY: parse() checked that the header is inside the frame.
            L4::Tcp(t) => unsafe { (*t).syn() != 0 && (*t).ack() != 0 },
            L4::Udp(_) => false,
        }
    }

    /// A SYN without ACK: the only TCP segment that may open a flow.
    #[inline(always)]
    pub fn is_tcp_open(&self) -> bool {
        match self.l4 {
            // SAFETY: as above.
            L4::Tcp(t) => unsafe { (*t).syn() != 0 && (*t).ack() == 0 },
            L4::Udp(_) => true,
        }
    }
}

/// An ICMP message whose IPv4 and 8-byte ICMP headers are inside the frame.
pub struct Icmp {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// Type, code, checksum and the 4 bytes that depend on the type.
    pub icmp: *mut [u8; 8],
    /// Offset of the ICMP header in the frame.
    pub offset: usize,
    /// Offset of the end of the IPv4 packet (what lies past it is padding).
    pub end: usize,
}

/// What parsing concluded: a packet to handle, or an outcome to count and return.
pub enum Parsed {
    Packet(Packet),
    Icmp(Icmp),
    /// Valid IPv4 the data path does not handle (a fragment, another
    /// protocol), with the outcome it gets unless the firewall drops it.
    OtherIp(*mut Ipv4Hdr, u32),
    Pass(u32),
    Drop(u32),
}

impl Parsed {
    /// The IPv4 header, for every packet that has a valid one.
    #[inline(always)]
    pub fn ipv4(&self) -> Option<*mut Ipv4Hdr> {
        match self {
            Parsed::Packet(p) => Some(p.ip),
            Parsed::Icmp(m) => Some(m.ip),
            Parsed::OtherIp(ip, _) => Some(*ip),
            Parsed::Pass(_) | Parsed::Drop(_) => None,
        }
    }
}

const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

#[inline(always)]
pub fn parse<H: Hook>(ctx: &H) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr, _>(ctx, 0) else {
        return Parsed::Pass(counter::PASS_NOT_IPV4);
    };
    // SAFETY: eth is inside the frame.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Parsed::Pass(counter::PASS_NOT_IPV4);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr, _>(ctx, EthHdr::LEN) else {
        return Parsed::Drop(counter::DROP_MALFORMED);
    };
    // SAFETY: ip is inside the frame.
    let (vihl, tot_len, frags, proto) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).tot_len) as usize,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
        )
    };
    let ihl = ((vihl & 0x0f) as usize) << 2;
    let frame_len = ctx.frame_len();
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || tot_len < ihl || EthHdr::LEN + tot_len > frame_len {
        return Parsed::Drop(counter::DROP_MALFORMED);
    }
    if frags & (IP_MF | IP_OFFSET) != 0 {
        return Parsed::OtherIp(ip, counter::PASS_FRAGMENT);
    }
    let l4_off = EthHdr::LEN + ihl;
    let l4 = match proto {
        IPPROTO_TCP => {
            let Some(t) = ptr_at::<TcpHdr, _>(ctx, l4_off) else {
                return Parsed::Drop(counter::DROP_MALFORMED);
            };
            // SAFETY: t is inside the frame.
            if unsafe { (*t).doff() } < 5 || tot_len < ihl + TcpHdr::LEN {
                return Parsed::Drop(counter::DROP_MALFORMED);
            }
            L4::Tcp(t)
        }
        IPPROTO_UDP => {
            let Some(u) = ptr_at::<UdpHdr, _>(ctx, l4_off) else {
                return Parsed::Drop(counter::DROP_MALFORMED);
            };
            if tot_len < ihl + UdpHdr::LEN {
                return Parsed::Drop(counter::DROP_MALFORMED);
            }
            L4::Udp(u)
        }
        IPPROTO_ICMP => {
            let Some(icmp) = ptr_at::<[u8; 8], _>(ctx, l4_off) else {
                return Parsed::Drop(counter::DROP_MALFORMED);
            };
            if tot_len < ihl + 8 {
                return Parsed::Drop(counter::DROP_MALFORMED);
            }
            return Parsed::Icmp(Icmp {
                eth,
                ip,
                icmp,
                offset: l4_off,
                end: EthHdr::LEN + tot_len,
            });
        }
        _ => return Parsed::OtherIp(ip, counter::PASS_OTHER_PROTO),
    };
    Parsed::Packet(Packet {
        eth,
        ip,
        l4,
        l4_off,
        proto,
    })
}
