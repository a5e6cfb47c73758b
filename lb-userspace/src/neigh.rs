//! Keeping backends' next hops resolved, so the data path's FIB lookup finds
//! their MAC addresses (XDP cannot send ARP itself). Uses kernel-managed
//! neighbour entries (`NTF_EXT_MANAGED`, Linux 5.16+): the kernel keeps them
//! resolved for as long as they exist, the way Cilium does for its backends.
//! It drives iproute2's `ip`, which every host running `lb` already has.

use std::{net::Ipv4Addr, process::Command};

#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run `ip` (iproute2): {0}")]
    Spawn(#[from] std::io::Error),
    #[error("no route to {0}")]
    NoRoute(Ipv4Addr),
}

fn ip(args: &[&str]) -> Result<String, NeighError> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(NeighError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The next hop and device the kernel routes `addr` through.
pub fn next_hop(addr: Ipv4Addr) -> Result<(Ipv4Addr, String), NeighError> {
    let out = ip(&["-4", "route", "get", &addr.to_string()])?;
    let words: Vec<&str> = out.split_whitespace().collect();
    let after = |k: &str| {
        words
            .iter()
            .position(|w| *w == k)
            .and_then(|i| words.get(i + 1))
    };
    let dev = after("dev").ok_or(NeighError::NoRoute(addr))?.to_string();
    let via = after("via").and_then(|v| v.parse().ok()).unwrap_or(addr);
    Ok((via, dev))
}

/// Makes sure the kernel keeps the neighbour entry of `addr`'s next hop resolved.
/// A permanent (static) entry is left alone. Returns the next hop and device.
pub fn ensure_managed(addr: Ipv4Addr) -> Result<(Ipv4Addr, String), NeighError> {
    let (hop, dev) = next_hop(addr)?;
    if dev == "lo" {
        return Ok((hop, dev));
    }
    let hop_s = hop.to_string();
    let current = ip(&["-4", "neigh", "show", &hop_s, "dev", &dev])?;
    if !(current.contains("PERMANENT") || current.contains("managed")) {
        ip(&["-4", "neigh", "replace", &hop_s, "dev", &dev, "managed"])?;
    }
    Ok((hop, dev))
}

/// The IPv4 gateways the kernel routes through on `interfaces` (every `via`
/// of the main table, ECMP next hops included): replies to clients behind a
/// router go through them, so they are kept resolved as well.
pub fn gateways(interfaces: &[String]) -> Result<Vec<Ipv4Addr>, NeighError> {
    let out = ip(&["-4", "route", "show"])?;
    let words: Vec<&str> = out.split_whitespace().collect();
    let mut gws = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if *w != "via" {
            continue;
        }
        let Some(Ok(gw)) = words.get(i + 1).map(|a| a.parse::<Ipv4Addr>()) else {
            continue;
        };
        let on_ours = words.get(i + 2) == Some(&"dev")
            && words
                .get(i + 3)
                .is_some_and(|d| interfaces.iter().any(|x| x == d));
        if on_ours && !gws.contains(&gw) {
            gws.push(gw);
        }
    }
    Ok(gws)
}
