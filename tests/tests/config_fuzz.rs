//! The config parser against generated input, in process: arbitrary text, a
//! good config mutated byte by byte, and well-formed TOML with values of any
//! type at the real keys. `Config::parse` must return, never panic; a refusal
//! must say something and name the file; an acceptance must hold what the
//! validator promises. proptest shrinks a failing input to a small one. A
//! last test keeps the generator honest: its documents must reach the
//! validator, not all stop at TOML and serde.
//! `LB_FUZZ_CASES=200000 cargo test -p lb-tests --test config_fuzz` runs long.

use std::{collections::HashSet, path::PathBuf};

use lb_tests::TempDir;
use lb_userspace::config::{Config, Steering};
use proptest::{
    prelude::*,
    sample::{select, Index},
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
        let verdict = match Config::parse(&self.file, text, &iface_ok) {
            Ok(cfg) => holds_its_promises(&cfg),
            Err(e) => {
                let message = e.to_string();
                let prefix = format!("{}: ", self.file.display());
                if message.starts_with(&prefix) && message.len() > prefix.len() {
                    Ok(())
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
        prop_assert_eq!(s.mysql.is_some(), s.steering != Steering::None, "{:?}", s);
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

fn addresses() -> BoxedStrategy<Value> {
    let good = prop_oneof![
        strings(&["10.0.0.100", "10.0.0.101", "10.0.2.11", "10.0.2.12"]),
        any::<[u8; 4]>().prop_map(|o| Value::String(std::net::Ipv4Addr::from(o).to_string())),
    ];
    let bad = strings(&[
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "256.1.1.1",
        "10.0.0",
        "fd00::1",
        "10.0.0.100:80",
        "",
    ]);
    mostly(good.boxed(), bad)
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
        "control_socket" => mostly(strings(&["/run/lb/lb.sock"]), strings(&["lb.sock", ""])),
        "pin_dir" => mostly(
            strings(&["/sys/fs/bpf/lb"]),
            strings(&["/sys/fs/bpf", "/tmp/lb", "lb", ""]),
        ),
        "manage_neighbours" | "stateless_reverse_nat" => {
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
        "vip" | "address" => addresses(),
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
            strings(&["monitor.pass", "/dev/null"]),
            strings(&["absent.pass", "/", ""]),
        ),
        "on_demotion" => variants(&["reset", "keep"], &["kill"]),
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
    let health = || proptest::option::weighted(0.3, section(&[], HEALTH).prop_map(Value::Table));
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
        proptest::collection::vec(backend, 0..4),
    )
        .prop_map(|(t, h, m, b)| {
            let t = with(with(t, "health", h), "mysql", m);
            with(t, "backend", Some(tables(b)))
        });
    let daemon = section(
        &["interfaces"],
        &[
            "xdp_mode",
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
        proptest::collection::vec(service, 0..4),
        any::<bool>(),
    )
        .prop_map(|(daemon, services, tidied)| {
            let services = match tidied {
                true => services.into_iter().map(tidy).collect(),
                false => services,
            };
            let top = with(Table::new(), "daemon", daemon.map(Value::Table));
            with(top, "service", Some(tables(services)))
        })
}

#[test]
fn well_formed_toml_with_any_values_is_parsed_without_a_panic() {
    let fx = Fixture::new();
    check(config_document(), |doc| {
        let text = toml::to_string(&doc)
            .map_err(|e| TestCaseError::fail(format!("toml cannot write {doc:?}: {e}")))?;
        fx.parse_returns(&text)
    });
}

/// The generator reaches past TOML and serde: of its documents, some are
/// accepted, some with two services or more, and many are refused by the
/// validator itself.
#[test]
fn generated_documents_reach_the_validator() {
    let fx = Fixture::new();
    // A fixed seed: this is a statement about the generator, not a search.
    let mut runner = TestRunner::deterministic();
    let documents = config_document();
    let (mut accepted, mut several, mut invalid) = (0, 0, 0);
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
            }
            Err(lb_userspace::config::ConfigError::Invalid { .. }) => invalid += 1,
            Err(_) => {}
        }
    }
    assert!(
        accepted >= 20 && several >= 3 && invalid >= 60,
        "of 300 generated documents {accepted} were accepted ({several} with two services or \
         more) and {invalid} refused by the validator: the generator no longer reaches it"
    );
}
