//! The seed's picture in namespaces: a client, the load balancer, and web
//! backends on one LAN behind it.
//!
//! ```text
//!  client ──eth0── lb ──eth1── switch (bridge) ──┬── web1 (10.0.2.11)
//!  10.0.1.2    10.0.1.1  10.0.2.1                 └── web2 (10.0.2.12)
//! ```
//! The client reaches the VIP (10.0.0.100) through its default route via the
//! balancer; the backends route their replies through it as well. In the
//! balancer's namespace netfilter drops every forwarded packet, so whatever
//! crosses it was carried by XDP.

use std::net::Ipv4Addr;

use crate::netns::{veth, Netns};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
pub const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
pub const LB_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

/// Address of backend number `i` (1-based): 10.0.2.1i.
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 2, 10 + i as u8)
}

/// The namespaces and links of one testbed; all removed on drop.
pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub switch: Netns,
    pub backends: Vec<Netns>,
}

/// How a topology's veths are set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offloads {
    /// As `ip link add ... type veth` makes them: TX checksum offload on
    /// (local senders leave partial checksums), GRO off.
    Default,
    /// Like a NIC's: complete checksums on the wire, GRO on.
    NicLike,
}

impl Topology {
    /// Builds the picture with `n` backends; namespace names start with `prefix`
    /// (keep it short and unique per test, e.g. "lbt3").
    pub fn new(prefix: &str, n: usize) -> Topology {
        let names: Vec<String> = (1..=n).map(|i| format!("web{i}")).collect();
        Topology::with_backends(
            prefix,
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }

    /// Like [`Topology::new`], with backends named `names` (namespace
    /// `<prefix>-<name>`), addressed 10.0.2.11, .12, ... in that order.
    pub fn with_backends(prefix: &str, names: &[&str]) -> Topology {
        let client = Netns::new(&format!("{prefix}-cli"));
        let lb = Netns::new(&format!("{prefix}-lb"));
        let switch = Netns::new(&format!("{prefix}-sw"));
        let backends: Vec<Netns> = names
            .iter()
            .map(|n| Netns::new(&format!("{prefix}-{n}")))
            .collect();

        veth(&client, "eth0", &lb, "eth0");
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"]);
        client.ip(&[
            "route",
            "add",
            "default",
            "via",
            &LB_CLIENT_SIDE.to_string(),
        ]);
        lb.ip(&[
            "addr",
            "add",
            &format!("{LB_CLIENT_SIDE}/24"),
            "dev",
            "eth0",
        ]);

        switch.ip(&["link", "add", "name", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        veth(&lb, "eth1", &switch, "p-lb");
        switch.ip(&["link", "set", "p-lb", "master", "br0"]);
        lb.ip(&[
            "addr",
            "add",
            &format!("{LB_BACKEND_SIDE}/24"),
            "dev",
            "eth1",
        ]);
        for (i, b) in backends.iter().enumerate() {
            let port = format!("p-web{}", i + 1);
            veth(b, "eth0", &switch, &port);
            switch.ip(&["link", "set", &port, "master", "br0"]);
            b.ip(&[
                "addr",
                "add",
                &format!("{}/24", backend_addr(i + 1)),
                "dev",
                "eth0",
            ]);
            b.ip(&[
                "route",
                "add",
                "default",
                "via",
                &LB_BACKEND_SIDE.to_string(),
            ]);
        }

        lb.sysctl("net.ipv4.ip_forward", "1");
        for ns in std::iter::once(&client).chain(&backends) {
            // Timestamps on, per-destination offsets off: see ebpf-toolchain.md.
            ns.sysctl("net.ipv4.tcp_timestamps", "2");
        }
        // Only XDP may carry traffic across the balancer.
        lb.exec(
            "nft",
            &[
                "add table inet lbtest; \
                 add chain inet lbtest forward { type filter hook forward priority 0; policy drop; }; \
                 add rule inet lbtest forward counter",
            ],
        );
        Topology {
            client,
            lb,
            switch,
            backends,
        }
    }

    /// Real nginx on every backend (see [`start_webs`]).
    pub fn start_webs(&self) -> Vec<crate::nginx::Nginx> {
        start_webs(&self.backends)
    }

    /// Every namespace of the topology with the veth ends it holds.
    pub fn veth_ends(&self) -> Vec<(&Netns, Vec<String>)> {
        let mut v = vec![
            (&self.client, vec!["eth0".to_owned()]),
            (&self.lb, vec!["eth0".to_owned(), "eth1".to_owned()]),
        ];
        let mut sw = vec!["p-lb".to_owned()];
        sw.extend((1..=self.backends.len()).map(|i| format!("p-web{i}")));
        v.push((&self.switch, sw));
        v.extend(self.backends.iter().map(|b| (b, vec!["eth0".to_owned()])));
        v
    }

    /// Sets TX checksum offload and GRO at every veth end (the testbed
    /// itself leaves them as `ip link` makes them).
    pub fn set_offloads(&self, o: Offloads) {
        if o == Offloads::NicLike {
            for (ns, ifs) in self.veth_ends() {
                for i in ifs {
                    ns.exec("ethtool", &["-K", &i, "tx", "off", "gro", "on"]);
                }
            }
        }
    }

    /// Packets the kernel of the balancer was asked to forward (and dropped).
    pub fn lb_kernel_forwarded(&self) -> u64 {
        let out = self
            .lb
            .exec("nft", &["list", "chain", "inet", "lbtest", "forward"]);
        parse_nft_packets(&out)
    }
}

/// Real nginx on every backend namespace, on :80 of its address, answering
/// with the backend's name (web1, web2, ...).
pub fn start_webs(backends: &[Netns]) -> Vec<crate::nginx::Nginx> {
    (1..=backends.len())
        .map(|i| {
            crate::nginx::Nginx::start(&backends[i - 1], &format!("web{i}"), backend_addr(i), 80)
        })
        .collect()
}

/// The `packets N` of the first counter in `nft list` output.
pub fn parse_nft_packets(out: &str) -> u64 {
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "packets")
        .and_then(|i| words.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in nft output:\n{out}"))
}

/// The balancer config for this topology: XDP on both of the balancer's
/// interfaces, one service per entry of `services`. Its pins go to a bpffs
/// directory named after the socket's (unique) directory: bpffs is shared by
/// every namespace on the machine.
pub fn lb_config(control_socket: &std::path::Path, services: &str) -> String {
    format!(
        "[daemon]\ninterfaces = [\"eth0\", \"eth1\"]\nhook = \"auto\"\ncontrol_socket = \"{}\"\npin_dir = \"{}\"\n\n{services}",
        control_socket.display(),
        pin_dir_for(control_socket).display()
    )
}

/// The pin directory `lb_config` gives a daemon with this control socket.
pub fn pin_dir_for(control_socket: &std::path::Path) -> std::path::PathBuf {
    let tag = control_socket
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lb-test".into());
    std::path::Path::new("/sys/fs/bpf").join(tag)
}

/// A `[[service]]` block over backends `1..=n` of the topology.
pub fn service_block(name: &str, port: u16, protocol: &str, n: usize, backend_port: u16) -> String {
    let mut s = format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\nprotocol = \"{protocol}\"\nscheduler = \"round-robin\"\n"
    );
    for i in 1..=n {
        s += &format!(
            "\n[[service.backend]]\nname = \"web{i}\"\naddress = \"{}\"\nport = {backend_port}\n",
            backend_addr(i)
        );
    }
    s + "\n"
}

/// Two balancers, active-active, behind a router that spreads flows over both
/// with an ECMP route to the VIP (as BGP would, with each balancer announcing
/// it); the backends send replies through either balancer the same way.
///
/// ```text
///                      ┌─ lb1 (10.0.5.2 / 10.0.2.1) ─┐
///  client ── router ──┤                               ├── switch ── web1, web2
///  10.0.1.2  10.0.1.1  └─ lb2 (10.0.6.2 / 10.0.2.2) ─┘
/// ```
pub struct ActiveActive {
    pub client: Netns,
    pub router: Netns,
    pub lbs: Vec<Netns>,
    pub switch: Netns,
    pub backends: Vec<Netns>,
}

/// The router-side address of balancer `i` (0-based) and its backend-side one.
pub fn lb_addrs(i: usize) -> (Ipv4Addr, Ipv4Addr) {
    (
        Ipv4Addr::new(10, 0, 5 + i as u8, 2),
        Ipv4Addr::new(10, 0, 2, 1 + i as u8),
    )
}

impl ActiveActive {
    pub fn new(prefix: &str, n_backends: usize) -> ActiveActive {
        let client = Netns::new(&format!("{prefix}-cli"));
        let router = Netns::new(&format!("{prefix}-rt"));
        let switch = Netns::new(&format!("{prefix}-sw"));
        let lbs: Vec<Netns> = (1..=2)
            .map(|i| Netns::new(&format!("{prefix}-lb{i}")))
            .collect();
        let backends: Vec<Netns> = (1..=n_backends)
            .map(|i| Netns::new(&format!("{prefix}-web{i}")))
            .collect();

        veth(&client, "eth0", &router, "r0");
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"]);
        client.ip(&[
            "route",
            "add",
            "default",
            "via",
            &LB_CLIENT_SIDE.to_string(),
        ]);
        router.ip(&["addr", "add", &format!("{LB_CLIENT_SIDE}/24"), "dev", "r0"]);
        switch.ip(&["link", "add", "name", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let mut hops = Vec::new();
        for (i, lb) in lbs.iter().enumerate() {
            let (front, back) = lb_addrs(i);
            let rif = format!("r{}", i + 1);
            veth(lb, "eth0", &router, &rif);
            lb.ip(&["addr", "add", &format!("{front}/24"), "dev", "eth0"]);
            let gw = Ipv4Addr::new(10, 0, 5 + i as u8, 1);
            router.ip(&["addr", "add", &format!("{gw}/24"), "dev", &rif]);
            lb.ip(&["route", "add", "default", "via", &gw.to_string()]);
            let port = format!("p-lb{}", i + 1);
            veth(lb, "eth1", &switch, &port);
            switch.ip(&["link", "set", &port, "master", "br0"]);
            lb.ip(&["addr", "add", &format!("{back}/24"), "dev", "eth1"]);
            lb.sysctl("net.ipv4.ip_forward", "1");
            lb.exec(
                "nft",
                &["add table inet lbtest; \
                   add chain inet lbtest forward { type filter hook forward priority 0; policy drop; }"],
            );
            hops.push((front, back));
        }
        router.sysctl("net.ipv4.ip_forward", "1");
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1");
        let mut vip_route = vec!["route".to_owned(), "add".into(), format!("{VIP}/32")];
        for (front, _) in &hops {
            vip_route.extend(["nexthop".into(), "via".into(), front.to_string()]);
        }
        router.ip(&vip_route.iter().map(String::as_str).collect::<Vec<_>>());

        for (i, b) in backends.iter().enumerate() {
            let port = format!("p-web{}", i + 1);
            veth(b, "eth0", &switch, &port);
            switch.ip(&["link", "set", &port, "master", "br0"]);
            b.ip(&[
                "addr",
                "add",
                &format!("{}/24", backend_addr(i + 1)),
                "dev",
                "eth0",
            ]);
            b.sysctl("net.ipv4.fib_multipath_hash_policy", "1");
            let mut r = vec!["route".to_owned(), "add".into(), "default".into()];
            for (_, back) in &hops {
                r.extend(["nexthop".into(), "via".into(), back.to_string()]);
            }
            b.ip(&r.iter().map(String::as_str).collect::<Vec<_>>());
        }
        for ns in std::iter::once(&client).chain(&backends) {
            ns.sysctl("net.ipv4.tcp_timestamps", "2");
        }
        ActiveActive {
            client,
            router,
            lbs,
            switch,
            backends,
        }
    }

    /// Real nginx on every backend (see [`start_webs`]).
    pub fn start_webs(&self) -> Vec<crate::nginx::Nginx> {
        start_webs(&self.backends)
    }

    /// Takes balancer `i` out of both routes, as a withdrawn BGP announcement
    /// (router) and a dead gateway (backends) would.
    pub fn withdraw(&self, i: usize) {
        let keep = 1 - i;
        let (front, back) = lb_addrs(keep);
        self.router.ip(&[
            "route",
            "replace",
            &format!("{VIP}/32"),
            "via",
            &front.to_string(),
        ]);
        for b in &self.backends {
            b.ip(&["route", "replace", "default", "via", &back.to_string()]);
        }
    }
}
