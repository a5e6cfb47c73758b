//! What an interface is, as far as choosing a hook goes, and the choice.
//!
//! Everything is asked of the kernel through ethtool ioctls on a socket of the
//! daemon's own network namespace (not /sys, which shows the namespace sysfs
//! was mounted in). A veth's peer may live in another namespace; to read its
//! settings the daemon looks for it in the named namespaces (`/run/netns`) and
//! those of running processes, from a short-lived thread that enters each.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
};

use serde::Serialize;

use crate::config::Hook;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETH_SS_STATS: u32 = 1;
const ETH_GSTRING_LEN: usize = 32;

/// What the hook choice needs to know of an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Facts {
    /// The driver's name (`veth`, `ixgbe`, ...).
    pub driver: String,
    /// A device on a bus (a NIC), not a virtual device.
    pub physical: bool,
    /// For a veth: its peer.
    pub veth: Option<Peer>,
}

/// A veth's other end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub ifindex: u32,
    /// The peer lives in another network namespace (so the TC hook can send
    /// into it directly with `bpf_redirect_peer`).
    pub elsewhere: bool,
    /// The peer's TX checksum offload and GRO, where the peer was found.
    pub tx_checksum: Option<bool>,
    pub gro: Option<bool>,
}

/// The hook an interface gets, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Choice {
    pub hook: Hook,
    pub reason: String,
}

/// Picks the hook for `iface` given what was asked and what it is; an error
/// says why the asked hook cannot forward correctly there, and what to change.
pub fn choose(iface: &str, asked: Hook, f: &Facts) -> Result<Choice, String> {
    let choice = |hook, reason: String| Ok(Choice { hook, reason });
    match asked {
        Hook::Auto if f.physical => choice(
            Hook::Xdp,
            format!(
                "auto: a NIC (driver {}): native XDP sees frames before the kernel allocates anything",
                f.driver
            ),
        ),
        Hook::Auto => choice(
            Hook::Tc,
            format!(
                "auto: a virtual device (driver {}): TC keeps the socket buffer's checksum state{}",
                f.driver,
                if f.veth.as_ref().is_some_and(|p| p.elsewhere) {
                    " and sends into the veth peer directly"
                } else {
                    ""
                }
            ),
        ),
        Hook::Xdp => match &f.veth {
            None => choice(Hook::Xdp, "set in the config".into()),
            Some(p) => match (p.tx_checksum, p.gro) {
                (Some(false), Some(true)) => choice(
                    Hook::Xdp,
                    "set in the config; the veth peer's TX checksum offload is off and its GRO on"
                        .into(),
                ),
                (Some(true), _) => Err(format!(
                    "native XDP cannot forward on veth {iface}: its peer (ifindex {}) has TX \
                     checksum offload on (the default), so what it sends carries partial \
                     checksums that native XDP on veth loses. Use hook = \"tc\" for {iface} (what \
                     \"auto\" picks on veth), or switch the peer's offload off (`ethtool -K PEER \
                     tx off` in its namespace)",
                    p.ifindex
                )),
                (_, Some(false)) => Err(format!(
                    "native XDP cannot forward on veth {iface}: its peer (ifindex {}) has GRO \
                     off, so frames redirected to it are dropped. Use hook = \"tc\" for {iface} \
                     (what \"auto\" picks on veth), or switch the peer's GRO on (`ethtool -K PEER \
                     gro on` in its namespace)",
                    p.ifindex
                )),
                _ => Err(format!(
                    "native XDP on veth {iface} needs its peer's TX checksum offload off and GRO \
                     on, and its peer (ifindex {}) was not found to check them. Use hook = \"tc\" \
                     for {iface} (what \"auto\" picks on veth)",
                    p.ifindex
                )),
            },
        },
        Hook::XdpGeneric => choice(Hook::XdpGeneric, "set in the config".into()),
        Hook::Tc => choice(Hook::Tc, "set in the config".into()),
    }
}

