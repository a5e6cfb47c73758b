//! The config parser against generated input, in process: arbitrary text, a
//! good config mutated byte by byte, and well-formed TOML with values of any
//! type at the real keys. `Config::parse` must return, never panic; a refusal
//! must say something and name the file; an acceptance must hold what the
//! validator promises, and a generated document's firewall must be read as
//! written. proptest shrinks a failing input to a small one. A last test
//! keeps the generator honest: its documents must reach the validator, not
//! all stop at TOML and serde.
//! `LB_FUZZ_CASES=200000 cargo test -p lb-tests --test config_fuzz` runs long.

use std::{collections::HashSet, net::Ipv4Addr, path::PathBuf};

use lb_tests::TempDir;
use lb_userspace::config::{
    Cidr, ClosedPorts, Config, Protocol, Scheduler, DEFAULT_NEW_FLOWS_PER_SEC,
    DEFAULT_SOURCE_NEW_FLOWS_PER_SEC,
};
use proptest::{
    prelude::*,
    sample::{select, subsequence, Index},
    strategy::ValueTree,
    test_runner::{Config as ProptestConfig, TestCaseError, TestRunner},
};
use toml::{Table, Value};

/// Cases per property unless `LB_FUZZ_CASES` says otherwise: the whole file
/// runs in a few seconds in a debug build.
const CASES: u32 = 2_000;

/// A config that uses every key, valid as it stands.
const GOOD: &str = r#"
[daemon]
interfaces = ["lo", "eth0"]
xdp_mode = "generic"
control_socket = "/run/lb/lb.sock"
manage_neighbours = true
pin_dir = "/sys/fs/bpf/lb"
maglev_seed = 7
metrics_listen = "127.0.0.1:9100"
stateless_reverse_nat = false

[firewall]
deny = ["192.0.2.0/24", "198.51.100.7"]
closed_ports = "pass"
icmp_echo_reply = false
source_new_flows_per_sec = 500
source_new_flows_burst = 2000
new_flows_per_sec = 50000
new_flows_burst = 100000

[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
scheduler = "weighted-round-robin"
on_backend_down = "drop-flows"

[service.health]
kind = "http"
path = "/ok"
expect_status = 200
host = "www.foobar.com"
interval_ms = 1000
timeout_ms = 500
rise = 2
fall = 3

[service.firewall]
allow = ["10.0.1.0/24", "10.0.4.0/22"]
deny = ["10.0.1.64/26"]

[[service.backend]]
name = "web1"
address = "10.0.2.11"
port = 8080
weight = 3

[service.backend.health]
kind = "tcp"
port = 8081

[[service.backend]]
name = "web2"
address = "10.0.2.12"
weight = 1

[[service]]
name = "dns"
vip = "10.0.0.100"
port = 53
protocol = "udp"
scheduler = "maglev"
maglev_table_size = 65537

[service.health]
port = 53

[[service.backend]]
name = "dns1"
address = "10.0.2.21"

[[service]]
name = "db"
vip = "10.0.0.101"
port = 3306
protocol = "tcp"
steering = "mysql-primary"

[service.mysql]
user = "lbmonitor"
password_file = "monitor.pass"
interval_ms = 250
timeout_ms = 200
max_replica_lag_s = 5
on_demotion = "reset"

[service.firewall]
allow = ["10.0.2.0/24"]

[[service.backend]]
name = "db1"
address = "10.0.3.21"
"#;

/// Where the parsed text claims to live: a temp dir holding the password file
/// that `GOOD` names.
struct Fixture {
    _dir: TempDir,
    file: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = TempDir::new("fuzz");
        std::fs::write(dir.path().join("monitor.pass"), "secret\n").expect("a password file");
        let file = dir.path().join("lb.toml");
        Fixture { _dir: dir, file }
    }

    /// Parses `text`: it must return, a refusal must name the file and say
    /// something, an acceptance must be a config the validator should accept.
    fn parse_returns(&self, text: &str) -> Result<(), TestCaseError> {
        self.parse(text).map(drop)
    }

    /// As `parse_returns`, and the config if it was accepted.
    fn parse(&self, text: &str) -> Result<Option<Config>, TestCaseError> {
        let verdict = match Config::parse(&self.file, text, &iface_ok) {
            Ok(cfg) => holds_its_promises(&cfg).map(|()| Some(cfg)),
            Err(e) => {
                let message = e.to_string();
                let prefix = format!("{}: ", self.file.display());
                if message.starts_with(&prefix) && message.len() > prefix.len() {
                    Ok(None)
                } else {
                    Err(TestCaseError::fail(format!(
                        "the refusal does not name the file and the problem: {message:?}"
                    )))
                }
            }
        };
        // The file as written, to read beside the shrunk input.
        verdict.map_err(|e| TestCaseError::fail(format!("{e}\n--- the file:\n{text}\n---")))
    }
}

