//! End-to-end (root): the firewall with the real daemon, real nginx and real
//! packets. Sources a rule denies get no answer while others are served; a
//! port scan of the VIP finds exactly the configured ports; a SYN flood from
//! one source is cut down to its rate while a legitimate client keeps working.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::LbDaemon,
    flood, http,
    netns::Netns,
    nginx::Nginx,
    require_root,
    scan::{self, Scan},
    topology::{backend_addr, lb_config, Topology, CLIENT, VIP},
    unique,
};

fn prefix() -> String {
    format!("f{}{}", std::process::id() % 10_000, unique())
}

/// A client address a service's rules deny (in 10.0.1.64/26).
const DENIED: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 66);
/// In the same /26, but the `alt` service allows it by a more specific rule.
const DENIED_BUT_ALT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 70);
/// On the global deny list (10.0.1.128/25).
const BANNED: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 130);
/// The balancer's own service on the VIP (an operator's sshd, say).
const OWN_PORT: u16 = 2222;

fn services() -> String {
    let mut s = String::new();
    for (name, port, rules) in [
        ("web", 80, "deny = [\"10.0.1.64/26\"]"),
        (
            "alt",
            8443,
            "allow = [\"10.0.1.2/32\", \"10.0.1.70/32\"]\ndeny = [\"10.0.1.0/24\"]",
        ),
    ] {
        s += &format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\nprotocol = \"tcp\"\n\n\
             [service.firewall]\n{rules}\n"
        );
        for i in 1..=2 {
            s += &format!(
                "\n[[service.backend]]\nname = \"web{i}\"\naddress = \"{}\"\nport = 80\n",
                backend_addr(i)
            );
        }
        s += "\n";
    }
    s
}

fn config(socket: &std::path::Path, closed_ports: &str, limits: &str) -> String {
    lb_config(
        socket,
        &format!(
            "[firewall]\ndeny = [\"10.0.1.128/25\"]\nclosed_ports = \"{closed_ports}\"\n{limits}\n\n{}",
            services()
        ),
    )
}

fn vip(port: u16) -> SocketAddr {
    SocketAddrV4::new(VIP, port).into()
}

fn scan(ns: &Netns, from: Ipv4Addr, ports: Vec<u16>) -> Scan {
    scan::scan(ns, from, VIP, ports, Duration::from_millis(500))
}

/// Gives the client namespace more addresses. They are on the balancer's
/// link, and the balancer learns a neighbour's MAC only when its kernel
/// forwards to it, which this topology forbids (only XDP may carry traffic):
/// so their neighbour entries are written by hand, as the client's own is
/// learnt from its ARP requests for its gateway.
fn add_client_addresses(t: &Topology, addrs: &[Ipv4Addr]) {
    let link = t.client.ip(&["-br", "link", "show", "eth0"]);
    let mac = link
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC in {link:?}"))
        .to_owned();
    for a in addrs {
        t.client
            .ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"]);
        t.lb.ip(&[
            "neigh",
            "replace",
            &a.to_string(),
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
    }
}

fn counter(lb: &LbDaemon, name: &str) -> u64 {
    lb.status()["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in the status"))
}

/// Whether a request from `from` to `port` got no answer (a handshake timeout).
fn unanswered(ns: &Netns, from: Ipv4Addr, port: u16) -> bool {
    ns.run(
        move || match http::get_from(from, vip(port), "/", Duration::from_millis(700)) {
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ),
            Ok(_) => false,
        },
    )
}

fn served(ns: &Netns, from: Ipv4Addr, port: u16) -> bool {
    ns.run(move || {
        matches!(
            http::get_from(from, vip(port), "/", Duration::from_secs(2)),
            Ok((200, _))
        )
    })
}

