//! What an interface is, as far as choosing a hook goes, and the choice.
//!
//! Everything is asked of the kernel through ethtool ioctls and rtnetlink on
//! sockets of the daemon's own network namespace (not /sys, which shows the
//! namespace sysfs was mounted in). A veth's peer may live in another
//! namespace, which rtnetlink names by an id (`IFLA_LINK_NETNSID`); to read
//! the peer's settings the daemon finds the namespace with that id among the
//! named ones (`/run/netns`) and those of running processes
//! (`RTM_GETNSID`), and enters it from a short-lived thread.

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
const ETHTOOL_GGRO: u32 = 0x2b;

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
    /// The peer's TX checksum offload and GRO, where the peer was found (and
    /// looked for: only for an XDP hook).
    pub tx_checksum: Option<bool>,
    pub gro: Option<bool>,
}

/// The hook an interface gets, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Choice {
    pub hook: Hook,
    pub reason: String,
}

/// Why a hook asked for cannot forward correctly on an interface, and what
/// to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "native XDP cannot forward on veth {iface}: its peer (ifindex {peer}) has TX checksum \
         offload on (the default), so what it sends carries partial checksums that native XDP \
         on veth loses. Use hook = \"tc\" for {iface} (what \"auto\" picks on veth), or switch \
         the peer's offload off (`ethtool -K PEER tx off` in its namespace)"
    )]
    NativeXdpPeerOffload { iface: String, peer: u32 },
    #[error(
        "native XDP cannot forward on veth {iface}: its peer (ifindex {peer}) has GRO off, so \
         frames redirected to it are dropped. Use hook = \"tc\" for {iface} (what \"auto\" picks \
         on veth), or switch the peer's GRO on (`ethtool -K PEER gro on` in its namespace)"
    )]
    NativeXdpPeerGro { iface: String, peer: u32 },
    #[error(
        "native XDP on veth {iface} needs its peer's TX checksum offload off and GRO on, and its \
         peer (ifindex {peer}) was not found to check them. Use hook = \"tc\" for {iface} (what \
         \"auto\" picks on veth)"
    )]
    NativeXdpPeerUnknown { iface: String, peer: u32 },
    #[error(
        "generic XDP cannot forward on veth {iface}: its peer (ifindex {peer}) {}, so what it \
         sends carries partial checksums that XDP updates wrongly. Use hook = \"tc\" for {iface} \
         (what \"auto\" picks on veth), or switch the peer's offload off (`ethtool -K PEER tx \
         off` in its namespace)",
        if *.found { "has TX checksum offload on (the default)" } else { "could not be found to check its TX checksum offload" }
    )]
    GenericXdpPeerOffload {
        iface: String,
        peer: u32,
        found: bool,
    },
}

/// Picks the hook for `iface` given what was asked and what it is; a
/// refusal says why the asked hook cannot forward correctly there.
pub fn choose(iface: &str, asked: Hook, f: &Facts) -> Result<Choice, Refusal> {
    let choice = |hook, reason: String| Ok(Choice { hook, reason });
    let iface = iface.to_owned();
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
                (Some(true), _) => Err(Refusal::NativeXdpPeerOffload {
                    iface,
                    peer: p.ifindex,
                }),
                (_, Some(false)) => Err(Refusal::NativeXdpPeerGro {
                    iface,
                    peer: p.ifindex,
                }),
                _ => Err(Refusal::NativeXdpPeerUnknown {
                    iface,
                    peer: p.ifindex,
                }),
            },
        },
        // Generic XDP keeps the socket buffer but cannot see that its
        // checksum is partial: it updates it as if complete, which is wrong
        // the moment any device on the way finishes it in software (a veth
        // end with offload off, a NIC). Measured here: requests through such
        // a path time out.
        Hook::XdpGeneric => match &f.veth {
            Some(p) if p.tx_checksum != Some(false) => Err(Refusal::GenericXdpPeerOffload {
                iface,
                peer: p.ifindex,
                found: p.tx_checksum == Some(true),
            }),
            Some(_) => choice(
                Hook::XdpGeneric,
                "set in the config; the veth peer's TX checksum offload is off".into(),
            ),
            None => choice(Hook::XdpGeneric, "set in the config".into()),
        },
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

