//! A SYN flood for the firewall's tests: TCP SYNs from one source address and
//! ever-changing ports, written whole (IPv4 header included) to a raw socket,
//! bounded in count and in time.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_common::checksum;

use crate::netns::Netns;

/// What a flood sent.
#[derive(Debug, Clone, Copy)]
pub struct Flooded {
    pub sent: u64,
    pub elapsed: Duration,
}

/// The IPv4 + TCP SYN from `src`:`sport` to `dst`, checksums computed.
fn syn(src: Ipv4Addr, sport: u16, dst: SocketAddrV4, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let c = checksum::full(&p[..20]);
    p[10..12].copy_from_slice(&c);
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dst.port().to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let c = checksum::l4_full(src.octets(), dst.ip().octets(), 6, t);
    t[16..18].copy_from_slice(&c);
    p
}

/// Where a flood's SYNs come from.
#[derive(Debug, Clone, Copy)]
pub enum Sources {
    /// One address, ports changing.
    One(Ipv4Addr),
    /// A different, spoofed address for every SYN (100.64.0.0/10, from a
    /// fixed sequence), as a flood of many sources looks.
    Spoofed,
}

/// Sends up to `max` SYNs from `src` to `dst` in namespace `ns`, for at most
/// `within`, as fast as one thread can.
pub fn syn_flood(
    ns: &Netns,
    src: Ipv4Addr,
    dst: SocketAddrV4,
    max: u64,
    within: Duration,
) -> Flooded {
    flood(ns, Sources::One(src), dst, max, within)
}

/// Like [`syn_flood`], from `sources`.
pub fn flood(
    ns: &Netns,
    sources: Sources,
    dst: SocketAddrV4,
    max: u64,
    within: Duration,
) -> Flooded {
    ns.run(move || {
        // SAFETY: plain socket calls; the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < max && started.elapsed() < within {
            let src = match sources {
                Sources::One(a) => a,
                Sources::Spoofed => {
                    // 100.64.0.0/10, walked by a multiplicative step.
                    let n = (sent as u32).wrapping_mul(2_654_435_761) & 0x003f_ffff;
                    Ipv4Addr::from(0x6440_0000 | n)
                }
            };
            let p = syn(src, 1024 + (sent % 60_000) as u16, dst, sent as u32);
            // SAFETY: p and to are valid for the lengths given.
            let n = unsafe {
                libc::sendto(
                    fd,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if n == p.len() as isize {
                sent += 1;
            } else {
                // A full queue: give the receiver a moment.
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        Flooded {
            sent,
            elapsed: started.elapsed(),
        }
    })
}