/// An AF_INET datagram socket of the calling thread's network namespace.
fn socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One ethtool request on `iface`: `data` starts with the command word.
fn ethtool(sock: &OwnedFd, iface: &str, data: *mut libc::c_void) -> std::io::Result<()> {
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = data as *mut libc::c_char;
    // SAFETY: req names the interface and points at a buffer of the size the
    // command expects, alive for the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn drvinfo(sock: &OwnedFd, iface: &str) -> std::io::Result<DrvInfo> {
    // SAFETY: all-zero is a valid DrvInfo.
    let mut d: DrvInfo = unsafe { std::mem::zeroed() };
    d.cmd = ETHTOOL_GDRVINFO;
    ethtool(sock, iface, &mut d as *mut DrvInfo as *mut libc::c_void)?;
    Ok(d)
}

fn flag(sock: &OwnedFd, iface: &str, cmd: u32) -> std::io::Result<bool> {
    let mut v: [u32; 2] = [cmd, 0];
    ethtool(sock, iface, v.as_mut_ptr() as *mut libc::c_void)?;
    Ok(v[1] != 0)
}

/// A veth's `peer_ifindex` statistic.
fn veth_peer_ifindex(sock: &OwnedFd, iface: &str, n_stats: u32) -> std::io::Result<u32> {
    let n = n_stats as usize;
    let mut strings = vec![0u32; 3 + n * ETH_GSTRING_LEN / 4];
    strings[0] = ETHTOOL_GSTRINGS;
    strings[1] = ETH_SS_STATS;
    strings[2] = n_stats;
    ethtool(sock, iface, strings.as_mut_ptr() as *mut libc::c_void)?;
    let bytes: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let at = (0..n)
        .find(|&i| cstr(&bytes[i * ETH_GSTRING_LEN..(i + 1) * ETH_GSTRING_LEN]) == "peer_ifindex")
        .ok_or_else(|| std::io::Error::other("no peer_ifindex statistic"))?;
    let mut stats = vec![0u64; 1 + n];
    stats[0] = ETHTOOL_GSTATS as u64 | (n_stats as u64) << 32;
    ethtool(sock, iface, stats.as_mut_ptr() as *mut libc::c_void)?;
    Ok(stats[1 + at] as u32)
}

/// The name of interface `ifindex` in the calling thread's namespace.
fn name_of(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as the call requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    Some(cstr(&buf.iter().map(|&c| c as u8).collect::<Vec<_>>()))
}

/// Reads what the hook choice needs of `iface` (in this namespace).
pub fn facts(iface: &str) -> std::io::Result<Facts> {
    let sock = socket()?;
    let d = drvinfo(&sock, iface)?;
    let driver = cstr(&d.driver);
    let bus = cstr(&d.bus_info);
    let physical = !bus.is_empty() && bus != "N/A" && driver != "veth";
    let veth = if driver == "veth" {
        let ifindex = veth_peer_ifindex(&sock, iface, d.n_stats)?;
        let own = if_index(iface).unwrap_or(0);
        // The peer is here if this namespace has a veth at its index whose
        // own peer is us.
        let here = ifindex != own
            && name_of(ifindex).is_some_and(|n| {
                drvinfo(&sock, &n).is_ok_and(|pd| {
                    cstr(&pd.driver) == "veth"
                        && veth_peer_ifindex(&sock, &n, pd.n_stats).is_ok_and(|i| i == own)
                })
            });
        let (tx_checksum, gro) = if here {
            let n = name_of(ifindex).unwrap_or_default();
            (
                flag(&sock, &n, ETHTOOL_GTXCSUM).ok(),
                flag(&sock, &n, ETHTOOL_GGRO).ok(),
            )
        } else {
            peer_elsewhere(ifindex, own)
        };
        Some(Peer {
            ifindex,
            elsewhere: !here,
            tx_checksum,
            gro,
        })
    } else {
        None
    };
    Ok(Facts {
        driver,
        physical,
        veth,
    })
}

