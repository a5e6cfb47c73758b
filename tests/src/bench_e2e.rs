//! The end-to-end part of `cargo xtask bench`: wrk through our XDP balancer,
//! through HAProxy (the seed's: `mode tcp`, `balance roundrobin`), through
//! nftables DNAT round robin (`numgen inc mod 2`), and straight to one backend,
//! on one topology (client, balancer, two nginx), with keep-alive and with a
//! new TCP connection per request. The cases are interleaved round by round
//! and medians reported, with whole-machine CPU per request beside requests/s
//! (on two cores, wrk and nginx saturate the machine: throughput alone
//! measures the load generator; the kernel charges softirq work to whatever
//! process it interrupts, so per-process CPU would flatter the kernel paths).

use std::{net::Ipv4Addr, process::Child, time::Duration};

use crate::{
    daemon::LbDaemon,
    nginx::Nginx,
    topology::{backend_addr, lb_config, service_block, Topology},
    udp::{flood, UdpSink},
    TempDir,
};

/// One measured configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Ours,
    Haproxy,
    Nftables,
    Direct,
}

impl Path {
    pub const ALL: [Path; 4] = [Path::Ours, Path::Haproxy, Path::Nftables, Path::Direct];

    pub fn name(self) -> &'static str {
        match self {
            Path::Ours => "lb (XDP)",
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
            Path::Ours => "10000 24999",
            Path::Haproxy => "25000 34999",
            Path::Nftables => "35000 49999",
            Path::Direct => "50000 64999",
        }
    }

    fn target(self) -> Ipv4Addr {
        match self {
            Path::Ours => Ipv4Addr::new(10, 0, 0, 100),
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

/// The topology with every path configured at once, so runs can interleave.
pub struct Bed {
    t: Topology,
    _webs: Vec<Nginx>,
    sinks: Vec<UdpSink>,
    _lb: LbDaemon,
    haproxy: Child,
    _dir: TempDir,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = self.haproxy.kill();
        let _ = self.haproxy.wait();
    }
}

impl Bed {
    pub fn new(prefix: &str) -> Result<Bed, String> {
        let t = Topology::new(prefix, 2);
        let webs: Vec<Nginx> = t.start_webs();
        // The kernel paths need forwarding: let it through this time.
        t.lb.exec("nft", &["insert rule inet lbtest forward accept"]);
        t.lb.exec(
            "nft",
            &["add table ip lbbench; \
               add chain ip lbbench pre { type nat hook prerouting priority -100; }; \
               add rule ip lbbench pre ip daddr 10.0.0.102 tcp dport 80 dnat to numgen inc mod 2 map { 0 : 10.0.2.11, 1 : 10.0.2.12 }; \
               add rule ip lbbench pre ip daddr 10.0.0.102 udp dport 53 dnat to numgen inc mod 2 map { 0 : 10.0.2.11 . 5353, 1 : 10.0.2.12 . 5353 }"],
        );
        t.lb.ip(&["addr", "add", "10.0.0.101/32", "dev", "lo"]);
        let dir = TempDir::new("bench");
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend f\n  bind 10.0.0.101:80\n  default_backend b\nbackend b\n  balance roundrobin\n  server web1 10.0.2.11:80\n  server web2 10.0.2.12:80\n",
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
        let lb = LbDaemon::start(&t.lb, |sock| {
            lb_config(
                sock,
                &format!(
                    "{}{}",
                    service_block("web", 80, "tcp", 2, 80),
                    service_block("dns", 53, "udp", 2, 5353)
                ),
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        let bed = Bed {
            t,
            _webs: webs,
            sinks,
            _lb: lb,
            haproxy,
            _dir: dir,
        };
        for p in Path::ALL {
            bed.wrk(p, false, 1)
                .map_err(|e| format!("{} is not answering: {e}", p.name()))?;
        }
        Ok(bed)
    }

    /// One wrk run of `secs` seconds against `path`.
    pub fn wrk(&self, path: Path, new_conn: bool, secs: u32) -> Result<Sample, String> {
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
    pub fn pps(&self, path: Path, secs: f64) -> (f64, f64) {
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
