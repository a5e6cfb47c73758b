//! `cargo xtask bench`: what one packet costs the XDP program, measured by
//! BPF_PROG_TEST_RUN in the kernel, side by side with a floor program that only
//! swaps MACs and bounces the frame (the least any XDP forwarder does), and how
//! the cost grows with backends, connection-table occupancy and scheduler.
//!
//! Forwarded cases rewrite the frame, and with repeat > 1 the kernel would run
//! every iteration after the first on the rewritten frame (measuring the
//! pass-through path instead). So they are measured as many calls with
//! repeat = 1, on a thread pinned to one CPU, after a warm-up, each call's
//! action and output checked, and the median of the kernel-reported durations
//! taken. Only a case whose output equals its input is also measured with
//! repeat = 1,000,000.
//!
//! Then end to end (see `crate::e2e`) and the control plane:
//! failover and promotion times and memory (see `crate::control`).
//!
//! `lb-bench [--quick] [--out DIR]` writes DIR/latest.md, latest.json and
//! latest.svg (default DIR: bench/results) and prints the tables; a full run
//! into bench/results also writes them into README.md's Benchmark section.

mod control;
mod e2e;

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::programs::{SchedClassifier, Xdp};
use control::{DaemonMemory, FailoverRun, Failure, PromotionRun};
use lb_tests::{
    frames::{Frame, TCP_ACK, TCP_SYN},
    testrun::{
        self, TestRunNet, B1, B1_MAC, B2, B2_MAC, CLIENT, CLIENT_MAC, VIP, X0_MAC, X1_MAC,
        XDP_PASS, XDP_REDIRECT, XDP_TX,
    },
};
use lb_userspace::{
    config::{BackendConfig, DownPolicy, Protocol, Scheduler, ServiceConfig, Steering},
    dataplane::{Dataplane, ServiceSpec},
    reconcile::desired_service,
};

#[derive(serde::Serialize)]
struct Row {
    group: &'static str,
    case: String,
    /// Median kernel-reported ns per packet.
    ns: f64,
    min_ns: f64,
    max_ns: f64,
    /// ns / the floor's ns.
    ratio_to_floor: f64,
    method: String,
}

/// Checks one run's action and output.
type Check = dyn Fn(u32, &[u8]) -> Result<(), String>;

struct Bench {
    calls: usize,
    warmup: usize,
    x0: u32,
    x1: u32,
}

/// A program under measurement: the XDP program, or the TC program with its
/// actions read as XDP's (a redirect as XDP_REDIRECT), so one check serves both.
enum Prog<'a> {
    Xdp(&'a mut Xdp),
    Tc(&'a mut SchedClassifier),
}

impl Prog<'_> {
    fn run(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, std::time::Duration), String> {
        match self {
            Prog::Xdp(p) => testrun::run(p, frame, ifindex, repeat),
            Prog::Tc(p) => {
                let (a, out, d) = testrun::run_tc(p, frame, ifindex, repeat)?;
                Ok((testrun::xdp_action_of(a), out, d))
            }
        }
    }
}

/// The data path's program at `hook`.
fn prog(dp: &mut Dataplane, tc: bool) -> Prog<'_> {
    if tc {
        Prog::Tc(dp.tc_program_mut())
    } else {
        Prog::Xdp(dp.program_mut())
    }
}

impl Bench {
    /// Median (min, max) of `calls` single runs of `frames[i % len]`, each checked.
    fn measure(
        &self,
        mut prog: Prog<'_>,
        frames: &[Vec<u8>],
        ifindex: u32,
        check: &Check,
    ) -> Result<(f64, f64, f64), String> {
        let mut ns = Vec::with_capacity(self.calls);
        for i in 0..self.warmup + self.calls {
            let f = &frames[i % frames.len()];
            let (action, out, d) = prog.run(f, ifindex, 1)?;
            check(action, &out)?;
            if i >= self.warmup {
                ns.push(d.as_nanos() as f64);
            }
        }
        ns.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Ok((ns[ns.len() / 2], ns[0], ns[ns.len() - 1]))
    }
}

fn client_tcp(sport: u16, flags: u8) -> Vec<u8> {
    let mut f = Frame::tcp((CLIENT, sport), (VIP, 80), flags);
    f.src_mac = CLIENT_MAC;
    f.dst_mac = X0_MAC;
    f.build()
}

fn service(n_backends: usize, scheduler: Scheduler) -> ServiceConfig {
    ServiceConfig {
        name: "web".into(),
        vip: VIP,
        port: 80,
        protocol: Protocol::Tcp,
        scheduler,
        on_backend_down: DownPolicy::KeepFlows,
        steering: Steering::None,
        health: None,
        firewall: Default::default(),
        // Every backend resolves: two addresses, many ports.
        backends: (0..n_backends)
            .map(|i| BackendConfig {
                name: format!("b{i}"),
                address: if i % 2 == 0 { B1 } else { B2 },
                port: 8000 + i as u16,
                weight: 1 + (i % 3) as u32,
                health: None,
            })
            .collect(),
        udp_idle_timeout: std::time::Duration::from_secs(60),
    }
}

fn udp_service() -> ServiceConfig {
    let mut s = service(2, Scheduler::RoundRobin);
    s.name = "dns".into();
    s.port = 53;
    s.protocol = Protocol::Udp;
    s
}