/// The index of `iface` in this namespace.
pub fn if_index(iface: &str) -> Option<u32> {
    let c = CString::new(iface).ok()?;
    // SAFETY: c is a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Looks for the veth peer `ifindex` (whose own peer is `own`) in the other
/// network namespaces this host has, and reads its TX checksum offload and
/// GRO. Unknown (None) unless exactly one namespace holds such a peer.
fn peer_elsewhere(ifindex: u32, own: u32) -> (Option<bool>, Option<bool>) {
    let mut seen = std::collections::HashSet::new();
    if let Ok(m) = std::fs::metadata("/proc/thread-self/ns/net") {
        seen.insert((m.dev(), m.ino()));
    }
    let mut candidates = Vec::new();
    let named = std::fs::read_dir("/run/netns").into_iter().flatten();
    let procs = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    for path in named.flatten().map(|e| e.path()).chain(procs) {
        if let Ok(m) = std::fs::metadata(&path) {
            if seen.insert((m.dev(), m.ino())) {
                candidates.push(path);
            }
        }
    }
    let mut found = Vec::new();
    for path in candidates {
        let r = std::thread::spawn(move || -> Option<(Option<bool>, Option<bool>)> {
            let f = std::fs::File::open(&path).ok()?;
            // SAFETY: f is an open namespace file; setns affects only this
            // thread, which ends here.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            let sock = socket().ok()?;
            let name = name_of(ifindex)?;
            let d = drvinfo(&sock, &name).ok()?;
            if cstr(&d.driver) != "veth" || veth_peer_ifindex(&sock, &name, d.n_stats).ok()? != own
            {
                return None;
            }
            Some((
                flag(&sock, &name, ETHTOOL_GTXCSUM).ok(),
                flag(&sock, &name, ETHTOOL_GGRO).ok(),
            ))
        })
        .join()
        .ok()
        .flatten();
        if let Some(r) = r {
            found.push(r);
        }
    }
    match found.as_slice() {
        [one] => *one,
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn veth(tx: Option<bool>, gro: Option<bool>) -> Facts {
        Facts {
            driver: "veth".into(),
            physical: false,
            veth: Some(Peer {
                ifindex: 7,
                elsewhere: true,
                tx_checksum: tx,
                gro,
            }),
        }
    }

    #[test]
    fn auto_is_xdp_on_a_nic_and_tc_on_virtual_devices() {
        let nic = Facts {
            driver: "ixgbe".into(),
            physical: true,
            veth: None,
        };
        assert_eq!(choose("eth0", Hook::Auto, &nic).unwrap().hook, Hook::Xdp);
        let c = choose("eth0", Hook::Auto, &veth(Some(true), Some(false))).unwrap();
        assert_eq!(c.hook, Hook::Tc);
        assert!(
            c.reason.contains("into the veth peer directly"),
            "{}",
            c.reason
        );
        let bridge = Facts {
            driver: "bridge".into(),
            physical: false,
            veth: None,
        };
        assert_eq!(choose("br0", Hook::Auto, &bridge).unwrap().hook, Hook::Tc);
    }

    #[test]
    fn native_xdp_on_veth_needs_the_peer_offload_off_and_gro_on() {
        let ok = choose("eth1", Hook::Xdp, &veth(Some(false), Some(true))).unwrap();
        assert_eq!(ok.hook, Hook::Xdp);
        let e = choose("eth1", Hook::Xdp, &veth(Some(true), Some(true))).unwrap_err();
        assert!(
            e.contains("TX checksum offload on") && e.contains("hook = \"tc\""),
            "{e}"
        );
        let e = choose("eth1", Hook::Xdp, &veth(Some(false), Some(false))).unwrap_err();
        assert!(e.contains("GRO off"), "{e}");
        let e = choose("eth1", Hook::Xdp, &veth(None, None)).unwrap_err();
        assert!(e.contains("was not found"), "{e}");
    }

    #[test]
    fn explicit_tc_and_generic_are_taken_anywhere() {
        for asked in [Hook::Tc, Hook::XdpGeneric] {
            assert_eq!(
                choose("eth1", asked, &veth(Some(true), None)).unwrap().hook,
                asked
            );
        }
    }
}
