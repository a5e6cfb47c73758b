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
//! `lb-bench [--quick] [--out DIR]` writes DIR/latest.md, latest.json and
//! latest.svg (default DIR: bench/results) and prints the table.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::programs::Xdp;
use lb_common::FlowKey;
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

impl Bench {
    /// Median (min, max) of `calls` single runs of `frames[i % len]`, each checked.
    fn measure(
        &self,
        prog: &mut Xdp,
        frames: &[Vec<u8>],
        ifindex: u32,
        check: &Check,
    ) -> Result<(f64, f64, f64), String> {
        let mut ns = Vec::with_capacity(self.calls);
        for i in 0..self.warmup + self.calls {
            let f = &frames[i % frames.len()];
            let (action, out, d) = testrun::run(prog, f, ifindex, 1)?;
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
        maglev_table_size: lb_common::maglev::DEFAULT_TABLE_SIZE,
        steering: Steering::None,
        mysql: None,
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
    let specs: Vec<ServiceSpec> = services
        .iter()
        .map(|s| ServiceSpec::from_config(s, 7))
        .collect();
    dp.apply(&specs).expect("writing the maps");
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

        // The floor.
        let mut ebpf = aya::Ebpf::load(&floor_bytes).map_err(|e| e.to_string())?;
        let floor_prog: &mut Xdp = ebpf
            .program_mut("floor")
            .unwrap()
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        floor_prog.load().map_err(|e| e.to_string())?;
        let syn = client_tcp(40000, TCP_SYN);
        let floor = b.measure(floor_prog, std::slice::from_ref(&syn), b.x0, &|a, out| {
            if a == XDP_TX && out[0..6] == CLIENT_MAC[..] {
                Ok(())
            } else {
                Err("floor did not swap and bounce".into())
            }
        })?;
        push("floor", "MAC swap + XDP_TX", floor, &single, floor.0);
        let f = floor.0;

        // The balancer, per case.
        let mut dp = Dataplane::load_with_conntrack(1 << 21).map_err(|e| format!("{e:#}"))?;
        apply(&mut dp, &[service(2, Scheduler::RoundRobin), udp_service()]);
        let syns: Vec<Vec<u8>> = (0..(calls + warmup) as u32)
            .map(|i| client_tcp(1024 + (i % 60000) as u16 + (i / 60000) as u16, TCP_SYN))
            .collect();
        // New flows: every call a new source port (the table is large enough).
        let new_flow = b.measure(dp.program_mut(), &syns, b.x0, &redirected)?;
        push(
            "per case",
            "new TCP flow (SYN, round robin)",
            new_flow,
            &single,
            f,
        );
        let est = client_tcp(1024, TCP_ACK);
        let established = b.measure(
            dp.program_mut(),
            std::slice::from_ref(&est),
            b.x0,
            &redirected,
        )?;
        push("per case", "established TCP flow", established, &single, f);
        // The reply of the flow of port 1024 (it went to b0 = 10.0.2.11:8000).
        let mut reply = Frame::tcp((B1, 8000), (CLIENT, 1024), TCP_ACK);
        reply.src_mac = B1_MAC;
        reply.dst_mac = X1_MAC;
        let reply = b.measure(dp.program_mut(), &[reply.build()], b.x1, &redirected)?;
        push("per case", "backend reply (reverse NAT)", reply, &single, f);
        let mut udp = Frame::udp((CLIENT, 5000), (VIP, 53));
        udp.src_mac = CLIENT_MAC;
        udp.dst_mac = X0_MAC;
        let udp = b.measure(dp.program_mut(), &[udp.build()], b.x0, &redirected)?;
        push("per case", "UDP flow", udp, &single, f);
        let mut other = Frame::tcp((CLIENT, 5555), (Ipv4Addr::new(10, 0, 1, 1), 22), TCP_SYN);
        other.dst_mac = X0_MAC;
        let other = other.build();
        let pass = b.measure(
            dp.program_mut(),
            std::slice::from_ref(&other),
            b.x0,
            &|a, out| {
                if a == XDP_PASS {
                    Ok(())
                } else {
                    Err(format!("expected XDP_PASS, got {a} ({} bytes)", out.len()))
                }
            },
        )?;
        push("per case", "not for a service (passed)", pass, &single, f);
        // Output equals input: repeat is honest here.
        let (a, out, d) = testrun::run(dp.program_mut(), &other, b.x0, 1_000_000)?;
        if a != XDP_PASS || out != other {
            return Err("the passed frame changed".into());
        }
        let per = d.as_nanos() as f64;
        push(
            "per case",
            "not for a service (repeat = 1,000,000)",
            (per, per, per),
            "kernel average over 1,000,000 repeats",
            f,
        );

        // How it grows: backends.
        for n in [2usize, 64, 1024] {
            let mut dp = Dataplane::load_with_conntrack(1 << 16).map_err(|e| format!("{e:#}"))?;
            apply(&mut dp, &[service(n, Scheduler::RoundRobin)]);
            let _ = testrun::run(dp.program_mut(), &client_tcp(2000, TCP_SYN), b.x0, 1)?;
            let r = b.measure(
                dp.program_mut(),
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
            let keys = (0..n).map(|i| FlowKey {
                src: Ipv4Addr::from(0x0a64_0000 + i).octets(),
                dst: VIP.octets(),
                sport: ((i % 50_000) as u16 + 1024).to_be_bytes(),
                dport: 80u16.to_be_bytes(),
                proto: 6,
                _pad: [0; 3],
            });
            dp.insert_flows("web", "b0", keys)
                .map_err(|e| format!("{e:#}"))?;
            let _ = testrun::run(dp.program_mut(), &client_tcp(3000, TCP_SYN), b.x0, 1)?;
            let r = b.measure(
                dp.program_mut(),
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
            ("maglev", Scheduler::Maglev),
        ] {
            let mut dp = Dataplane::load_with_conntrack(1 << 21).map_err(|e| format!("{e:#}"))?;
            apply(&mut dp, &[service(16, sched)]);
            let r = b.measure(dp.program_mut(), &syns, b.x0, &redirected)?;
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

/// One end-to-end result: a path and mode, the medians over rounds.
#[derive(serde::Serialize)]
struct E2e {
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

fn end_to_end(quick: bool) -> Result<(Vec<E2e>, Vec<Pps>), String> {
    use lb_tests::bench_e2e::{median, Bed, Path as P};
    let (rounds, secs) = if quick { (1, 3) } else { (3, 5) };
    println!("end to end: wrk, {rounds} round(s) of {secs} s per case, interleaved");
    let bed = Bed::new(&format!("be{}", std::process::id() % 10_000))?;
    let mut all: Vec<((P, bool), Vec<lb_tests::bench_e2e::Sample>)> = Vec::new();
    for p in P::ALL {
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
    // Packets per second for a UDP service: ours against nftables.
    let mut pps: Vec<(P, Vec<(f64, f64)>)> = vec![(P::Ours, Vec::new()), (P::Nftables, Vec::new())];
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
    let pps = pps
        .into_iter()
        .map(|(p, s)| Pps {
            path: p.name(),
            sent_per_s: med(&mut s.iter().map(|x| x.0).collect()),
            delivered_per_s: med(&mut s.iter().map(|x| x.1).collect()),
        })
        .collect();
    let e2e = all
        .into_iter()
        .map(|((p, new_conn), s)| E2e {
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
        })
        .collect();
    Ok((e2e, pps))
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
         Client, balancer and two nginx backends in namespaces; wrk -t1 -c32. Whole-machine CPU per request \
         (/proc/stat busy time over the run, divided by requests) is the fair cost on a saturated 2-core machine; \
         balancer CPU is HAProxy's process time, or softirq time for the kernel paths (XDP, netfilter and \
         forwarding run there).\n\n\
         | path | mode | requests/s (min-max) | p50 ms | p99 ms | CPU us/request | balancer CPU us/request |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    for r in e {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} ({:.0}-{:.0}) | {:.2} | {:.2} | {:.1} | {:.1} |",
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
    md.push_str("\n| ratio | mode | requests/s | CPU per request |\n|---|---|---:|---:|\n");
    for mode in ["keep-alive", "new connection per request"] {
        let get = |p: &str| e.iter().find(|r| r.path == p && r.mode == mode);
        if let Some(ours) = get("lb (XDP)") {
            for other in ["HAProxy", "nftables DNAT", "direct (no balancer)"] {
                if let Some(o) = get(other) {
                    let _ = writeln!(
                        md,
                        "| lb / {other} | {mode} | {:.2} | {:.2} |",
                        ours.requests_per_s.0 / o.requests_per_s.0,
                        ours.cpu_us_per_request / o.cpu_us_per_request
                    );
                }
            }
        }
    }
    md
}

fn write_outputs(
    dir: &Path,
    rows: &[Row],
    e2e: &[E2e],
    pps: &[Pps],
    quick: bool,
) -> std::io::Result<()> {
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
        "# lb benchmark: per-packet cost of the XDP program\n\n\
         Run {when} on {mach}, with `{cmd}`. BPF_PROG_TEST_RUN, one CPU; ns/packet is the median of the \
         kernel-reported durations of single runs (min-max in brackets), each run's action and output checked. \
         The floor is a program that only swaps MACs and returns XDP_TX.\n\n\
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
    md.push_str("\nNot measured here yet: control-plane timings and memory (see the open benchmark issue).\n");
    std::fs::write(dir.join("latest.md"), &md)?;
    let json = serde_json::json!({ "machine": mach, "when": when, "command": cmd, "rows": rows, "end_to_end": e2e, "udp_pps": pps });
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
        let color = if r.group == "floor" {
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
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results"));
    lb_tests::require_root();
    println!(
        "lb benchmark ({}): per-packet cost through BPF_PROG_TEST_RUN",
        if quick { "quick" } else { "full" }
    );
    let start = std::time::Instant::now();
    match run_all(quick).and_then(|rows| Ok((rows, end_to_end(quick)?))) {
        Ok((rows, (e2e, pps))) => {
            if let Err(e) = write_outputs(&out, &rows, &e2e, &pps, quick) {
                eprintln!("lb-bench: writing {}: {e}", out.display());
                std::process::exit(1);
            }
            println!(
                "done in {:?}; results in {}",
                start.elapsed().max(Duration::ZERO),
                out.display()
            );
        }
        Err(e) => {
            eprintln!("lb-bench: {e}");
            std::process::exit(1);
        }
    }
}