fn apply(dp: &mut Dataplane, services: &[ServiceConfig]) {
    let specs: Vec<ServiceSpec> = services.iter().map(|s| desired_service(s, 7)).collect();
    dp.apply(&specs).expect("writing the maps");
    // Next hops as the daemon keeps them: resolved from the namespace's
    // route and neighbour tables through rtnetlink.
    let hops = lb_userspace::nexthop::resolve_blocking(
        dp.hop_targets(),
        vec!["x0".into(), "x1".into()],
        std::time::Duration::from_secs(5),
    )
    .expect("resolving next hops");
    assert!(
        hops.iter().all(|(_, h)| h.is_some()),
        "every backend's next hop resolves in the bench's namespace: {hops:?}"
    );
    dp.invalidate_hops().unwrap();
    dp.set_hops(&hops).unwrap();
}

fn redirected(action: u32, out: &[u8]) -> Result<(), String> {
    if action != XDP_REDIRECT {
        return Err(format!("expected XDP_REDIRECT, got {action}"));
    }
    if out[0..6] != B1_MAC[..] && out[0..6] != B2_MAC[..] && out[0..6] != CLIENT_MAC {
        return Err("output not addressed to a backend or the client".into());
    }
    if out[6..12] != X1_MAC[..] && out[6..12] != X0_MAC[..] {
        return Err("output not from the balancer".into());
    }
    Ok(())
}

