//! Building Ethernet/IPv4/TCP/UDP frames with valid checksums, and checking
//! frames the program wrote, by full recomputation (never by the incremental
//! code under test).

use std::net::Ipv4Addr;

use lb_common::checksum;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// What to put in a frame.
#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub ip_id: u16,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// The raw flags + fragment offset field.
    pub frag: u16,
    /// TCP options (a multiple of 4 bytes; TCP frames only).
    pub tcp_options: Vec<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
    },
    /// `zero_checksum`: send without a UDP checksum (allowed over IPv4).
    Udp {
        sport: u16,
        dport: u16,
        zero_checksum: bool,
    },
    /// Another IP protocol, carried as opaque payload.
    Other { proto: u8 },
}

impl Frame {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Frame {
        Frame::new(
            src.0,
            dst.0,
            L4::Tcp {
                sport: src.1,
                dport: dst.1,
                flags,
                seq: 1000,
                ack: if flags & TCP_ACK != 0 { 2000 } else { 0 },
            },
        )
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Frame {
        Frame::new(
            src.0,
            dst.0,
            L4::Udp {
                sport: src.1,
                dport: dst.1,
                zero_checksum: false,
            },
        )
    }

    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Frame {
        Frame {
            dst_mac: [0x02, 0, 0, 0, 0x01, 0x01],
            src_mac: [0x02, 0, 0, 0, 0x01, 0x02],
            src,
            dst,
            ttl: 64,
            ip_id: 0x1234,
            ip_options: Vec::new(),
            frag: 0x4000, // DF
            tcp_options: Vec::new(),
            l4,
            payload: b"hello".to_vec(),
        }
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Other { proto } => proto,
        }
    }

    /// The frame's bytes, every checksum computed in full.
    pub fn build(&self) -> Vec<u8> {
        let mut l4 = match self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
            } => {
                assert_eq!(
                    self.tcp_options.len() % 4,
                    0,
                    "TCP options must fill 32-bit words"
                );
                let mut t = Vec::with_capacity(20 + self.tcp_options.len());
                t.extend_from_slice(&sport.to_be_bytes());
                t.extend_from_slice(&dport.to_be_bytes());
                t.extend_from_slice(&seq.to_be_bytes());
                t.extend_from_slice(&ack.to_be_bytes());
                t.push(((20 + self.tcp_options.len()) / 4) as u8 * 16);
                t.push(flags);
                t.extend_from_slice(&64240u16.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 0]);
                t.extend_from_slice(&self.tcp_options);
                t
            }
            L4::Udp { sport, dport, .. } => {
                let mut u = Vec::with_capacity(8);
                u.extend_from_slice(&sport.to_be_bytes());
                u.extend_from_slice(&dport.to_be_bytes());
                u.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                u.extend_from_slice(&[0, 0]);
                u
            }
            L4::Other { .. } => Vec::new(),
        };
        l4.extend_from_slice(&self.payload);
        let (s, d) = (self.src.octets(), self.dst.octets());
        match self.l4 {
            L4::Tcp { .. } => {
                let c = checksum::l4_full(s, d, 6, &l4);
                l4[16..18].copy_from_slice(&c);
            }
            L4::Udp {
                zero_checksum: false,
                ..
            } => {
                let mut c = checksum::l4_full(s, d, 17, &l4);
                if c == [0, 0] {
                    c = [0xff, 0xff];
                }
                l4[6..8].copy_from_slice(&c);
            }
            _ => {}
        }
        assert_eq!(
            self.ip_options.len() % 4,
            0,
            "IP options must fill 32-bit words"
        );
        let ihl = 20 + self.ip_options.len();
        let mut ip = Vec::with_capacity(ihl);
        ip.push(0x40 | (ihl / 4) as u8);
        ip.push(0);
        ip.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.ip_id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.proto());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&s);
        ip.extend_from_slice(&d);
        ip.extend_from_slice(&self.ip_options);
        let c = checksum::full(&ip);
        ip[10..12].copy_from_slice(&c);

        let mut f = Vec::with_capacity(14 + ip.len() + l4.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }
}

/// Checks, by full recomputation, that an IPv4 frame's IP header checksum and
/// its TCP/UDP checksum (if UDP's is non-zero) verify. Returns a description of
/// what is wrong, if anything.
pub fn checksums_ok(frame: &[u8]) -> Result<(), String> {
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if !checksum::verifies(&ip[..ihl], 0) {
        return Err("IPv4 header checksum does not verify".into());
    }
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let seg = &ip[ihl..tot];
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    let proto = ip[9];
    if proto == 17 && seg[6..8] == [0, 0] {
        return Ok(());
    }
    let mut zeroed = seg.to_vec();
    let at = if proto == 6 { 16 } else { 6 };
    let got = [seg[at], seg[at + 1]];
    zeroed[at] = 0;
    zeroed[at + 1] = 0;
    let mut want = checksum::l4_full(src, dst, proto, &zeroed);
    if proto == 17 && want == [0, 0] {
        want = [0xff, 0xff];
    }
    if got != want {
        return Err(format!(
            "L4 checksum {got:02x?}, full recomputation gives {want:02x?}"
        ));
    }
    Ok(())
}