/// The interfaces this pretend host has.
fn iface_ok(name: &str) -> bool {
    name == "lo" || name.starts_with("eth")
}

/// What every accepted config has, whatever the file said.
fn holds_its_promises(cfg: &Config) -> Result<(), TestCaseError> {
    let d = &cfg.daemon;
    prop_assert!(!d.interfaces.is_empty(), "no interface: {cfg:?}");
    prop_assert!(
        d.interfaces.iter().collect::<HashSet<_>>().len() == d.interfaces.len(),
        "an interface twice: {cfg:?}"
    );
    prop_assert!(d.pin_dir.starts_with("/sys/fs/bpf"), "{cfg:?}");
    prop_assert!(cfg.services.len() <= lb_common::MAX_SERVICES as usize);
    let mut names = HashSet::new();
    let mut endpoints = HashSet::new();
    for s in &cfg.services {
        prop_assert!(!s.name.is_empty() && names.insert(&s.name), "{cfg:?}");
        prop_assert!(
            endpoints.insert((s.vip, s.port, s.protocol)),
            "an endpoint twice: {cfg:?}"
        );
        prop_assert!(s.port != 0 && usable(s.vip), "{s:?}");
        prop_assert!(!s.backends.is_empty(), "no backends: {s:?}");
        if let Some(m) = s.steering.mysql() {
            prop_assert!(
                s.protocol == Protocol::Tcp && m.timeout_ms >= 1 && m.timeout_ms <= m.interval_ms,
                "{s:?}"
            );
        }
        if let Scheduler::Maglev { table_size } = s.scheduler {
            prop_assert!(
                lb_common::maglev::is_prime(table_size)
                    && table_size <= lb_common::maglev::MAX_TABLE_SIZE,
                "{s:?}"
            );
        }
        let mut backend_names = HashSet::new();
        for b in &s.backends {
            prop_assert!(!b.name.is_empty() && backend_names.insert(&b.name), "{s:?}");
            prop_assert!(b.port != 0 && usable(b.address), "{b:?}");
            prop_assert!(b.weight <= lb_common::RING_SIZE, "{b:?}");
            for h in s.health.iter().chain(&b.health) {
                prop_assert!(h.rise >= 1 && h.fall >= 1, "{h:?}");
                prop_assert!(h.timeout_ms >= 1 && h.timeout_ms <= h.interval_ms, "{h:?}");
                prop_assert!(h.port != Some(0) && h.path.starts_with('/'), "{h:?}");
            }
        }
    }
    firewall_holds_its_promises(cfg)
}

/// The firewall part of `holds_its_promises`: networks without host bits, no
/// CIDR twice in a list, within the maps' sizes, no global deny over a
/// backend (its replies would be dropped), no CIDR both allowed and denied in
/// a service, rates a token bucket can count and bursts that let a flow in.
fn firewall_holds_its_promises(cfg: &Config) -> Result<(), TestCaseError> {
    let fw = &cfg.firewall;
    are_networks(&fw.deny, "firewall.deny")?;
    prop_assert!(fw.deny.len() <= lb_common::firewall::MAX_DENY_RULES as usize);
    let limits = [
        (fw.source_new_flows_per_sec, fw.source_new_flows_burst),
        (fw.new_flows_per_sec, fw.new_flows_burst),
    ];
    for (per_sec, burst) in limits {
        prop_assert!(per_sec <= 1_000_000_000, "{fw:?}");
        prop_assert!(per_sec == 0 || burst >= 1, "a burst no flow fits: {fw:?}");
    }
    let mut rules = 0;
    for s in &cfg.services {
        let r = &s.firewall;
        are_networks(&r.allow, &format!("{}: allow", s.name))?;
        are_networks(&r.deny, &format!("{}: deny", s.name))?;
        for c in &r.deny {
            prop_assert!(!r.allow.contains(c), "{c} allowed and denied: {s:?}");
        }
        rules += r.allow.len() + r.deny.len();
        for b in &s.backends {
            for c in &fw.deny {
                prop_assert!(
                    !covers(c, b.address),
                    "the global deny {c} covers backend {b:?}: {cfg:?}"
                );
            }
        }
    }
    prop_assert!(rules <= lb_common::firewall::MAX_SERVICE_RULES as usize);
    Ok(())
}