fn run_all(quick: bool) -> Result<Vec<Row>, String> {
    let calls = if quick { 3_000 } else { 30_000 };
    let warmup = calls / 10;
    let net = TestRunNet::new(&format!("bn{}", std::process::id() % 100_000));
    let floor_obj = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../lb-ebpf/target/bpfel-unknown-none/release/xdp-floor");
    let floor_bytes = std::fs::read(&floor_obj)
        .map_err(|e| format!("{}: {e} (cargo xtask bench builds it)", floor_obj.display()))?;
    net.x.run(move || -> Result<Vec<Row>, String> {
        pin_to_cpu(0);
        let idx = |n: &str| lb_userspace::config::if_index(n).unwrap();
        let b = Bench {
            calls,
            warmup,
            x0: idx("x0"),
            x1: idx("x1"),
        };
        let mut rows: Vec<Row> = Vec::new();
        let mut push =
            |group, case: &str, (ns, min, max): (f64, f64, f64), method: &str, floor: f64| {
                rows.push(Row {
                    group,
                    case: case.to_owned(),
                    ns,
                    min_ns: min,
                    max_ns: max,
                    ratio_to_floor: if floor > 0.0 { ns / floor } else { 1.0 },
                    method: method.to_owned(),
                });
                println!("  {group:<12} {case:<44} {ns:>7.1} ns/packet");
            };
        let single = format!("median of {calls} single runs");

        let syns: Vec<Vec<u8>> = (0..(calls + warmup) as u32)
            .map(|i| client_tcp(1024 + (i % 60000) as u16 + (i / 60000) as u16, TCP_SYN))
            .collect();
        let mut xdp_floor = 0.0;
        for tc in [false, true] {
            let (hook, floor_case, per_case) = if tc {
                ("TC", "MAC swap + bpf_redirect", "per case (TC)")
            } else {
                ("XDP", "MAC swap + XDP_TX", "per case (XDP)")
            };
            // The floor at this hook.
            let mut ebpf = aya::Ebpf::load(&floor_bytes).map_err(|e| e.to_string())?;
            let floor = if tc {
                let p: &mut SchedClassifier = ebpf
                    .program_mut("tc_floor")
                    .unwrap()
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| e.to_string())?;
                p.load().map_err(|e| e.to_string())?;
                let syn = client_tcp(40000, TCP_SYN);
                b.measure(Prog::Tc(p), std::slice::from_ref(&syn), b.x0, &|a, out| {
                    if a == XDP_REDIRECT && out[0..6] == CLIENT_MAC[..] {
                        Ok(())
                    } else {
                        Err("the TC floor did not swap and redirect".into())
                    }
                })?
            } else {
                let p: &mut Xdp = ebpf
                    .program_mut("floor")
                    .unwrap()
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| e.to_string())?;
                p.load().map_err(|e| e.to_string())?;
                let syn = client_tcp(40000, TCP_SYN);
                b.measure(Prog::Xdp(p), std::slice::from_ref(&syn), b.x0, &|a, out| {
                    if a == XDP_TX && out[0..6] == CLIENT_MAC[..] {
                        Ok(())
                    } else {
                        Err("floor did not swap and bounce".into())
                    }
                })?
            };
            push(
                if tc { "floor (TC)" } else { "floor (XDP)" },
                floor_case,
                floor,
                &single,
                floor.0,
            );
            let f = floor.0;
            if !tc {
                xdp_floor = f;
            }

            // The balancer at this hook, per case, with the default table size.
            let mut dp = Dataplane::load().map_err(|e| format!("{e:#}"))?;
            apply(&mut dp, &[service(2, Scheduler::RoundRobin), udp_service()]);
            // New flows: every call a new source port (the table is large enough).
            let new_flow = b.measure(prog(&mut dp, tc), &syns, b.x0, &redirected)?;
            push(
                per_case,
                "new TCP flow (SYN, round robin)",
                new_flow,
                &single,
                f,
            );
            // The handshake's last ACK of each of those flows: it moves the
            // flow from the transient table to the connection table.
            // The most recent ones: the transient table (65,536 entries, two
            // per flow) has forgotten the oldest SYNs of a full run.
            let n = (calls + warmup) as u32;
            let m = n.min(20_000);
            let acks: Vec<Vec<u8>> = (n - m..n)
                .map(|i| client_tcp(1024 + (i % 60000) as u16 + (i / 60000) as u16, TCP_ACK))
                .collect();
            let once = Bench {
                calls: m as usize * 10 / 11,
                warmup: m as usize - m as usize * 10 / 11,
                ..b
            };
            let promoted = once.measure(prog(&mut dp, tc), &acks, b.x0, &redirected)?;
            push(
                per_case,
                "handshake's last ACK (flow established)",
                promoted,
                &single,
                f,
            );
            // The last flow opened above: established now (round robin put
            // flow i on backend i % 2).
            let last = n - 1;
            let est_port = 1024 + (last % 60000) as u16 + (last / 60000) as u16;
            let (rb, rport, rmac) = if last.is_multiple_of(2) {
                (B1, 8000, B1_MAC)
            } else {
                (B2, 8001, B2_MAC)
            };
            let est = client_tcp(est_port, TCP_ACK);
            let established = b.measure(
                prog(&mut dp, tc),
                std::slice::from_ref(&est),
                b.x0,
                &redirected,
            )?;
            push(per_case, "established TCP flow", established, &single, f);
            // That flow's reply.
            let mut reply = Frame::tcp((rb, rport), (CLIENT, est_port), TCP_ACK);
            reply.src_mac = rmac;
            reply.dst_mac = X1_MAC;
            let reply = b.measure(prog(&mut dp, tc), &[reply.build()], b.x1, &redirected)?;
            push(per_case, "backend reply (reverse NAT)", reply, &single, f);
            let mut udp = Frame::udp((CLIENT, 5000), (VIP, 53));
            udp.src_mac = CLIENT_MAC;
            udp.dst_mac = X0_MAC;
            let udp = b.measure(prog(&mut dp, tc), &[udp.build()], b.x0, &redirected)?;
            push(per_case, "UDP flow", udp, &single, f);
            let mut other = Frame::tcp((CLIENT, 5555), (Ipv4Addr::new(10, 0, 1, 1), 22), TCP_SYN);
            other.dst_mac = X0_MAC;
            let other = other.build();
            let pass = b.measure(
                prog(&mut dp, tc),
                std::slice::from_ref(&other),
                b.x0,
                &|a, out| {
                    if a == XDP_PASS {
                        Ok(())
                    } else {
                        Err(format!("expected a pass, got {a} ({} bytes)", out.len()))
                    }
                },
            )?;
            push(per_case, "not for a service (passed)", pass, &single, f);
            // Output equals input: repeat is honest here.
            let (a, out, d) = prog(&mut dp, tc).run(&other, b.x0, 1_000_000)?;
            if a != XDP_PASS || out != other {
                return Err(format!("{hook}: the passed frame changed"));
            }
            let per = d.as_nanos() as f64;
            push(
                per_case,
                "not for a service (repeat = 1,000,000)",
                (per, per, per),
                "kernel average over 1,000,000 repeats",
                f,
            );
        }
        let f = xdp_floor;

        // How it grows: backends.
        for n in [2usize, 64, 1024] {
            let mut dp = Dataplane::load_with_conntrack(1 << 16).map_err(|e| format!("{e:#}"))?;
            apply(&mut dp, &[service(n, Scheduler::RoundRobin)]);
            let _ = testrun::run(dp.program_mut(), &client_tcp(2000, TCP_SYN), b.x0, 1)?;
            let r = b.measure(
                Prog::Xdp(dp.program_mut()),
                &[client_tcp(2000, TCP_ACK)],
                b.x0,
                &redirected,
            )?;
            push(
                "backends",
                &format!("established flow, {n} backends"),
                r,
                &single,
                f,
            );
        }
        // How it grows: flows in the connection table.
        for n in [1_000u32, 100_000, 1_000_000] {
            let mut dp = Dataplane::load_with_conntrack(1 << 21).map_err(|e| format!("{e:#}"))?;
            apply(&mut dp, &[service(2, Scheduler::RoundRobin)]);
            dp.insert_flows("web", "b0", control::flow_keys(n))
                .map_err(|e| format!("{e:#}"))?;
            let _ = testrun::run(dp.program_mut(), &client_tcp(3000, TCP_SYN), b.x0, 1)?;
            let r = b.measure(
                Prog::Xdp(dp.program_mut()),
                &[client_tcp(3000, TCP_ACK)],
                b.x0,
                &redirected,
            )?;
            push(
                "flows",
                &format!("established flow, {n} flows in the table"),
                r,
                &single,
                f,
            );
        }
        // New-flow cost per scheduler.
        for (name, sched) in [
            ("round-robin", Scheduler::RoundRobin),
            ("weighted-round-robin", Scheduler::WeightedRoundRobin),
            (
                "maglev",
                Scheduler::Maglev {
                    table_size: lb_common::maglev::DEFAULT_TABLE_SIZE,
                },
            ),
        ] {
            let mut dp = Dataplane::load_with_conntrack(1 << 21).map_err(|e| format!("{e:#}"))?;
            apply(&mut dp, &[service(16, sched)]);
            let r = b.measure(Prog::Xdp(dp.program_mut()), &syns, b.x0, &redirected)?;
            push(
                "schedulers",
                &format!("new flow, {name}, 16 backends"),
                r,
                &single,
                f,
            );
        }
        Ok(rows)
    })
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cpus} CPUs, Linux {}", kernel.trim())
}

