//! A TCP port scan from a namespace, as an attacker's first look at a VIP: a
//! connect to each port, many at once, each given a short time to answer.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use crate::{http, netns::Netns};

/// What a scan found: open ports, and how many answered with a refusal
/// (closed) or not at all (filtered).
#[derive(Debug)]
pub struct Scan {
    pub open: BTreeSet<u16>,
    pub refused: usize,
    pub silent: usize,
}

/// Scans `ports` of `target` from `ns`, from its address `from`, 64 at a time,
/// each connect given `wait`.
pub fn scan(ns: &Netns, from: Ipv4Addr, target: Ipv4Addr, ports: Vec<u16>, wait: Duration) -> Scan {
    ns.run(move || {
        let chunk = ports.len().div_ceil(64).max(1);
        let results: Vec<(u16, std::io::Result<()>)> = std::thread::scope(|s| {
            let handles: Vec<_> = ports
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|&p| {
                                let to = (target, p).into();
                                (p, http::Conn::open_from(from, to, wait).map(|_| ()))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a scanning thread panicked"))
                .collect()
        });
        let mut scan = Scan {
            open: BTreeSet::new(),
            refused: 0,
            silent: 0,
        };
        for (p, r) in results {
            match r {
                Ok(()) => {
                    scan.open.insert(p);
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => scan.refused += 1,
                Err(_) => scan.silent += 1,
            }
        }
        scan
    })
}
