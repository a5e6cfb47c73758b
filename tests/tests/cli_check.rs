//! `lb check`: the real binary validates a config and names the file, the key
//! and the problem for each kind of mistake. The example configs shipped in
//! `config/` validate too (root: checked in a namespace that has their
//! interfaces).

use std::{path::Path, process::Command};

use lb_tests::{daemon::lb_binary, netns::veth, netns::Netns, require_root, unique, TempDir};

const GOOD: &str = r#"
[daemon]
interfaces = ["lo"]

[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"

[[service.backend]]
name = "web1"
address = "10.0.2.11"

[[service.backend]]
name = "web2"
address = "10.0.2.12"
"#;

/// Runs `lb check` on `text`; returns (success, stdout + stderr, file path).
fn check(text: &str) -> (bool, String, String) {
    let dir = TempDir::new("check");
    let f = dir.path().join("lb.toml");
    std::fs::write(&f, text).unwrap();
    check_path(&f)
}

fn check_path(f: &Path) -> (bool, String, String) {
    let out = Command::new(lb_binary())
        .args(["check", "--config"])
        .arg(f)
        .output()
        .expect("running lb check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, f.display().to_string())
}

fn rejected(text: &str, wants: &[&str]) {
    let (ok, out, file) = check(text);
    assert!(!ok, "lb check accepted a bad config:\n{text}\n{out}");
    assert!(
        out.contains(&file),
        "the message names the file {file}:\n{out}"
    );
    for w in wants {
        assert!(out.contains(w), "the message names {w:?}:\n{out}");
    }
}

#[test]
fn accepts_a_good_config() {
    let (ok, out, _) = check(GOOD);
    assert!(ok, "{out}");
    assert!(out.contains("OK (1 services, 2 backends)"), "{out}");
}

#[test]
fn rejects_a_missing_file() {
    let (ok, out, _) = check_path(Path::new("/nonexistent/lb.toml"));
    assert!(!ok);
    assert!(
        out.contains("/nonexistent/lb.toml") && out.contains("No such file"),
        "{out}"
    );
}

#[test]
fn rejects_malformed_toml() {
    rejected(
        &GOOD.replace("[[service]]", "[[service]"),
        &["TOML parse error", "line"],
    );
}

#[test]
fn rejects_an_unknown_key() {
    rejected(
        &GOOD.replace("port = 80", "port = 80\ncolour = \"blue\""),
        &["unknown field `colour`"],
    );
}

#[test]
fn rejects_a_duplicate_vip_port() {
    let dup = format!(
        "{GOOD}\n[[service]]\nname = \"web-again\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n\
         [[service.backend]]\nname = \"w\"\naddress = \"10.0.2.13\"\n"
    );
    rejected(
        &dup,
        &["service[1].vip", "duplicate VIP:port 10.0.0.100:80/tcp"],
    );
}

#[test]
fn rejects_an_invalid_address() {
    rejected(
        &GOOD.replace("10.0.2.12", "10.0.2.312"),
        &["service[0].backend[1].address", "invalid IPv4 address"],
    );
    rejected(
        &GOOD.replace("10.0.0.100", "ten.zero"),
        &["service[0].vip", "invalid IPv4 address"],
    );
}

#[test]
fn rejects_a_service_with_no_backends() {
    let text = GOOD.split("[[service.backend]]").next().unwrap();
    rejected(text, &["service[0].backend", "has no backends"]);
}

#[test]
fn rejects_an_unknown_interface() {
    rejected(
        &GOOD.replace("[\"lo\"]", "[\"lo\", \"nosuch9\"]"),
        &["daemon.interfaces[1]", "unknown interface \"nosuch9\""],
    );
}

#[test]
fn root_shipped_example_configs_validate() {
    require_root();
    let a = Netns::new(&format!("ck{}{}", std::process::id() % 100_000, unique()));
    let b = Netns::new(&format!("ck{}{}p", std::process::id() % 100_000, unique()));
    veth(&a, "eth0", &b, "p0");
    veth(&a, "eth1", &b, "p1");
    veth(&a, "eth2", &b, "p2");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let out = a
                .try_exec(
                    lb_binary().to_str().unwrap(),
                    &["check", "--config", p.to_str().unwrap()],
                )
                .unwrap_or_else(|e| panic!("{} does not validate: {e}", p.display()));
            println!("{}", out.trim());
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "config/ holds the seed example and the demo config"
    );
}