/// One end-to-end result: a path and mode on a bed, the medians over rounds.
#[derive(serde::Serialize)]
struct E2e {
    /// How the bed's veths were set.
    veths: &'static str,
    path: &'static str,
    mode: &'static str,
    requests_per_s: (f64, f64, f64),
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_request: f64,
    balancer_cpu_us_per_request: f64,
}

/// UDP packets per second through one path.
#[derive(serde::Serialize)]
struct Pps {
    path: &'static str,
    sent_per_s: (f64, f64, f64),
    delivered_per_s: (f64, f64, f64),
}

fn veths_name(o: lb_tests::topology::Offloads) -> &'static str {
    match o {
        lb_tests::topology::Offloads::Default => "default (as ip link makes them)",
        lb_tests::topology::Offloads::NicLike => "NIC-like (TX checksum offload off, GRO on)",
    }
}

fn end_to_end(quick: bool) -> Result<(Vec<E2e>, Vec<Pps>), String> {
    use crate::e2e::{median, Bed, Path as P};
    use lb_tests::topology::Offloads;
    use lb_userspace::config::Hook;
    let (rounds, secs) = if quick { (1, 3) } else { (3, 5) };
    println!("end to end: wrk, {rounds} round(s) of {secs} s per case, interleaved");
    let mut e2e = Vec::new();
    let mut pps_rows = Vec::new();
    for offloads in [Offloads::Default, Offloads::NicLike] {
        println!("  veths {}", veths_name(offloads));
        let mut bed = Bed::new(&format!("be{}", std::process::id() % 10_000), offloads)?;
        let mut all: Vec<((P, bool), Vec<crate::e2e::Sample>)> = Vec::new();
        for p in Bed::paths(offloads) {
            for new_conn in [false, true] {
                all.push(((p, new_conn), Vec::new()));
            }
        }
        for round in 0..rounds {
            for ((p, new_conn), samples) in all.iter_mut() {
                let s = bed.wrk(*p, *new_conn, secs)?;
                println!(
                    "  round {} {:<22} {:<16} {:>9.0} req/s  {:>6.1} us CPU/req",
                    round + 1,
                    p.name(),
                    if *new_conn {
                        "new connection"
                    } else {
                        "keep-alive"
                    },
                    s.requests_per_s,
                    s.cpu_us_per_request
                );
                samples.push(s);
            }
        }
        e2e.extend(all.into_iter().map(|((p, new_conn), s)| E2e {
            veths: veths_name(bed.offloads()),
            path: p.name(),
            mode: if new_conn {
                "new connection per request"
            } else {
                "keep-alive"
            },
            requests_per_s: median(&s, |x| x.requests_per_s),
            p50_ms: median(&s, |x| x.p50_ms).0,
            p99_ms: median(&s, |x| x.p99_ms).0,
            cpu_us_per_request: median(&s, |x| x.cpu_us_per_request).0,
            balancer_cpu_us_per_request: median(&s, |x| x.balancer_cpu_us_per_request).0,
        }));
        if offloads != Offloads::Default {
            continue;
        }
        // Packets per second for a UDP service: ours against nftables.
        let mut pps: Vec<(P, Vec<(f64, f64)>)> =
            vec![(P::Lb(Hook::Tc), Vec::new()), (P::Nftables, Vec::new())];
        for round in 0..rounds {
            for (p, samples) in pps.iter_mut() {
                let r = bed.pps(*p, secs as f64);
                println!(
                    "  round {} {:<22} UDP flood        {:>9.0} sent/s {:>9.0} delivered/s",
                    round + 1,
                    p.name(),
                    r.0,
                    r.1
                );
                samples.push(r);
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        pps_rows.extend(pps.into_iter().map(|(p, s)| Pps {
            path: p.name(),
            sent_per_s: med(&mut s.iter().map(|x| x.0).collect()),
            delivered_per_s: med(&mut s.iter().map(|x| x.1).collect()),
        }));
    }
    Ok((e2e, pps_rows))
}

fn pps_markdown(p: &[Pps]) -> String {
    let mut md = String::from(
        "\n## Packets per second: a UDP service\n\n\
         One client socket floods 64-byte datagrams (sendmmsg, batches of 64) at the service; the backends count \
         what arrives. One flow, so one backend; the generator shares the two cores.\n\n\
         | path | sent/s (min-max) | delivered/s (min-max) |\n|---|---:|---:|\n",
    );
    for r in p {
        let _ = writeln!(
            md,
            "| {} | {:.0} ({:.0}-{:.0}) | {:.0} ({:.0}-{:.0}) |",
            r.path,
            r.sent_per_s.0,
            r.sent_per_s.1,
            r.sent_per_s.2,
            r.delivered_per_s.0,
            r.delivered_per_s.1,
            r.delivered_per_s.2
        );
    }
    if let [ours, nft] = p {
        let _ = writeln!(
            md,
            "\nlb / nftables DNAT, delivered packets per second: {:.2}",
            ours.delivered_per_s.0 / nft.delivered_per_s.0
        );
    }
    md
}

fn e2e_markdown(e: &[E2e]) -> String {
    let mut md = String::from(
        "\n## End to end: wrk through each path\n\n\
         Client, balancer and nginx in namespaces; wrk -t1 -c32. Every path goes to the same one backend \
         (web1), so that direct (plain kernel forwarding through the balancer's namespace, no balancer) is a \
         fair anchor. Whole-machine CPU per request (/proc/stat busy time over the run, divided by requests) \
         is the fair cost on a saturated 2-core machine; balancer CPU is HAProxy's process time, or softirq \
         time for the kernel paths (TC, XDP, netfilter and forwarding run there). Our daemon runs only for its \
         own cases, with its SYN-flood guard off (wrk's one client opens more new connections a second than \
         the guard lets one source open by default). Native and generic XDP cannot forward on veths as ip link makes them (they are refused), so \
         they are measured on veths set as a NIC would be, beside TC and direct on the same veths.\n\n\
         | veths | path | mode | requests/s (min-max) | p50 ms | p99 ms | CPU us/request | balancer CPU us/request |\n\
         |---|---|---|---:|---:|---:|---:|---:|\n",
    );
    for r in e {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} ({:.0}-{:.0}) | {:.2} | {:.2} | {:.1} | {:.1} |",
            r.veths,
            r.path,
            r.mode,
            r.requests_per_s.0,
            r.requests_per_s.1,
            r.requests_per_s.2,
            r.p50_ms,
            r.p99_ms,
            r.cpu_us_per_request,
            r.balancer_cpu_us_per_request
        );
    }
    md.push_str(
        "\n| veths | ratio | mode | requests/s | CPU per request |\n|---|---|---|---:|---:|\n",
    );
    let mut veths: Vec<&str> = e.iter().map(|r| r.veths).collect();
    veths.dedup();
    for v in veths {
        for mode in ["keep-alive", "new connection per request"] {
            let get = |p: &str| {
                e.iter()
                    .find(|r| r.veths == v && r.path == p && r.mode == mode)
            };
            for ours in ["lb (TC)", "lb (generic XDP)", "lb (native XDP)"] {
                let Some(o) = get(ours) else { continue };
                for other in ["HAProxy", "nftables DNAT", "direct (no balancer)"] {
                    if let Some(x) = get(other) {
                        let _ = writeln!(
                            md,
                            "| {v} | {ours} / {other} | {mode} | {:.2} | {:.2} |",
                            o.requests_per_s.0 / x.requests_per_s.0,
                            o.cpu_us_per_request / x.cpu_us_per_request
                        );
                    }
                }
            }
        }
    }
    md
}

