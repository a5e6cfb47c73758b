//! End-to-end (root): the metrics endpoint and the status page, against real
//! traffic through the real daemon; the page is loaded in headless Chromium.

use std::{
    collections::HashMap,
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::LbDaemon,
    http,
    load::Load,
    netns::Netns,
    nginx::Nginx,
    require_root,
    topology::{self, backend_addr, lb_config, service_block, Topology, LB_CLIENT_SIDE, VIP},
    unique, TempDir,
};

fn prefix() -> String {
    format!("p{}{}", std::process::id() % 10_000, unique())
}

fn metrics_addr() -> SocketAddr {
    "127.0.0.1:9100".parse().unwrap()
}

/// GET `path` from the metrics listener at `addr`, from inside `ns`.
fn fetch(ns: &Netns, addr: SocketAddr, path: &'static str) -> Result<String, String> {
    ns.run(move || match http::get(addr, path) {
        Ok((200, body)) => Ok(body),
        Ok((s, body)) => Err(format!("HTTP {s}: {body}")),
        Err(e) => Err(e.to_string()),
    })
}

/// Samples by (metric name, sorted labels).
type Samples = HashMap<(String, Vec<(String, String)>), f64>;

/// Parses the exposition with a Prometheus text-format parser (not string
/// search) into (name, sorted labels) -> value.
fn parse(text: &str) -> Samples {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    let mut out = HashMap::new();
    for s in scrape.samples {
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let mut labels: Vec<(String, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.sort();
        out.insert((s.metric, labels), v);
    }
    out
}

fn get(m: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    *m.get(&(name.to_owned(), l))
        .unwrap_or_else(|| panic!("no {name}{labels:?} in the metrics"))
}

fn count_arrivals(ns: &Netns) {
    ns.exec(
        "nft",
        &[&format!(
            "add table inet seen; add chain inet seen input {{ type filter hook input priority 0; }}; \
             add rule inet seen input ip saddr {} tcp dport 80 counter",
            topology::CLIENT
        )],
    );
}

fn arrivals(ns: &Netns) -> f64 {
    topology::parse_nft_packets(&ns.exec("nft", &["list", "chain", "inet", "seen", "input"])) as f64
}

/// Where test artifacts (the status page screenshot) are kept.
fn artifacts() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Headless Chromium (Debian's) inside `ns`; returns what it printed.
fn chromium(ns: &Netns, args: &[&str]) -> String {
    let profile = TempDir::new("chromium");
    let mut a = vec![
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ];
    let dir = format!("--user-data-dir={}", profile.path().display());
    a.push(&dir);
    a.extend_from_slice(args);
    ns.try_exec("chromium", &a).unwrap_or_else(|e| {
        panic!("headless Chromium failed (is Debian's chromium installed?): {e}")
    })
}

#[test]
fn root_metrics_count_exactly_what_was_sent_and_the_page_shows_the_backends() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let mut webs: Vec<Nginx> = t.start_webs();
    for b in &t.backends {
        count_arrivals(b);
    }
    let svc = service_block("web", 80, "tcp", 2, 80).replace(
        "scheduler = \"round-robin\"\n",
        // A check's timeout with room on a loaded 2-core machine: what is
        // measured here is counting, not how fast a failure is seen.
        "scheduler = \"round-robin\"\n[service.health]\nkind = \"http\"\ninterval_ms = 500\ntimeout_ms = 400\nrise = 1\nfall = 1\n",
    );
    let lb = LbDaemon::start(&t.lb, |sock| lb_config(sock, &svc));
    for w in ["web1", "web2"] {
        lb.wait_backend("web", w, Duration::from_secs(5), "checked and up", |b| {
            b["state"] == "up" && b["health"]["last"]["ok"] == true
        });
    }

    let text = fetch(&t.lb, metrics_addr(), "/metrics").expect("scraping /metrics");
    // Conventions: every counter ends in _total; units are base units.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w[3] == "counter" {
            assert!(w[2].ends_with("_total"), "counter without _total: {line}");
        }
        assert!(
            !w[2].contains("milliseconds") && !w[2].contains("kilobytes"),
            "not a base unit: {line}"
        );
    }
    let before = parse(&text);
    let seen_before = [arrivals(&t.backends[0]), arrivals(&t.backends[1])];
    assert_eq!(
        get(
            &before,
            "lb_xdp_attached",
            &[
                ("interface", "eth0"),
                ("hook", "tc"),
                ("mode", "tc"),
                (
                    "reason",
                    "auto: a virtual device (driver veth): TC keeps the socket buffer's checksum \
                     state and sends into the veth peer directly"
                )
            ]
        ),
        1.0
    );
    assert!(
        text.contains("lb_health_check_duration_seconds_bucket"),
        "check latency histogram"
    );

    const N: usize = 100;
    let ok = lb_tests::burst_ok(&t.client, SocketAddrV4::new(VIP, 80).into(), N);
    assert_eq!(ok, N);
    let after = parse(&fetch(&t.lb, metrics_addr(), "/metrics").unwrap());
    for (i, web) in ["web1", "web2"].iter().enumerate() {
        let l = [("service", "web"), ("backend", *web)];
        let flows =
            get(&after, "lb_backend_flows_total", &l) - get(&before, "lb_backend_flows_total", &l);
        let to = [
            ("service", "web"),
            ("backend", *web),
            ("direction", "to_backend"),
        ];
        let packets = get(&after, "lb_backend_packets_total", &to)
            - get(&before, "lb_backend_packets_total", &to);
        let seen = arrivals(&t.backends[i]) - seen_before[i];
        println!("{web}: +{flows} flows, +{packets} packets in the metrics; its own netfilter saw +{seen}");
        assert_eq!(
            flows,
            (N / 2) as f64,
            "{web}: flows increased by exactly what was sent"
        );
        assert_eq!(
            packets, seen,
            "{web}: packets increased by exactly what it received"
        );
    }
    // Each connection ended: it left the connection table (counted closed).
    assert!(get(&after, "lb_conntrack_entries", &[]) <= 2.0);
    assert!(
        get(&after, "lb_flows_total", &[("kind", "closed")])
            - get(&before, "lb_flows_total", &[("kind", "closed")])
            >= (N - 2) as f64
    );
    assert_eq!(
        get(
            &after,
            "lb_packets_total",
            &[("action", "drop"), ("reason", "malformed")]
        ),
        0.0
    );

    // The page's graphs need a few of the daemon's samples (every 5 s).
    let start = Instant::now();
    while lb.status()["history"]["samples"]
        .as_array()
        .map_or(0, Vec::len)
        < 3
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the daemon samples no history"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // web2 dies: the metrics and the page say so, while traffic flows.
    webs[1].stop();
    let start = Instant::now();
    loop {
        let m = parse(&fetch(&t.lb, metrics_addr(), "/metrics").unwrap());
        if get(
            &m,
            "lb_backend_state",
            &[("service", "web"), ("backend", "web2"), ("state", "down")],
        ) == 1.0
        {
            assert_eq!(
                get(
                    &m,
                    "lb_backend_up",
                    &[("service", "web"), ("backend", "web2")]
                ),
                0.0
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "web2 never showed as down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let load = Load::start(
        &t.client,
        SocketAddrV4::new(VIP, 80).into(),
        Duration::from_millis(10),
    );
    let url = format!("http://{}/", metrics_addr());
    let dom = chromium(
        &t.lb,
        &[
            "--virtual-time-budget=6000",
            "--window-size=1280,800",
            "--dump-dom",
            &url,
        ],
    );
    let shot = artifacts().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &t.lb,
        &[
            "--virtual-time-budget=6000",
            "--window-size=1280,800",
            &format!("--screenshot={}", shot.display()),
            &url,
        ],
    );
    let samples = load.stop();
    assert!(
        samples.iter().all(|s| s.answer.is_ok()),
        "traffic kept flowing on web1"
    );
    assert!(
        dom.contains(r#"data-backend="web1" data-state="up""#),
        "web1's row, up, in the page's DOM:\n{dom}"
    );
    assert!(
        dom.contains(r#"data-backend="web2" data-state="down""#),
        "web2's row, down"
    );
    // The graphs: a line per backend, and web2's failure marked.
    for marker in [
        r#"data-series="web/web1""#,
        r#"data-series="web/web2""#,
        r#"data-series="forward""#,
        r#"data-event="web/web2 down""#,
    ] {
        assert!(
            dom.contains(marker),
            "{marker} in the page's graphs:\n{dom}"
        );
    }
    assert!(
        dom.contains(r#"data-fits="true""#),
        "the page fits 1280x800 without horizontal scrolling"
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    println!("status page screenshot: {} ({size} bytes)", shot.display());
    assert!(size > 10_000, "a real screenshot was saved");
    drop(lb);
}

#[test]
fn root_the_metrics_endpoint_is_local_unless_configured_otherwise() {
    require_root();
    let t = Topology::new(&prefix(), 1);
    let _web = Nginx::start(&t.backends[0], "web1", backend_addr(1), 80);
    let from_client = SocketAddr::new(LB_CLIENT_SIDE.into(), 9100);
    {
        let _lb = LbDaemon::start(&t.lb, |sock| {
            lb_config(sock, &service_block("web", 80, "tcp", 1, 80))
        });
        assert!(
            fetch(&t.lb, metrics_addr(), "/metrics").is_ok(),
            "served on loopback"
        );
        let r = fetch(&t.client, from_client, "/metrics");
        assert!(
            r.is_err(),
            "not reachable from another namespace by default: {r:?}"
        );
    }
    let _lb = LbDaemon::start(&t.lb, |sock| {
        lb_config(sock, &service_block("web", 80, "tcp", 1, 80)).replace(
            "[daemon]\n",
            &format!("[daemon]\nmetrics_listen = \"{from_client}\"\n"),
        )
    });
    assert!(
        fetch(&t.client, from_client, "/metrics").is_ok(),
        "reachable where configured"
    );
}
