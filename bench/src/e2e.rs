//! The end-to-end part of `cargo xtask bench`: wrk through our balancer at
//! each hook it can run at on veth (TC, generic XDP, and native XDP where the
//! veths are set as a NIC would be), through HAProxy (the seed's: `mode tcp`,
//! `balance roundrobin`), through nftables DNAT, and through the balancer's
//! namespace with plain kernel forwarding and no balancer ("direct"), on one
//! topology (client, balancer, nginx), with keep-alive and with a new TCP
//! connection per request.
//!
//! Every path goes to the same single backend (web1), so that "direct" is a
//! fair anchor: the same backend work, the same hops, only the balancing
//! differs. Only the path being measured is in place: our daemon runs only
//! for its own cases (its program would otherwise look at every other path's
//! packets too). The cases are interleaved round by round and medians
//! reported, with whole-machine CPU per request beside requests/s (on two
//! cores, wrk and nginx saturate the machine: throughput alone measures the
//! load generator; the kernel charges softirq work to whatever process it
//! interrupts, so per-process CPU would flatter the kernel paths).

use std::{net::Ipv4Addr, process::Child, time::Duration};

use lb_userspace::config::Hook;

use lb_tests::{
    daemon::LbDaemon,
    nginx::Nginx,
    topology::{backend_addr, lb_config, service_block, Offloads, Topology},
    udp::{flood, UdpSink},
    TempDir,
};

/// One measured configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Our balancer at this hook.
    Lb(Hook),
    Haproxy,
    Nftables,
    Direct,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Lb(Hook::Tc) => "lb (TC)",
            Path::Lb(Hook::XdpGeneric) => "lb (generic XDP)",
            Path::Lb(Hook::Xdp) => "lb (native XDP)",
            Path::Lb(Hook::Auto) => "lb (auto)",
            Path::Haproxy => "HAProxy",
            Path::Nftables => "nftables DNAT",
            Path::Direct => "direct (no balancer)",
        }
    }

    /// The client's source ports for this path: disjoint per path, so that a
    /// backend never sees one path's connection reuse another path's
    /// addresses and ports while the other's TIME_WAIT or flow entries last.
    fn ports(self) -> &'static str {
        match self {
            Path::Lb(Hook::Tc) | Path::Lb(Hook::Auto) => "10000 17999",
            Path::Lb(Hook::XdpGeneric) => "18000 24999",
            Path::Lb(Hook::Xdp) => "25000 31999",
            Path::Haproxy => "32000 39999",
            Path::Nftables => "40000 49999",
            Path::Direct => "50000 64999",
        }
    }

    fn target(self) -> Ipv4Addr {
        match self {
            Path::Lb(_) => Ipv4Addr::new(10, 0, 0, 100),
            Path::Haproxy => Ipv4Addr::new(10, 0, 0, 101),
            Path::Nftables => Ipv4Addr::new(10, 0, 0, 102),
            Path::Direct => backend_addr(1),
        }
    }
}

/// One wrk run's figures.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Sample {
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Whole-machine busy CPU time per request, microseconds.
    pub cpu_us_per_request: f64,
    /// CPU of the balancer itself per request: HAProxy's process time; for the
    /// kernel paths, softirq time (where XDP, netfilter and forwarding run).
    pub balancer_cpu_us_per_request: f64,
}

/// The topology with every path but ours configured at once; our daemon is
/// started for its own cases, at the hook they ask for.
pub struct Bed {
    t: Topology,
    _webs: Vec<Nginx>,
    sinks: Vec<UdpSink>,
    lb: Option<(Hook, LbDaemon)>,
    haproxy: Child,
    offloads: Offloads,
    _dir: TempDir,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = self.haproxy.kill();
        let _ = self.haproxy.wait();
    }
}

impl Bed {
    /// The paths measured on veths set as `o`: native and generic XDP only
    /// where the veths let them forward (NIC-like); HAProxy and nftables
    /// once, on the veths users have.
    pub fn paths(o: Offloads) -> Vec<Path> {
        match o {
            Offloads::Default => vec![
                Path::Lb(Hook::Tc),
                Path::Haproxy,
                Path::Nftables,
                Path::Direct,
            ],
            Offloads::NicLike => vec![
                Path::Lb(Hook::Xdp),
                Path::Lb(Hook::Tc),
                Path::Lb(Hook::XdpGeneric),
                Path::Direct,
            ],
        }
    }