/// One control-plane figure: the median over runs, min and max, and how it was measured.
#[derive(serde::Serialize)]
struct Figure {
    figure: String,
    unit: &'static str,
    median: f64,
    min: f64,
    max: f64,
    runs: usize,
    how: String,
}

/// The median of `values` (NaN if there are none).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl Figure {
    fn new(figure: impl Into<String>, unit: &'static str, values: &[f64], how: String) -> Figure {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let (median, min, max) = match v.as_slice() {
            [] => (f64::NAN, f64::NAN, f64::NAN),
            _ => (v[v.len() / 2], v[0], v[v.len() - 1]),
        };
        Figure {
            figure: figure.into(),
            unit,
            median,
            min,
            max,
            runs: v.len(),
            how,
        }
    }
}

/// Everything the control-plane part measured.
#[derive(serde::Serialize)]
struct Control {
    figures: Vec<Figure>,
    failovers: Vec<FailoverRun>,
    promotions: Vec<PromotionRun>,
    daemon: DaemonMemory,
}

const MIB: f64 = 1024.0 * 1024.0;

fn control_plane(quick: bool) -> Result<Control, String> {
    use control::{Bed, CHECK_INTERVAL_MS, CHECK_TIMEOUT_MS, FALL, FLOWS, TABLE_SIZE};
    let runs = if quick { 3 } else { 5 };
    println!("control plane: failovers and promotions ({runs} runs each), memory");
    let phase = std::cell::Cell::new(std::time::Instant::now());
    let total = |maps: &[control::MapMemory]| {
        maps.iter().map(|m| m.memlock_bytes).sum::<u64>() as f64 / MIB
    };
    let lap = |what: &str| {
        println!("  ({what}: {:.1} s)", phase.get().elapsed().as_secs_f64());
        phase.set(std::time::Instant::now());
    };
    let mut bed = Bed::new(&format!("bc{}", std::process::id() % 10_000))?;
    let idle = bed.idle()?;
    lap("testbed up");
    let mut failovers = bed.backend_failure(Failure::Stopped, runs, false)?;
    failovers.extend(bed.backend_failure(Failure::Silent, runs, false)?);
    lap("backend failures");
    let mut promotions = bed.switchovers(runs)?;
    promotions.push(bed.crash_promotion()?);
    lap("promotions");
    let daemon = bed.daemon_memory(idle, if quick { 1 } else { 3 }, runs)?;
    drop(bed);
    lap("daemon memory, failures during scrapes, testbed down");

    let checks = format!(
        "HTTP checks every {CHECK_INTERVAL_MS} ms, timeout {CHECK_TIMEOUT_MS} ms, fall {FALL} \
         (bound: interval x fall + timeout = {} ms)",
        CHECK_INTERVAL_MS * FALL as u64 + CHECK_TIMEOUT_MS
    );
    let rate = median(
        &failovers
            .iter()
            .map(|r| r.connections_per_s)
            .collect::<Vec<_>>(),
    );
    let mut figures = Vec::new();
    for (failure, runs, what, how) in [
        (
            Failure::Stopped,
            &failovers[..],
            "web1's nginx stopped",
            "SIGTERM to web1's nginx at T0 (its ports then refuse)",
        ),
        (
            Failure::Silent,
            &failovers[..],
            "web1 stops answering",
            "at T0 nftables in web1's namespace drops all its input (a hung or unplugged host: checks time out)",
        ),
        (
            Failure::Stopped,
            &daemon.failover_while_scraped[..],
            "web1's nginx stopped during a scrape of 1,000,000 flows",
            &*format!(
                "as the first row, with {} flows in the daemon's connection table and the failure 20 ms into a \
                 metrics request (a Prometheus scrape; config/prometheus.yml scrapes every 15 s), which took {:.0} ms (median)",
                daemon.flows,
                median(&daemon.failover_while_scraped.iter().filter_map(|r| r.scrape_ms).collect::<Vec<_>>())
            ),
        ),
    ] {
        let runs: Vec<&FailoverRun> = runs.iter().filter(|r| r.failure == failure).collect();
        let client: Vec<f64> = runs.iter().filter_map(|r| r.client_last_ms).collect();
        let late: usize = runs.iter().map(|r| r.client_after_last_flow).sum();
        let unsettled = runs.iter().filter(|r| !r.settled).count();
        figures.push(Figure::new(
            format!("{what}: failure to last new flow sent to web1"),
            "ms",
            &runs.iter().map(|r| r.last_new_flow_ms).collect::<Vec<_>>(),
            format!(
                "{how}; the client opens about {rate:.0} new TCP connections/s to the VIP; the time of the last \
                 increase of web1's new-flow counter in the data path (read every 1 ms from the daemon's pinned \
                 BACKEND_TRAFFIC); {checks}. {}{}",
                if late > 0 {
                    format!(
                        "The client's connections agree up to that point; after it, {late} connection(s) over the \
                         runs still reached web1 (the last at {:.0} ms, median): SYNs matching flows still tracked to web1",
                        median(&client)
                    )
                } else {
                    format!("The client's last connection to web1 agrees ({:.0} ms, median)", median(&client))
                },
                if unsettled > 0 {
                    format!("; in {unsettled} run(s) new flows still reached web1 at the end of the window")
                } else {
                    String::new()
                }
            ),
        ));
        figures.push(Figure::new(
            format!("{what}: failure to marked down"),
            "ms",
            &runs.iter().filter_map(|r| r.marked_down_ms).collect::<Vec<_>>(),
            "the timestamp of the daemon's log line saying web1 changed state to down (wall clock)".into(),
        ));
    }
    let planned: Vec<&PromotionRun> = promotions
        .iter()
        .filter(|p| p.kind == "planned switchover")
        .collect();
    let monitors = format!(
        "MySQL monitors every {} ms, timeout {} ms",
        control::MYSQL_INTERVAL_MS,
        control::MYSQL_TIMEOUT_MS
    );
    figures.push(Figure::new(
        "MySQL planned switchover: new primary writable to first write through the write VIP on it",
        "ms",
        &planned.iter().map(|p| p.switch_ms).collect::<Vec<_>>(),
        format!(
            "T0: the replica, caught up, runs STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0 after the \
             primary went read-only (back and forth between db1 and db2); a client writes through the write VIP \
             on a new connection every 10 ms; the start of the first write the new primary took; {monitors}; \
             writes taken by the old primary after it went read-only: {}",
            planned.iter().map(|p| p.stray_writes).sum::<usize>()
        ),
    ));
    figures.push(Figure::new(
        "MySQL planned switchover: writes refused (old primary read-only to first write on the new one)",
        "ms",
        &planned.iter().map(|p| p.outage_ms).collect::<Vec<_>>(),
        "as above, from the old primary's SET GLOBAL read_only = 1".into(),
    ));
    for p in promotions.iter().filter(|p| p.kind != "planned switchover") {
        figures.push(Figure::new(
            "MySQL primary killed, replica promoted: promotion to first write through the write VIP on it",
            "ms",
            &[p.switch_ms],
            format!(
                "SIGKILL to the primary; the replica was promoted (T0) {:.0} ms later, once `lb status` showed no \
                 primary (writes were reset meanwhile); measured as above; once: the killed server stays down",
                p.outage_ms - p.switch_ms
            ),
        ));
    }
    let d = &daemon;
    figures.push(Figure::new(
        format!("Daemon's maps, {} flows in the table (kernel memory)", d.flows),
        "MiB",
        &[total(&d.maps)],
        format!(
            "the daemon runs with `conntrack_size = {TABLE_SIZE}`; {FLOWS} copies of a real flow written into its \
             pinned connection table (the daemon's census then counted {} entries); the sum of `memlock` in the fdinfo of \
             every map it holds (below); the tables are preallocated LRU hash maps: idle, the same maps took {:.1} MiB",
            d.present,
            total(&d.idle.maps)
        ),
    ));
    // Per entry of each flow table: its kernel memory over its entries
    // (preallocated: the same at any fill).
    for (map, what) in [
        (
            lb_common::maps::CONNTRACK,
            "connection table (client side of an established flow)",
        ),
        (
            lb_common::maps::REVERSE,
            "reply table (reply side of an established flow)",
        ),
        (
            lb_common::maps::TRANSIENT,
            "transient table (one side of a half-open or closed flow)",
        ),
    ] {
        if let Some(m) = d.maps.iter().find(|m| m.name == map && m.max_entries > 0) {
            figures.push(Figure::new(
                format!("Kernel memory per entry, {what}"),
                "bytes",
                &[m.memlock_bytes as f64 / m.max_entries as f64],
                format!(
                    "`memlock` of {map} ({:.1} MiB) over its {} entries",
                    m.memlock_bytes as f64 / (1024.0 * 1024.0),
                    m.max_entries
                ),
            ));
        }
    }
    let kib = |k: u64| k as f64 / 1024.0;
    for (what, v, how) in [
        (
            "Daemon RSS, idle".to_owned(),
            d.idle.rss_kib,
            "VmRSS of `lb run` with this testbed's config, once every check has passed".to_owned(),
        ),
        (
            "Daemon RSS after the failover and promotion runs".to_owned(),
            d.rss_after_runs_kib,
            "VmRSS".to_owned(),
        ),
        (
            format!("Daemon RSS, {} flows in the table", d.flows),
            d.rss_full_kib,
            "VmRSS after the status and metrics requests below".to_owned(),
        ),
        (
            "Daemon peak RSS".to_owned(),
            d.hwm_kib,
            format!(
                "VmHWM at the end of the runs ({:.1} MiB when idle)",
                kib(d.idle.hwm_kib)
            ),
        ),
    ] {
        figures.push(Figure::new(what, "MiB", &[kib(v)], how));
    }
    for (n, ms) in &d.status_ms {
        figures.push(Figure::new(
            format!("`lb status` round trip, {n} entries in the table"),
            "ms",
            ms,
            "on the control socket; the established flows per backend are the data path's own counts \
             (O(backends), whatever the flows)"
                .into(),
        ));
    }
    figures.push(Figure::new(
        format!(
            "Metrics request (a Prometheus scrape), {} flows in the table",
            d.flows
        ),
        "ms",
        &d.metrics_full_ms,
        "a scrape reads the same counts as status: O(backends)".into(),
    ));
    Ok(Control {
        figures,
        failovers,
        promotions,
        daemon,
    })
}