/// The network mask of `c`, worked out here rather than taken from lb.
fn mask(c: &Cidr) -> u32 {
    match c.len {
        0 => 0,
        len => u32::MAX << (32 - u32::from(len)),
    }
}

fn covers(c: &Cidr, a: Ipv4Addr) -> bool {
    u32::from(a) & mask(c) == u32::from(c.addr)
}

/// Every CIDR in `list` a network (no host bits), none twice.
fn are_networks(list: &[Cidr], what: &str) -> Result<(), TestCaseError> {
    for c in list {
        prop_assert!(c.len <= 32, "{what}: prefix length {}", c.len);
        prop_assert_eq!(
            u32::from(c.addr) & !mask(c),
            0,
            "{}: {} has host bits",
            what,
            c
        );
    }
    let distinct: HashSet<&Cidr> = list.iter().collect();
    prop_assert_eq!(
        distinct.len(),
        list.len(),
        "{}: a CIDR twice: {:?}",
        what,
        list
    );
    Ok(())
}

/// An accepted document's firewall is the one it wrote, in the same places:
/// each CIDR as written (the canonical form, or a bare address for a /32),
/// each setting as given or its documented default, a burst one second's
/// worth of its rate unless given.
fn means_what_it_says(doc: &Table, cfg: &Config) -> Result<(), TestCaseError> {
    let cidrs_as_written = |rules: Option<&Value>, key: &str, parsed: &[Cidr]| {
        let written: Vec<&str> = rules
            .and_then(|t| t.get(key))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let read: Vec<String> = parsed.iter().map(Cidr::to_string).collect();
        let same = written.len() == read.len()
            && written
                .iter()
                .zip(&read)
                .all(|(w, r)| w == r || format!("{w}/32") == *r);
        prop_assert!(same, "{key} = {written:?} was read as {read:?}");
        Ok(())
    };
    let written = doc.get("firewall");
    let fw = &cfg.firewall;
    cidrs_as_written(written, "deny", &fw.deny)?;
    let setting = |key: &str| written.and_then(|t| t.get(key));
    let number = |key: &str, default: u32| {
        setting(key)
            .and_then(Value::as_integer)
            .unwrap_or(i64::from(default))
    };
    let source_rate = number("source_new_flows_per_sec", DEFAULT_SOURCE_NEW_FLOWS_PER_SEC);
    let rate = number("new_flows_per_sec", DEFAULT_NEW_FLOWS_PER_SEC);
    let read = [
        fw.source_new_flows_per_sec,
        fw.source_new_flows_burst,
        fw.new_flows_per_sec,
        fw.new_flows_burst,
    ]
    .map(i64::from);
    let burst =
        |key: &str, per_sec: i64| setting(key).and_then(Value::as_integer).unwrap_or(per_sec);
    let want = [
        source_rate,
        burst("source_new_flows_burst", source_rate),
        rate,
        burst("new_flows_burst", rate),
    ];
    prop_assert_eq!(read, want, "the rates and bursts of {:?}", written);
    let closed = match setting("closed_ports").and_then(Value::as_str) {
        Some("pass") => ClosedPorts::Pass,
        _ => ClosedPorts::Drop,
    };
    prop_assert_eq!(fw.closed_ports, closed);
    let echo = setting("icmp_echo_reply").and_then(Value::as_bool);
    prop_assert_eq!(fw.icmp_echo_reply, echo.unwrap_or(true));
    let services = doc.get("service").and_then(Value::as_array);
    for (i, s) in cfg.services.iter().enumerate() {
        let rules = services
            .and_then(|v| v.get(i))
            .and_then(|t| t.get("firewall"));
        cidrs_as_written(rules, "allow", &s.firewall.allow)?;
        cidrs_as_written(rules, "deny", &s.firewall.deny)?;
    }
    Ok(())
}

fn usable(a: std::net::Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_multicast() || a.is_broadcast())
}