#[test]
fn root_denied_sources_get_no_answer_and_a_port_scan_finds_exactly_the_services() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let webs: Vec<Nginx> = t.start_webs();
    add_client_addresses(&t, &[DENIED, DENIED_BUT_ALT, BANNED]);
    // The balancer owns the VIP and listens on a port of its own there: what
    // a scan finds when the firewall leaves closed ports to the kernel.
    t.lb.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "eth0"]);
    let _own: TcpListener =
        t.lb.run(|| TcpListener::bind(("0.0.0.0", OWN_PORT)).unwrap());
    let mut ports: Vec<u16> = (1..=1024).collect();
    ports.extend([OWN_PORT, 3306, 8080, 8443, 9100]);

    let lb = LbDaemon::start(&t.lb, |sock| config(sock, "pass", ""));
    let s = scan(&t.client, CLIENT, ports.clone());
    println!(
        "closed_ports = \"pass\": open {:?}, {} refused, {} silent",
        s.open, s.refused, s.silent
    );
    assert_eq!(
        s.open,
        BTreeSet::from([80, OWN_PORT, 8443]),
        "with closed ports passed, the kernel answers for the balancer's own port"
    );

    let socket = lb.socket.clone();
    lb.write_config(&config(&socket, "drop", ""));
    let (ok, out) = lb.cli(&["reload"]);
    assert!(ok, "{out}");
    let closed_before = counter(&lb, "drop_closed_port");
    let started = Instant::now();
    let s = scan(&t.client, CLIENT, ports.clone());
    println!(
        "closed_ports = \"drop\": open {:?}, {} refused, {} silent ({:.1} s)",
        s.open,
        s.refused,
        s.silent,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(s.open, BTreeSet::from([80, 8443]), "exactly the services");
    assert_eq!(s.refused, 0, "closed ports are dropped, not refused");
    let dropped = counter(&lb, "drop_closed_port") - closed_before;
    assert!(
        dropped >= (ports.len() - 2) as u64,
        "every probe of a closed port is counted: {dropped} for {} ports",
        ports.len() - 2
    );

    // Per-service rules and the global deny list.
    assert!(served(&t.client, CLIENT, 80) && served(&t.client, CLIENT, 8443));
    let denied_before = counter(&lb, "drop_denied_service");
    assert!(unanswered(&t.client, DENIED, 80), "web denies 10.0.1.64/26");
    assert!(
        unanswered(&t.client, DENIED, 8443),
        "alt allows only two hosts"
    );
    assert!(
        unanswered(&t.client, DENIED_BUT_ALT, 80),
        "web denies 10.0.1.64/26"
    );
    assert!(
        served(&t.client, DENIED_BUT_ALT, 8443),
        "alt's more specific allow rule wins over its /24 deny"
    );
    assert!(
        counter(&lb, "drop_denied_service") > denied_before,
        "denied SYNs are counted"
    );
    let banned_before = counter(&lb, "drop_denied_global");
    for port in [80, 8443, OWN_PORT] {
        assert!(
            unanswered(&t.client, BANNED, port),
            "{BANNED} is banned everywhere ({port})"
        );
    }
    assert!(counter(&lb, "drop_denied_global") > banned_before);
    // The allowed client is still served after all that.
    assert!(served(&t.client, CLIENT, 80));
    // Nothing reached a backend from a denied source: nginx logged none.
    for w in &webs {
        let log = std::fs::read_to_string(w.access_log()).unwrap_or_default();
        for a in [DENIED, BANNED] {
            assert!(
                !log.contains(&a.to_string()),
                "{a} reached a backend:\n{log}"
            );
        }
    }
}

#[test]
fn root_a_syn_flood_from_one_source_is_rate_limited_while_a_legitimate_client_is_served() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let _webs: Vec<Nginx> = t.start_webs();
    const FLOODER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 200);
    add_client_addresses(&t, &[FLOODER]);
    const PER_SOURCE: u64 = 500;
    let lb = LbDaemon::start(&t.lb, |sock| {
        config(
            sock,
            "drop",
            &format!(
                "source_new_flows_per_sec = {PER_SOURCE}\nsource_new_flows_burst = {PER_SOURCE}\n\
                 new_flows_per_sec = 50000"
            ),
        )
        .replace("deny = [\"10.0.1.128/25\"]\n", "")
    });
    assert!(served(&t.client, CLIENT, 80));
    let before = lb.status()["counters"].clone();

    // The legitimate client: one request per new connection, paced, for as
    // long as the flood runs.
    let legit = {
        let ns = Netns::attach(&t.client.name);
        std::thread::spawn(move || {
            ns.run(|| {
                let (mut ok, mut failed) = (0u32, Vec::new());
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(4) {
                    match http::get(vip(80), "/") {
                        Ok((200, _)) => ok += 1,
                        other => failed.push(format!("{other:?}")),
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                (ok, failed)
            })
        })
    };
    let f = flood::syn_flood(
        &t.client,
        FLOODER,
        SocketAddrV4::new(VIP, 80),
        400_000,
        Duration::from_secs(4),
    );
    let (ok, failed) = legit.join().unwrap();
    let after = lb.status();
    let delta =
        |name: &str| after["counters"][name].as_u64().unwrap() - before[name].as_u64().unwrap();
    let total = ok as usize + failed.len();
    let rate = ok as f64 / total as f64;
    println!(
        "flood: {} SYNs in {:.1} s ({:.0}/s); legitimate requests: {ok}/{total} ({:.2}%) succeeded; \
         drop_source_rate {}, drop_global_rate {}, new_flows {}; connection table {}",
        f.sent,
        f.elapsed.as_secs_f64(),
        f.sent as f64 / f.elapsed.as_secs_f64(),
        100.0 * rate,
        delta("drop_source_rate"),
        delta("drop_global_rate"),
        delta("new_flows"),
        after["conntrack"]
    );
    assert!(
        f.sent >= 20_000,
        "the flood must be a flood: {} SYNs",
        f.sent
    );
    assert!(total >= 100, "the client made {total} requests");
    assert!(
        rate >= 0.99,
        "{ok}/{total} legitimate requests succeeded; failures: {failed:?}"
    );
    // The flood was cut down to its source's rate: what got through is at
    // most the burst plus the rate over the flood's duration.
    let admitted = delta("new_flows") - ok as u64;
    let allowed = PER_SOURCE + PER_SOURCE * (f.elapsed.as_secs() + 1);
    assert!(
        admitted <= allowed + 50,
        "{admitted} flood flows were admitted, at most {allowed} should be"
    );
    // Every SYN that reached the balancer and was refused is counted by
    // reason (a few may be lost on the veth before XDP sees them).
    assert!(
        delta("drop_source_rate") as f64 >= 0.9 * (f.sent - admitted) as f64,
        "{} of {} refused SYNs counted",
        delta("drop_source_rate"),
        f.sent - admitted
    );
    // The connection table was never close to full.
    let entries = after["conntrack"]["entries"].as_u64().unwrap_or(u64::MAX);
    assert!(
        entries < 20_000,
        "the connection table holds {entries} entries after the flood"
    );
}