fn control_markdown(c: &Control) -> String {
    use control::{
        CHECK_INTERVAL_MS, CHECK_TIMEOUT_MS, FALL, MYSQL_INTERVAL_MS, MYSQL_TIMEOUT_MS, RISE,
    };
    let mut md = format!(
        "\n## Control plane\n\n\
         One testbed in namespaces: client, balancer, two nginx backends (web1, web2; :80 and :443) and two MariaDB \
         servers (db1 primary, db2 its replica, GTID replication), behind the real `lb` daemon with the seed's kinds of \
         services: `web` (:80, HTTP checks every {CHECK_INTERVAL_MS} ms, timeout {CHECK_TIMEOUT_MS} ms, rise {RISE}, \
         fall {FALL}), `web-tls` (:443, TCP checks every 250 ms), `mysql-write` and `mysql-read` (MySQL monitors every \
         {MYSQL_INTERVAL_MS} ms, timeout {MYSQL_TIMEOUT_MS} ms). Times are from the event the row names. Except for the \
         scrape in the rows that say so, nothing asks the daemon for its status while a time is measured (status and \
         metrics read the data path's per-backend counts; only `lb census` walks the table, off the daemon's loop). \
         The same 2 cores run the client, the servers and the daemon.\n\n\
         | figure | median | min-max | runs | how it was measured |\n|---|---:|---:|---:|---|\n"
    );
    for f in &c.figures {
        let prec = if f.unit == "MiB" { 1 } else { 0 };
        let _ = writeln!(
            md,
            "| {} | {:.prec$} {} | {:.prec$}-{:.prec$} | {} | {} |",
            f.figure, f.median, f.unit, f.min, f.max, f.runs, f.how
        );
    }
    let d = &c.daemon;
    let _ = write!(
        md,
        "\nThe daemon's maps with {} flows in its connection table (fdinfo `memlock`):\n\n\
         | map | type | entries | KiB |\n|---|---|---:|---:|\n",
        d.flows
    );
    for m in &d.maps {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} |",
            if m.name.is_empty() {
                "(unnamed)"
            } else {
                &m.name
            },
            m.kind,
            m.max_entries,
            m.memlock_bytes as f64 / 1024.0
        );
    }
    md
}