fn runner(default_cases: u32) -> TestRunner {
    let cases = match std::env::var("LB_FUZZ_CASES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("LB_FUZZ_CASES={v:?} is not a number of cases")),
        Err(_) => default_cases,
    };
    TestRunner::new(ProptestConfig {
        cases,
        // A failure prints its shrunk input; nothing is written to the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })
}

fn check<S: Strategy>(strategy: S, property: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    if let Err(e) = runner(CASES).run(&strategy, property) {
        panic!("{e}");
    }
}

/// Pieces of TOML and of lb's keys and values, to make text that gets past
/// the first byte of the parser more often than random characters do.
const TOKENS: &[&str] = &[
    "[daemon]\n",
    "[[service]]\n",
    "[[service.backend]]\n",
    "[service.health]\n",
    "[service.mysql]\n",
    "[service.backend.health]\n",
    "[firewall]\n",
    "[service.firewall]\n",
    "deny = ",
    "allow = ",
    "closed_ports = ",
    "new_flows_burst = ",
    "[\"10.0.1.0/24\"]",
    "\"10.0.2.0/24\"",
    "/0",
    "/32",
    "/33",
    "interfaces = ",
    "[\"lo\"]",
    "name = ",
    "vip = ",
    "port = ",
    "protocol = ",
    "address = ",
    "weight = ",
    "steering = ",
    "scheduler = ",
    "\"tcp\"",
    "\"10.0.0.1\"",
    "\"web\"",
    "\"mysql-primary\"",
    "\"maglev\"",
    "=",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "\"",
    "'",
    "\"\"\"",
    "'''",
    "#",
    "\\",
    "\\u0000",
    "\\U0010FFFF",
    "\n",
    "\r\n",
    " ",
    "\t",
    "\0",
    "\u{feff}",
    "é",
    "0",
    "-1",
    "80",
    "65536",
    "4294967296",
    "9223372036854775808",
    "1e20",
    "nan",
    "-inf",
    "0x_1",
    "1__0",
    "true",
    "1979-05-27T07:32:00Z",
    "07:32:00",
];

#[test]
fn arbitrary_text_is_parsed_without_a_panic() {
    let fx = Fixture::new();
    let text = prop_oneof![
        any::<String>(),
        proptest::collection::vec(any::<char>(), 0..200).prop_map(String::from_iter),
        "[\\[\\]{}a-z_=\"'., 0-9\\n#:-]{0,300}",
        proptest::collection::vec(select(TOKENS), 0..60).prop_map(|t| t.concat()),
    ];
    check(text, |t| fx.parse_returns(&t));
}

/// One change to a config's bytes; positions scale to the text's length.
#[derive(Debug, Clone)]
enum Edit {
    Delete(Index, usize),
    Insert(Index, Vec<u8>),
    Overwrite(Index, u8),
    Duplicate(Index, usize),
    Truncate(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let bytes = prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..8),
        select(TOKENS).prop_map(|t| t.as_bytes().to_vec()),
    ];
    prop_oneof![
        (any::<Index>(), 1..40usize).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<Index>(), bytes).prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Overwrite(i, b)),
        (any::<Index>(), 1..200usize).prop_map(|(i, n)| Edit::Duplicate(i, n)),
        any::<Index>().prop_map(Edit::Truncate),
    ]
}

fn apply(text: &mut Vec<u8>, edit: &Edit) {
    let at = |i: &Index, len: usize| i.index(len + 1);
    match edit {
        Edit::Delete(i, n) => {
            let start = at(i, text.len());
            let end = (start + n).min(text.len());
            text.drain(start..end);
        }
        Edit::Insert(i, bytes) => {
            let start = at(i, text.len());
            text.splice(start..start, bytes.iter().copied());
        }
        Edit::Overwrite(i, b) => {
            if !text.is_empty() {
                let k = i.index(text.len());
                text[k] = *b;
            }
        }
        Edit::Duplicate(i, n) => {
            let start = at(i, text.len());
            let copy = text[start..(start + n).min(text.len())].to_vec();
            text.splice(start..start, copy);
        }
        Edit::Truncate(i) => text.truncate(at(i, text.len())),
    }
}

#[test]
fn a_mutated_good_config_is_parsed_without_a_panic() {
    let fx = Fixture::new();
    let good = Config::parse(&fx.file, GOOD, &iface_ok)
        .unwrap_or_else(|e| panic!("GOOD is a valid config: {e}"));
    holds_its_promises(&good).expect("GOOD holds its promises");
    let doc: Table = GOOD.parse().expect("GOOD is TOML");
    means_what_it_says(&doc, &good).expect("GOOD is read as written");
    check(proptest::collection::vec(edit(), 1..6), |edits| {
        let mut bytes = GOOD.as_bytes().to_vec();
        for e in &edits {
            apply(&mut bytes, e);
        }
        fx.parse_returns(&String::from_utf8_lossy(&bytes))
    });
}