/// Reads what the hook choice needs of `iface` (in this namespace). The
/// settings of a veth's peer are read only when `asked` is an XDP hook (only
/// those depend on them): finding a peer in another namespace means looking
/// through every namespace of the host.
pub fn facts(iface: &str, asked: Hook) -> std::io::Result<Facts> {
    let want_peer = matches!(asked, Hook::Xdp | Hook::XdpGeneric);
    let sock = socket()?;
    let d = drvinfo(&sock, iface)?;
    let driver = cstr(&d.driver);
    let bus = cstr(&d.bus_info);
    let physical = !bus.is_empty() && bus != "N/A" && driver != "veth";
    let veth = if driver == "veth" {
        let own = if_index(iface).ok_or_else(|| std::io::Error::other("no such interface"))?;
        let link = link_peer(own)?;
        let (tx_checksum, gro) = match link.netnsid {
            _ if !want_peer => (None, None),
            None => match name_of(link.ifindex) {
                Some(n) => (
                    flag(&sock, &n, ETHTOOL_GTXCSUM).ok(),
                    flag(&sock, &n, ETHTOOL_GGRO).ok(),
                ),
                None => (None, None),
            },
            Some(nsid) => peer_elsewhere(link.ifindex, nsid),
        };
        Some(Peer {
            ifindex: link.ifindex,
            elsewhere: link.netnsid.is_some(),
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

/// Where a link's other end is: its index, and the id this namespace knows
/// the other end's namespace by (none when it is this one).
struct LinkPeer {
    ifindex: u32,
    netnsid: Option<i32>,
}

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const IFLA_LINK: u16 = 5;
const IFLA_LINK_NETNSID: u16 = 37;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;

/// `IFLA_LINK` and `IFLA_LINK_NETNSID` of interface `ifindex` (rtnetlink).
fn link_peer(ifindex: u32) -> std::io::Result<LinkPeer> {
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut body = vec![0u8; 16];
    body[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    let attrs = rtnl(RTM_GETLINK, RTM_NEWLINK, &body, &[])?;
    let get = |t: u16| {
        attrs
            .iter()
            .find(|(k, v)| *k == t && v.len() >= 4)
            .map(|(_, v)| [v[0], v[1], v[2], v[3]])
    };
    Ok(LinkPeer {
        ifindex: get(IFLA_LINK)
            .map(u32::from_ne_bytes)
            .ok_or_else(|| std::io::Error::other("a veth without IFLA_LINK"))?,
        netnsid: get(IFLA_LINK_NETNSID).map(i32::from_ne_bytes),
    })
}

const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_ATTACHED_MULTI: u8 = 4;

/// Whether the XDP program attached to `iface` runs in generic (skb) mode,
/// as rtnetlink reports it (`IFLA_XDP`); None when it cannot tell.
pub fn xdp_generic(iface: &str) -> Option<bool> {
    let ifindex = if_index(iface)?;
    let mut body = vec![0u8; 16];
    body[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    let attrs = rtnl(RTM_GETLINK, RTM_NEWLINK, &body, &[]).ok()?;
    let (_, xdp) = attrs.iter().find(|(k, _)| *k == IFLA_XDP)?;
    let nested = attributes(xdp);
    let attached = nested
        .iter()
        .find(|(k, v)| *k == IFLA_XDP_ATTACHED && !v.is_empty())?
        .1[0];
    Some(match attached {
        XDP_ATTACHED_SKB => true,
        // Several modes at once: generic unless a driver program is there.
        XDP_ATTACHED_MULTI => !nested.iter().any(|(k, _)| *k == IFLA_XDP_DRV_PROG_ID),
        _ => false,
    })
}

/// The id this namespace knows the namespace of `fd` by, if it has one.
fn nsid_of(fd: &std::fs::File) -> Option<i32> {
    // struct rtgenmsg, padded to 4 bytes.
    let fd_attr = (fd.as_raw_fd() as u32).to_ne_bytes();
    let attrs = rtnl(RTM_GETNSID, RTM_NEWNSID, &[0; 4], &[(NETNSA_FD, &fd_attr)]).ok()?;
    let (_, v) = attrs
        .iter()
        .find(|(k, v)| *k == NETNSA_NSID && v.len() >= 4)?;
    let id = i32::from_ne_bytes([v[0], v[1], v[2], v[3]]);
    (id >= 0).then_some(id)
}

/// One rtnetlink request of type `kind` with a fixed `body` and `attrs`;
/// returns the attributes of the answer (of type `answer`).
fn rtnl(
    kind: u16,
    answer: u16,
    body: &[u8],
    attrs: &[(u16, &[u8])],
) -> std::io::Result<Vec<(u16, Vec<u8>)>> {
    let align = |n: usize| (n + 3) & !3;
    let mut msg = vec![0u8; 16];
    msg.extend_from_slice(body);
    msg.resize(align(msg.len()), 0);
    for (t, v) in attrs {
        msg.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
        msg.extend_from_slice(&t.to_ne_bytes());
        msg.extend_from_slice(v);
        msg.resize(align(msg.len()), 0);
    }
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    msg[4..6].copy_from_slice(&kind.to_ne_bytes());
    msg[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: plain syscalls on a socket owned here; the buffers outlive them.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: msg and addr are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            0,
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 65536];
    // SAFETY: buf is valid for its length.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    if n < 16 {
        return Err(std::io::Error::last_os_error());
    }
    let buf = &buf[..n as usize];
    let mlen = (u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize).min(buf.len());
    let mtype = u16::from_ne_bytes([buf[4], buf[5]]);
    if mtype == libc::NLMSG_ERROR as u16 {
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return Err(std::io::Error::from_raw_os_error(-code));
    }
    if mtype != answer {
        return Err(std::io::Error::other(format!(
            "rtnetlink answered {mtype}, not {answer}"
        )));
    }
    let first = align(16 + body.len()).min(mlen);
    Ok(attributes(&buf[first..mlen])
        .into_iter()
        .map(|(k, v)| (k, v.to_vec()))
        .collect())
}

/// The netlink attributes in `buf`: (type, value), each a length, a type
/// and a value, 4-byte aligned; a malformed one ends the list.
fn attributes(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[at], buf[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & 0x3fff;
        if len < 4 || at + len > buf.len() {
            break;
        }
        out.push((kind, &buf[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// Finds the namespace this one knows as `nsid` among the named namespaces
/// (`/run/netns`) and those of running processes, and reads the TX checksum
/// offload and GRO of its interface `ifindex` there.
fn peer_elsewhere(ifindex: u32, nsid: i32) -> (Option<bool>, Option<bool>) {
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
    let mut seen = std::collections::HashSet::new();
    for path in named.flatten().map(|e| e.path()).chain(procs) {
        let Ok(m) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        let Ok(f) = std::fs::File::open(&path) else {
            continue;
        };
        if nsid_of(&f) != Some(nsid) {
            continue;
        }
        return std::thread::spawn(move || -> (Option<bool>, Option<bool>) {
            // SAFETY: f is an open namespace file; setns affects only this
            // thread, which ends here.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return (None, None);
            }
            let (Ok(sock), Some(name)) = (socket(), name_of(ifindex)) else {
                return (None, None);
            };
            (
                flag(&sock, &name, ETHTOOL_GTXCSUM).ok(),
                flag(&sock, &name, ETHTOOL_GGRO).ok(),
            )
        })
        .join()
        .unwrap_or((None, None));
    }
    (None, None)
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
        let e = choose("eth1", Hook::Xdp, &veth(Some(true), Some(true)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("TX checksum offload on") && e.contains("hook = \"tc\""),
            "{e}"
        );
        let e = choose("eth1", Hook::Xdp, &veth(Some(false), Some(false)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("GRO off"), "{e}");
        let e = choose("eth1", Hook::Xdp, &veth(None, None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("was not found"), "{e}");
    }

    #[test]
    fn tc_is_taken_anywhere_and_generic_xdp_where_checksums_are_complete() {
        assert_eq!(
            choose("eth1", Hook::Tc, &veth(Some(true), None))
                .unwrap()
                .hook,
            Hook::Tc
        );
        let e = choose("eth1", Hook::XdpGeneric, &veth(Some(true), None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("generic XDP cannot forward on veth eth1"), "{e}");
        let ok = choose("eth1", Hook::XdpGeneric, &veth(Some(false), Some(false))).unwrap();
        assert_eq!(
            ok.hook,
            Hook::XdpGeneric,
            "GRO does not matter to generic XDP"
        );
        let nic = Facts {
            driver: "ixgbe".into(),
            physical: true,
            veth: None,
        };
        assert_eq!(
            choose("eth0", Hook::XdpGeneric, &nic).unwrap().hook,
            Hook::XdpGeneric
        );
    }
}