fn write_outputs(
    dir: &Path,
    rows: &[Row],
    e2e: &[E2e],
    pps: &[Pps],
    control: &Control,
    quick: bool,
) -> std::io::Result<String> {
    std::fs::create_dir_all(dir)?;
    let mach = machine();
    let when = String::from_utf8_lossy(
        &std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()?
            .stdout,
    )
    .trim()
    .to_owned();
    let cmd = if quick {
        "sudo cargo xtask bench --quick"
    } else {
        "sudo cargo xtask bench"
    };
    let mut md = format!(
        "# lb benchmark: per-packet cost of the data path, at XDP and at TC\n\n\
         Run {when} on {mach}, with `{cmd}`. BPF_PROG_TEST_RUN, one CPU; ns/packet is the median of the \
         kernel-reported durations of single runs (min-max in brackets), each run's action and output checked. \
         Each hook has its floor: a program that only swaps MACs and sends the frame back (XDP_TX at XDP, \
         bpf_redirect to the ingress interface at TC); each case is a multiple of its own hook's floor. A TC \
         run starts from a socket buffer the kernel builds for it, so its times include more of the kernel \
         than an XDP run's. The groups after the per-case ones are measured at XDP.\n\n\
         | group | case | ns/packet | min-max | x floor |\n|---|---|---:|---:|---:|\n"
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.0}-{:.0} | {:.2} |",
            r.group, r.case, r.ns, r.min_ns, r.max_ns, r.ratio_to_floor
        );
    }
    md.push_str(&e2e_markdown(e2e));
    md.push_str(&pps_markdown(pps));
    md.push_str(&control_markdown(control));
    std::fs::write(dir.join("latest.md"), &md)?;
    let json = serde_json::json!({ "machine": mach, "when": when, "command": cmd, "rows": rows, "end_to_end": e2e, "udp_pps": pps, "control_plane": control });
    std::fs::write(
        dir.join("latest.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )?;
    // A horizontal bar chart, no external assets.
    let max = rows.iter().map(|r| r.ns).fold(1.0, f64::max);
    let (bar_x, width, h) = (330.0, 420.0, 22.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"820\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"18\" font-size=\"14\" font-weight=\"bold\">ns per packet (median), {mach}</text>\n",
        40.0 + h * rows.len() as f64
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 30.0 + h * i as f64;
        let w = width * r.ns / max;
        let color = if r.group.starts_with("floor") {
            "#8c959f"
        } else {
            "#0969da"
        };
        let _ = writeln!(
            svg,
            "<text x=\"10\" y=\"{:.0}\">{}: {}</text><rect x=\"{bar_x}\" y=\"{:.0}\" width=\"{w:.1}\" height=\"14\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.0}\">{:.1} ns ({:.2}x)</text>",
            y + 12.0, r.group, r.case.replace('&', "and"), y + 1.0, bar_x + w + 5.0, y + 12.0, r.ns, r.ratio_to_floor
        );
    }
    svg.push_str("</svg>\n");
    std::fs::write(dir.join("latest.svg"), svg)?;
    println!("\n{md}");
    Ok(md)
}

/// Where the README carries the results of the latest full run, between
/// these two lines: a full run writes them there, so nothing is typed by hand.
const README_BEGIN: &str =
    "<!-- bench results: written by `cargo xtask bench` (full run), do not edit -->";
const README_END: &str = "<!-- end of bench results -->";

/// Puts `md` (latest.md, without its title and with its sections one level
/// deeper, under the README's Benchmark section) between the README's markers.
fn update_readme(readme: &Path, md: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(readme).map_err(|e| format!("{}: {e}", readme.display()))?;
    let (Some(b), Some(e)) = (text.find(README_BEGIN), text.find(README_END)) else {
        return Err(format!(
            "{}: no lines {README_BEGIN} and {README_END} to put the results between",
            readme.display()
        ));
    };
    let body: Vec<String> = md
        .lines()
        .skip_while(|l| l.starts_with("# ") || l.is_empty())
        .map(|l| match l.strip_prefix("## ") {
            Some(h) => format!("#### {h}"),
            None => l.to_owned(),
        })
        .collect();
    let new = format!(
        "{}\n\n{}\n\n{}",
        &text[..b + README_BEGIN.len()],
        body.join("\n").trim_end(),
        &text[e..]
    );
    std::fs::write(readme, new).map_err(|e| format!("{}: {e}", readme.display()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out_arg = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = out_arg
        .clone()
        .unwrap_or_else(|| root.join("bench/results"));
    lb_tests::require_root();
    println!(
        "lb benchmark ({}): per-packet cost through BPF_PROG_TEST_RUN",
        if quick { "quick" } else { "full" }
    );
    let start = std::time::Instant::now();
    let mut took = Vec::new();
    let mut timed = |part: &'static str, t: std::time::Instant| {
        took.push(format!("{part} {:.0} s", t.elapsed().as_secs_f64()));
    };
    if args.iter().any(|a| a == "--per-packet") {
        // Only the per-packet table, printed (a developer's loop).
        if let Err(e) = run_all(quick) {
            eprintln!("lb-bench: {e}");
            std::process::exit(1);
        }
        return;
    }
    let mut run = || -> Result<_, String> {
        let t = std::time::Instant::now();
        let rows = run_all(quick)?;
        timed("per packet", t);
        let t = std::time::Instant::now();
        let (e2e, pps) = end_to_end(quick)?;
        timed("end to end", t);
        let t = std::time::Instant::now();
        let control = control_plane(quick)?;
        timed("control plane", t);
        Ok((rows, e2e, pps, control))
    };
    let (rows, e2e, pps, control) = run().unwrap_or_else(|e| {
        eprintln!("lb-bench: {e}");
        std::process::exit(1);
    });
    let md = write_outputs(&out, &rows, &e2e, &pps, &control, quick).unwrap_or_else(|e| {
        eprintln!("lb-bench: writing {}: {e}", out.display());
        std::process::exit(1);
    });
    if quick || out_arg.is_some() {
        println!("README.md not updated (only a full run into bench/results updates it)");
    } else if let Err(e) = update_readme(&root.join("README.md"), &md) {
        eprintln!("lb-bench: {e}");
        std::process::exit(1);
    } else {
        println!("README.md's results updated");
    }
    println!(
        "done in {:.0} s ({}); results in {}",
        start.elapsed().as_secs_f64(),
        took.join(", "),
        out.display()
    );
}