/// Any TOML value, up to small arrays and tables two levels deep.
fn any_value() -> impl Strategy<Value = Value> {
    const EDGES: &[i64] = &[
        0,
        -1,
        1,
        65_535,
        65_536,
        4_294_967_295,
        4_294_967_296,
        i64::MAX,
    ];
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::Integer),
        integers(EDGES),
        any::<f64>().prop_map(Value::Float),
        any::<bool>().prop_map(Value::Boolean),
        any::<String>().prop_map(Value::String),
        Just(Value::Datetime(
            "1979-05-27T07:32:00Z".parse().expect("a datetime")
        )),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Table(m.into_iter().collect())),
        ]
    })
}

fn strings(pool: &'static [&'static str]) -> BoxedStrategy<Value> {
    select(pool)
        .prop_map(|s| Value::String(s.to_owned()))
        .boxed()
}

fn integers(pool: &'static [i64]) -> BoxedStrategy<Value> {
    select(pool).prop_map(Value::Integer).boxed()
}

/// A good value mostly, a bad one now and then: most files get past each
/// check to the next one, and every check sees its bad values.
fn mostly(good: BoxedStrategy<Value>, bad: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    prop_oneof![12 => good, 1 => bad].boxed()
}

/// One of an enum's names, seldom one it does not have: a wrong name stops
/// the file before the validator.
fn variants(
    names: &'static [&'static str],
    wrong: &'static [&'static str],
) -> BoxedStrategy<Value> {
    prop_oneof![40 => strings(names), 1 => strings(wrong)].boxed()
}

/// An address from `pool` or anywhere, now and then one from `bad`.
fn addresses(pool: &'static [&'static str], bad: &'static [&'static str]) -> BoxedStrategy<Value> {
    let good = prop_oneof![
        strings(pool),
        any::<[u8; 4]>().prop_map(|o| Value::String(Ipv4Addr::from(o).to_string())),
    ];
    mostly(good.boxed(), strings(bad))
}

/// A list of CIDRs: a few distinct ones from `pool` or random networks, now
/// and then one lb must refuse (host bits, a prefix above 32, not IPv4, a
/// network of the backends', a repeat).
fn cidr_lists(pool: &'static [&'static str]) -> BoxedStrategy<Value> {
    const BAD: &[&str] = &[
        "10.0.1.5/24",
        "10.0.1.0/33",
        "10.0.1.0/",
        "10.0.1.0/-1",
        "10.0.1",
        "fd00::/8",
        "",
        "10.0.2.0/24",
        "10.0.2.11",
        "0.0.0.0/0",
    ];
    let network = (any::<u32>(), 0..=32u32).prop_map(|(a, len)| {
        let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
        format!("{}/{len}", Ipv4Addr::from(a & mask))
    });
    let anything =
        (any::<[u8; 4]>(), 0..=40u8).prop_map(|(a, len)| format!("{}/{len}", Ipv4Addr::from(a)));
    let good = prop_oneof![
        subsequence(pool, 0..=pool.len().min(3))
            .prop_map(|v| v.into_iter().map(str::to_owned).collect::<Vec<_>>()),
        proptest::collection::btree_set(network, 0..4).prop_map(|s| s.into_iter().collect()),
    ];
    let one = prop_oneof![
        select(pool).prop_map(str::to_owned),
        select(BAD).prop_map(str::to_owned),
        anything,
    ];
    let bad = proptest::collection::vec(one, 1..5);
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    mostly(
        good.prop_map(strings).boxed(),
        bad.prop_map(strings).boxed(),
    )
}