    pub fn new(prefix: &str, offloads: Offloads) -> Result<Bed, String> {
        let t = Topology::new(prefix, 2);
        t.set_offloads(offloads);
        let webs: Vec<Nginx> = t.start_webs();
        // The kernel paths need forwarding: let it through this time.
        t.lb.exec("nft", &["insert rule inet lbtest forward accept"]);
        t.lb.exec(
            "nft",
            &["add table ip lbbench; \
               add chain ip lbbench pre { type nat hook prerouting priority -100; }; \
               add rule ip lbbench pre ip daddr 10.0.0.102 tcp dport 80 dnat to 10.0.2.11; \
               add rule ip lbbench pre ip daddr 10.0.0.102 udp dport 53 dnat to 10.0.2.11:5353"],
        );
        t.lb.ip(&["addr", "add", "10.0.0.101/32", "dev", "lo"]);
        let dir = TempDir::new("bench");
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend f\n  bind 10.0.0.101:80\n  default_backend b\nbackend b\n  balance roundrobin\n  server web1 10.0.2.11:80\n",
        )
        .map_err(|e| e.to_string())?;
        let haproxy =
            t.lb.command("haproxy")
                .args(["-db", "-f", cfg.to_str().unwrap()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("starting haproxy (is it installed?): {e}"))?;
        let sinks = (1..=2)
            .map(|i| {
                UdpSink::start(
                    &t.backends[i - 1],
                    std::net::SocketAddrV4::new(backend_addr(i), 5353).into(),
                )
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let mut bed = Bed {
            t,
            _webs: webs,
            sinks,
            lb: None,
            haproxy,
            offloads,
            _dir: dir,
        };
        for p in Bed::paths(offloads) {
            bed.wrk(p, false, 1)
                .map_err(|e| format!("{} is not answering: {e}", p.name()))?;
        }
        Ok(bed)
    }

    /// Puts `path` in place: our daemon at the path's hook, or no daemon.
    fn arrange(&mut self, path: Path) {
        let want = match path {
            Path::Lb(h) => Some(h),
            _ => None,
        };
        if self.lb.as_ref().map(|(h, _)| *h) == want {
            return;
        }
        // Dropping the daemon stops it: it detaches and removes its pins.
        self.lb = None;
        if let Some(hook) = want {
            let services = format!(
                "{}{}",
                service_block("web", 80, "tcp", 1, 80),
                service_block("dns", 53, "udp", 1, 5353)
            );
            // wrk's one client opens more new connections a second than the
            // SYN-flood guard lets one source open by default (10,000): the
            // guard is off here, as nothing else measured has one.
            let d = LbDaemon::start(&self.t.lb, |sock| {
                lb_config(sock, &services)
                    .replace("hook = \"auto\"", &format!("hook = \"{}\"", hook.name()))
                    + "[firewall]\nsource_new_flows_per_sec = 0\nnew_flows_per_sec = 0\n"
            });
            let st = d.status();
            for a in st["attachments"].as_array().into_iter().flatten() {
                assert_eq!(a["hook"], hook.name(), "{a}");
            }
            self.lb = Some((hook, d));
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// How this bed's veths are set.
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// One wrk run of `secs` seconds against `path`.
    pub fn wrk(&mut self, path: Path, new_conn: bool, secs: u32) -> Result<Sample, String> {
        self.arrange(path);
        let url = format!("http://{}/", path.target());
        let dur = format!("{secs}s");
        let mut args = vec!["-t1", "-c32", "-d", dur.as_str(), "--latency"];
        if new_conn {
            args.extend(["-H", "Connection: close"]);
        }
        args.push(&url);
        self.t
            .client
            .sysctl("net.ipv4.ip_local_port_range", path.ports());
        let (cpu0, soft0) = machine_cpu();
        let ha0 = proc_cpu(self.haproxy.id());
        let out = self.t.client.try_exec("wrk", &args)?;
        let (cpu1, soft1) = machine_cpu();
        let ha1 = proc_cpu(self.haproxy.id());
        let rps = field(&out, "Requests/sec:")
            .ok_or_else(|| format!("no Requests/sec in wrk output:\n{out}"))?;
        let total = rps * secs as f64;
        if total < 1.0 || out.contains("Non-2xx") {
            return Err(format!("wrk saw errors:\n{out}"));
        }
        let balancer = match path {
            Path::Haproxy => ha1 - ha0,
            _ => soft1 - soft0,
        };
        Ok(Sample {
            requests_per_s: rps,
            p50_ms: percentile(&out, "50%").unwrap_or(f64::NAN),
            p99_ms: percentile(&out, "99%").unwrap_or(f64::NAN),
            cpu_us_per_request: (cpu1 - cpu0) * 1e6 / total,
            balancer_cpu_us_per_request: balancer * 1e6 / total,
        })
    }
}

impl Bed {
    /// Floods a UDP service through `path` (ours or nftables) from one socket
    /// for `secs`; returns datagrams sent and delivered to the backends, per second.
    pub fn pps(&mut self, path: Path, secs: f64) -> (f64, f64) {
        self.arrange(path);
        let before: u64 = self.sinks.iter().map(|s| s.received()).sum();
        let sent = flood(
            &self.t.client,
            std::net::SocketAddrV4::new(path.target(), 53).into(),
            secs,
        );
        std::thread::sleep(Duration::from_millis(300));
        let after: u64 = self.sinks.iter().map(|s| s.received()).sum();
        (sent as f64 / secs, (after - before) as f64 / secs)
    }
}

/// Whole-machine busy seconds and softirq seconds, from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let hz = 100.0; // USER_HZ
    if v.len() < 7 {
        return (0.0, 0.0);
    }
    // user nice system idle iowait irq softirq steal ...
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v.get(7).copied().unwrap_or(0.0);
    (busy / hz, v[6] / hz)
}

/// A process's user + system seconds.
fn proc_cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields after the command: state(skipped, not a number) ppid pgrp ... utime is field 14 overall.
    if f.len() < 13 {
        return 0.0;
    }
    (f[10] + f[11]) / 100.0
}

fn field(out: &str, key: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// wrk's latency distribution line ("  50%    1.23ms") in milliseconds.
fn percentile(out: &str, p: &str) -> Option<f64> {
    let l = out.lines().find(|l| l.trim_start().starts_with(p))?;
    let v = l.split_whitespace().nth(1)?;
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => return None,
    })
}

/// Median of the samples' field, with min and max.
pub fn median(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> (f64, f64, f64) {
    let mut v: Vec<f64> = samples.iter().map(f).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}