/// A plausible value for `key`, now and then a value of any type.
fn value_for(key: &'static str) -> BoxedStrategy<Value> {
    let plausible = match key {
        "interfaces" => {
            let list = |pool: &'static [&'static str], n| {
                proptest::collection::vec(strings(pool), n)
                    .prop_map(Value::Array)
                    .boxed()
            };
            mostly(
                list(&["lo", "eth0", "eth1"], 1..2),
                list(&["lo", "eth0", "nosuch0", "", "lo\0"], 0..4),
            )
        }
        "xdp_mode" => variants(&["auto", "native", "generic"], &["offload", ""]),
        "hook" => variants(&["auto", "xdp", "xdp-generic", "tc"], &["native", ""]),
        "control_socket" => mostly(strings(&["/run/lb/lb.sock"]), strings(&["lb.sock", ""])),
        "pin_dir" => mostly(
            strings(&["/sys/fs/bpf/lb"]),
            strings(&["/sys/fs/bpf", "/tmp/lb", "lb", ""]),
        ),
        "manage_neighbours" | "stateless_reverse_nat" | "icmp_echo_reply" => {
            any::<bool>().prop_map(Value::Boolean).boxed()
        }
        "maglev_seed" | "max_replica_lag_s" => integers(&[0, 1, 5, 4_294_967_295]),
        "metrics_listen" => mostly(
            strings(&["127.0.0.1:9100", "off", "[::1]:9100"]),
            strings(&["localhost:9100", "9100", ""]),
        ),
        "name" => mostly(
            "[a-z][a-z0-9-]{0,5}".prop_map(Value::String).boxed(),
            strings(&["web", "db", ""]),
        ),
        "vip" => addresses(
            &["10.0.0.100", "10.0.0.101"],
            &[
                "0.0.0.0",
                "224.0.0.1",
                "255.255.255.255",
                "127.0.0.1",
                "256.1.1.1",
                "10.0.0",
                "fd00::1",
                "10.0.0.100:80",
                "",
            ],
        ),
        // The VIPs among the bad: a backend may not be its own service's VIP.
        "address" => addresses(
            &["10.0.2.11", "10.0.2.12", "10.0.3.21"],
            &[
                "0.0.0.0",
                "224.0.0.1",
                "255.255.255.255",
                "127.0.0.1",
                "10.0.0.100",
                "10.0.0.101",
                "10.0.2",
                "",
            ],
        ),
        "port" => mostly(integers(&[53, 80, 443, 3306, 8080, 65_535]), integers(&[0])),
        "protocol" => variants(&["tcp", "udp"], &["sctp", "TCP"]),
        "scheduler" => variants(
            &["round-robin", "weighted-round-robin", "maglev"],
            &["random"],
        ),
        "on_backend_down" => variants(&["keep-flows", "drop-flows"], &["reset"]),
        "maglev_table_size" => mostly(
            integers(&[1_009, 65_537, 131_071]),
            integers(&[0, 1, 101, 65_536, 131_101, 4_294_967_291]),
        ),
        "steering" => variants(&["none", "mysql-primary", "mysql-replica"], &["postgres"]),
        "weight" => mostly(
            integers(&[1, 2, 3, 999, 1_000, 1_024]),
            integers(&[0, 1_025]),
        ),
        "kind" => variants(&["tcp", "http"], &["icmp"]),
        "path" => mostly(strings(&["/", "/ok"]), strings(&["ok", ""])),
        "host" => mostly(strings(&["www.foobar.com"]), strings(&["", "a\r\nb"])),
        "expect_status" => mostly(integers(&[100, 200, 599]), integers(&[0, 99, 600, 65_535])),
        // Any interval here outlasts any timeout: mismatches come from the
        // bad values and the defaults (interval 250 ms for MySQL).
        "interval_ms" => mostly(
            integers(&[500, 1_000, 2_000]),
            integers(&[0, 1, 5, 60_001, 3_600_001, i64::MAX]),
        ),
        "timeout_ms" => mostly(integers(&[10, 100, 200]), integers(&[0, 2_001, i64::MAX])),
        "rise" | "fall" => mostly(integers(&[1, 2, 3]), integers(&[0, 4_294_967_295])),
        "user" => mostly(strings(&["lbmonitor"]), strings(&[""])),
        "password_file" => mostly(
            strings(&["monitor.pass"]),
            strings(&["absent.pass", "/", "/dev/null", ""]),
        ),
        "on_demotion" => variants(&["reset", "keep"], &["kill"]),
        // Sources to keep out, and (in a service) the client networks.
        "deny" => cidr_lists(&[
            "192.0.2.0/24",
            "198.51.100.7",
            "203.0.113.128/25",
            "10.0.1.64/26",
            "10.0.1.70/32",
        ]),
        "allow" => cidr_lists(&["10.0.1.0/24", "10.0.1.70", "10.0.4.0/22", "0.0.0.0/0"]),
        "closed_ports" => variants(&["drop", "pass"], &["reject", "DROP"]),
        "source_new_flows_per_sec" | "new_flows_per_sec" => mostly(
            integers(&[0, 1, 500, 10_000, 100_000, 1_000_000_000]),
            integers(&[1_000_000_001, 4_294_967_295, -1, 4_294_967_296]),
        ),
        "source_new_flows_burst" | "new_flows_burst" => mostly(
            integers(&[1, 5, 10_000, 4_294_967_295]),
            integers(&[0, -1, 4_294_967_296]),
        ),
        other => panic!("no plausible values for {other}"),
    };
    prop_oneof![200 => plausible, 1 => any_value().boxed()].boxed()
}

/// A table with each of `keys` present with probability `p`.
fn table(keys: &'static [&'static str], p: f64) -> BoxedStrategy<Table> {
    let entries: Vec<_> = keys
        .iter()
        .map(|&k| {
            proptest::option::weighted(p, value_for(k))
                .prop_map(move |v| v.map(|v| (k.to_owned(), v)))
        })
        .collect();
    entries
        .prop_map(|entries| entries.into_iter().flatten().collect())
        .boxed()
}

/// A section: its required keys nearly always there, its optional ones
/// sometimes, and seldom a key lb does not know.
fn section(
    required: &'static [&'static str],
    optional: &'static [&'static str],
) -> BoxedStrategy<Table> {
    let unknown = proptest::option::weighted(0.01, ("colour|wieght|interval", any_value()));
    (table(required, 0.99), table(optional, 0.4), unknown)
        .prop_map(|(mut t, optional, unknown)| {
            t.extend(optional);
            t.extend(unknown);
            t
        })
        .boxed()
}

/// `t` with `key` set to `v`, if there is one.
fn with(mut t: Table, key: &str, v: Option<Value>) -> Table {
    if let Some(v) = v {
        t.insert(key.to_owned(), v);
    }
    t
}

fn tables(v: Vec<Table>) -> Value {
    Value::Array(v.into_iter().map(Value::Table).collect())
}

/// `service` with its keys made to agree, as a careful writer would: the
/// scheduler its weights or table size need, the steering its
/// `[service.mysql]` needs, the check kind its HTTP keys need, a probe port
/// for UDP, a backend. Values stay as generated: only the ties are fixed, so
/// that files with several services get through and the checks across
/// services are reached.
fn tidy(mut service: Table) -> Table {
    let string = |s: &str| Value::String(s.to_owned());
    let mut backends = match service.remove("backend") {
        Some(Value::Array(b)) => b,
        _ => Vec::new(),
    };
    if backends.is_empty() {
        let mut b = Table::new();
        b.insert("name".into(), string("b0"));
        b.insert("address".into(), string("10.0.2.11"));
        backends.push(Value::Table(b));
    }
    let weighted = backends.iter().any(|b| b.get("weight").is_some());
    if weighted {
        service.remove("maglev_table_size");
        service.insert("scheduler".into(), string("weighted-round-robin"));
    } else if service.contains_key("maglev_table_size") {
        service.insert("scheduler".into(), string("maglev"));
    }
    if service.contains_key("mysql") {
        service.insert("steering".into(), string("mysql-primary"));
        service.insert("protocol".into(), string("tcp"));
    } else {
        service.remove("steering");
    }
    let udp = service.get("protocol").and_then(Value::as_str) == Some("udp");
    let health = service.get_mut("health").into_iter();
    let backend_health = backends.iter_mut().filter_map(|b| b.get_mut("health"));
    for h in health.chain(backend_health).filter_map(Value::as_table_mut) {
        if ["path", "expect_status", "host"]
            .iter()
            .any(|k| h.contains_key(*k))
        {
            h.insert("kind".into(), string("http"));
        }
        if udp {
            h.entry("port").or_insert(Value::Integer(53));
        }
    }
    service.insert("backend".into(), Value::Array(backends));
    service
}

/// A whole config file, well-formed TOML, lb's keys in lb's places.
fn config_document() -> impl Strategy<Value = Table> {
    const HEALTH: &[&str] = &[
        "kind",
        "path",
        "expect_status",
        "host",
        "port",
        "interval_ms",
        "timeout_ms",
        "rise",
        "fall",
    ];
    const FIREWALL: &[&str] = &[
        "deny",
        "closed_ports",
        "icmp_echo_reply",
        "source_new_flows_per_sec",
        "source_new_flows_burst",
        "new_flows_per_sec",
        "new_flows_burst",
    ];
    let health = || proptest::option::weighted(0.3, section(&[], HEALTH).prop_map(Value::Table));
    let source_rules =
        proptest::option::weighted(0.4, section(&[], &["allow", "deny"]).prop_map(Value::Table));
    let backend = (section(&["name", "address"], &["port", "weight"]), health())
        .prop_map(|(t, h)| with(t, "health", h));
    let mysql = section(
        &["user", "password_file"],
        &[
            "interval_ms",
            "timeout_ms",
            "max_replica_lag_s",
            "on_demotion",
        ],
    );
    let service = (
        section(
            &["name", "vip", "port", "protocol"],
            &[
                "scheduler",
                "on_backend_down",
                "maglev_table_size",
                "steering",
            ],
        ),
        health(),
        proptest::option::weighted(0.3, mysql.prop_map(Value::Table)),
        source_rules,
        proptest::collection::vec(backend, 0..4),
    )
        .prop_map(|(t, h, m, f, b)| {
            let t = with(with(with(t, "health", h), "mysql", m), "firewall", f);
            with(t, "backend", Some(tables(b)))
        });
    let daemon = section(
        &["interfaces"],
        &[
            "xdp_mode",
            "hook",
            "control_socket",
            "manage_neighbours",
            "pin_dir",
            "maglev_seed",
            "metrics_listen",
            "stateless_reverse_nat",
        ],
    );
    (
        proptest::option::weighted(0.97, daemon),
        proptest::option::weighted(0.6, section(&[], FIREWALL)),
        proptest::collection::vec(service, 0..4),
        any::<bool>(),
    )
        .prop_map(|(daemon, firewall, services, tidied)| {
            let services = match tidied {
                true => services.into_iter().map(tidy).collect(),
                false => services,
            };
            let top = with(Table::new(), "daemon", daemon.map(Value::Table));
            let top = with(top, "firewall", firewall.map(Value::Table));
            with(top, "service", Some(tables(services)))
        })
}

#[test]
fn well_formed_toml_with_any_values_is_parsed_without_a_panic() {
    let fx = Fixture::new();
    check(config_document(), |doc| {
        let text = toml::to_string(&doc)
            .map_err(|e| TestCaseError::fail(format!("toml cannot write {doc:?}: {e}")))?;
        match fx.parse(&text)? {
            Some(cfg) => means_what_it_says(&doc, &cfg)
                .map_err(|e| TestCaseError::fail(format!("{e}\n--- the file:\n{text}\n---"))),
            None => Ok(()),
        }
    });
}

/// The generator reaches past TOML and serde: of its documents, some are
/// accepted, some with two services or more, some with firewall rules, and
/// many are refused by the validator itself, some for their firewall.
#[test]
fn generated_documents_reach_the_validator() {
    let fx = Fixture::new();
    // A fixed seed: this is a statement about the generator, not a search.
    let mut runner = TestRunner::deterministic();
    let documents = config_document();
    let (mut accepted, mut several, mut with_rules) = (0, 0, 0);
    let (mut invalid, mut firewall_refused) = (0, 0);
    for _ in 0..300 {
        let doc = documents
            .new_tree(&mut runner)
            .expect("a document")
            .current();
        let text = toml::to_string(&doc).expect("toml writes what it generated");
        match Config::parse(&fx.file, &text, &iface_ok) {
            Ok(cfg) => {
                accepted += 1;
                several += usize::from(cfg.services.len() >= 2);
                let rules = cfg
                    .services
                    .iter()
                    .any(|s| !s.firewall.allow.is_empty() || !s.firewall.deny.is_empty());
                with_rules += usize::from(rules || !cfg.firewall.deny.is_empty());
            }
            Err(lb_userspace::config::ConfigError::Invalid { problems, .. }) => {
                invalid += 1;
                firewall_refused += usize::from(
                    problems
                        .iter()
                        .any(|p| p.key.starts_with("firewall") || p.key.contains(".firewall")),
                );
            }
            Err(_) => {}
        }
    }
    eprintln!(
        "of 300: {accepted} accepted ({several} with two services or more, {with_rules} with \
         firewall rules), {invalid} refused by the validator ({firewall_refused} for the firewall)"
    );
    assert!(
        accepted >= 20 && several >= 3 && with_rules >= 5 && invalid >= 60 && firewall_refused >= 5,
        "of 300 generated documents {accepted} were accepted ({several} with two services or \
         more, {with_rules} with firewall rules) and {invalid} refused by the validator \
         ({firewall_refused} for the firewall): the generator no longer reaches it"
    );
}
