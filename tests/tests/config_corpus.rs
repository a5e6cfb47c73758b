//! `lb check` against hostile input. Every file in `tests/corpus/bad-config/`
//! is a config the real binary must refuse: promptly, with exit status 1, a
//! message that names the file and holds each `# expect:` line at the top of
//! the file, and no panic. What cannot be a file in the repository (a config
//! path that is a directory, a symlink loop, a password file that is a
//! directory) or would be too big to keep there (one deny CIDR or backend more
//! than the maps hold) is made in a temp dir. The shipped examples in
//! `config/` are good and stay out of the corpus.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use lb_tests::{daemon::lb_binary, TempDir};
use lb_userspace::config::Config;

/// The corpus may grow; it must not shrink unnoticed.
const MIN_CORPUS_FILES: usize = 193;

/// `lb check` answers in milliseconds; one that takes longer has hung.
const TIME_LIMIT: Duration = Duration::from_secs(5);

/// Corpus files that cannot carry an `# expect:` line: a comment would change
/// what they are.
const HEADERLESS: &[(&str, &[&str])] = &[
    ("empty.toml", &["missing field `daemon`"]),
    (
        "only-nul-bytes.toml",
        &["TOML parse error at line 1", "invalid key"],
    ),
];

const GOOD: &str = r#"
[daemon]
interfaces = ["lo"]

[[service]]
name = "db"
vip = "10.0.0.101"
port = 3306
protocol = "tcp"
steering = "mysql-primary"

[service.mysql]
user = "lbmonitor"
password_file = "monitor.pass"

[[service.backend]]
name = "db1"
address = "10.0.3.21"
"#;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/bad-config")
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

/// What `lb check` must print for a corpus file: its `# expect:` lines.
fn expectations(file: &Path) -> Vec<String> {
    let name = file.file_name().unwrap().to_string_lossy();
    if let Some((_, wants)) = HEADERLESS.iter().find(|(n, _)| *n == name) {
        return wants.iter().map(|w| w.to_string()).collect();
    }
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    String::from_utf8_lossy(&bytes)
        .lines()
        .map_while(|l| l.strip_prefix("# expect: "))
        .map(str::to_owned)
        .collect()
}

/// Runs `lb check --config file`; says how it fell short of a prompt, clean
/// refusal naming the file and each of `wants`, if it did.
fn refusal_fault(file: &Path, wants: &[String]) -> Option<String> {
    let start = Instant::now();
    let child = Command::new(lb_binary())
        .args(["check", "--config"])
        .arg(file)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running lb check");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(TIME_LIMIT) {
        Ok(out) => out.expect("waiting for lb check"),
        Err(_) => {
            // SAFETY: kill(2) of our own child, not yet reaped: its waiter is
            // still blocked on it, so the pid cannot have been reused.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return Some(format!(
                "{}: lb check did not finish within {TIME_LIMIT:?}",
                file.display()
            ));
        }
    };
    let took = start.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut faults = Vec::new();
    if out.status.code() != Some(1) {
        faults.push(format!("exit {} (1 is a refusal)", out.status));
    }
    if !text.contains(&file.display().to_string()) {
        faults.push("the message does not name the file".to_owned());
    }
    faults.extend(
        wants
            .iter()
            .filter(|w| !text.contains(w.as_str()))
            .map(|w| format!("the message lacks {w:?}")),
    );
    faults.extend(
        ["panicked", "RUST_BACKTRACE"]
            .iter()
            .filter(|p| text.contains(*p))
            .map(|p| format!("the message says {p:?}: a panic")),
    );
    let clipped: String = text.chars().take(2_000).collect();
    (!faults.is_empty()).then(|| {
        format!(
            "{}: {}\n  lb check said (in {took:?}):\n{clipped}",
            file.display(),
            faults.join("; ")
        )
    })
}

fn assert_all_refused(cases: &[(PathBuf, Vec<String>)]) {
    let faults: Vec<String> = cases
        .iter()
        .filter_map(|(file, wants)| refusal_fault(file, wants))
        .collect();
    assert!(
        faults.is_empty(),
        "{} of {} bad configs were not refused as they should be:\n\n{}",
        faults.len(),
        cases.len(),
        faults.join("\n\n")
    );
}

#[test]
fn every_corpus_file_is_refused_with_its_message() {
    let files = toml_files(&corpus_dir());
    assert!(
        files.len() >= MIN_CORPUS_FILES,
        "the corpus holds {} files, at least {MIN_CORPUS_FILES} expected: was one lost?",
        files.len()
    );
    let cases: Vec<(PathBuf, Vec<String>)> = files
        .into_iter()
        .map(|f| {
            let wants = expectations(&f);
            assert!(
                !wants.is_empty(),
                "{} has no `# expect: ` line (text the refusal must contain)",
                f.display()
            );
            (f, wants)
        })
        .collect();
    assert_all_refused(&cases);
}

#[test]
fn paths_that_cannot_be_corpus_files_are_refused() {
    let dir = TempDir::new("corpus");
    let d = dir.path();
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    };
    std::os::unix::fs::symlink(d.join("loop.toml"), d.join("loop.toml")).expect("a symlink loop");
    std::os::unix::fs::symlink(d.join("gone.toml"), d.join("dangling.toml"))
        .expect("a dangling symlink");
    write("monitor.pass", "secret\n");
    let plain = write("plain.toml", GOOD);
    std::fs::create_dir(d.join("secrets")).expect("a directory");
    std::fs::write(d.join("binary.pass"), [0xff, 0xfe, 0x00, 0x80]).expect("a binary password");

    // Round robin over MAX_BACKENDS + 1 backends, 241 to a service: every
    // service fits, their total does not.
    let backends = lb_common::MAX_BACKENDS as usize + 1;
    let mut too_many = "[daemon]\ninterfaces = [\"lo\"]\n".to_owned();
    for s in 0..backends.div_ceil(241) {
        too_many += &format!(
            "[[service]]\nname = \"s{s}\"\nvip = \"10.0.0.{}\"\nport = 80\nprotocol = \"tcp\"\n",
            s + 1
        );
        for b in (s * 241..backends).take(241) {
            too_many += &format!(
                "[[service.backend]]\nname = \"b{b}\"\naddress = \"10.1.{}.{}\"\n",
                b / 250,
                b % 250 + 1
            );
        }
    }

    // One CIDR more than the global deny list holds, none near a backend.
    let deny_rules = lb_common::firewall::MAX_DENY_RULES + 1;
    let deny: Vec<String> = (0..deny_rules)
        .map(|i| {
            format!(
                "\"{}\"",
                Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i)
            )
        })
        .collect();
    let too_many_deny = GOOD.replace(
        "[[service]]",
        &format!("[firewall]\ndeny = [{}]\n\n[[service]]", deny.join(", ")),
    );
    // One source rule more than all services together may have, shared
    // between two services (each alone would fit).
    let rules = lb_common::firewall::MAX_SERVICE_RULES as usize + 1;
    let cidr_list = |range: std::ops::Range<usize>| {
        range
            .map(|i| format!("\"10.{}.{}.0/24\"", 64 + i / 256, i % 256))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let too_many_rules = format!(
        "{GOOD}\n[service.firewall]\nallow = [{}]\n\n\
         [[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n\n\
         [service.firewall]\ndeny = [{}]\n\n\
         [[service.backend]]\nname = \"web1\"\naddress = \"10.0.2.11\"\n",
        cidr_list(0..rules / 2),
        cidr_list(rules / 2..rules),
    );

    let want = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases = [
        (
            d.to_owned(),
            want(&["cannot read the config file: not a regular file"]),
        ),
        (
            d.join("absent.toml"),
            want(&["cannot read the config file", "No such file or directory"]),
        ),
        (
            d.join("dangling.toml"),
            want(&["cannot read the config file", "No such file or directory"]),
        ),
        (
            d.join("loop.toml"),
            want(&[
                "cannot read the config file",
                "Too many levels of symbolic links",
            ]),
        ),
        (
            plain.join("lb.toml"),
            want(&["cannot read the config file", "Not a directory"]),
        ),
        (
            write(
                "password-dir.toml",
                &GOOD.replace("monitor.pass", "secrets"),
            ),
            want(&[
                "service[0].mysql.password_file",
                &format!(
                    "cannot read {}: not a regular file",
                    d.join("secrets").display()
                ),
            ]),
        ),
        (
            write(
                "password-binary.toml",
                &GOOD.replace("monitor.pass", "binary.pass"),
            ),
            want(&[
                "service[0].mysql.password_file",
                "binary.pass: not UTF-8 text",
            ]),
        ),
        (
            write("too-many-deny-cidrs.toml", &too_many_deny),
            want(&[&format!(
                "firewall.deny: {deny_rules} CIDRs, at most {} are supported",
                lb_common::firewall::MAX_DENY_RULES
            )]),
        ),
        (
            write("too-many-service-rules.toml", &too_many_rules),
            want(&[&format!(
                "service: {rules} firewall rules in all services, at most {} are supported",
                lb_common::firewall::MAX_SERVICE_RULES
            )]),
        ),
        (
            write("too-many-backends.toml", &too_many),
            want(&[&format!(
                "service: {backends} backends in all, at most {} are supported",
                lb_common::MAX_BACKENDS
            )]),
        ),
    ];
    assert_all_refused(&cases);
}

/// A read error gives the OS's reason once, not once from `lb` and again from
/// the error it wraps.
#[test]
fn a_read_error_says_the_os_error_once() {
    let dir = TempDir::new("corpus-once");
    let absent = dir.path().join("absent.toml");
    let out = Command::new(lb_binary())
        .args(["check", "--config"])
        .arg(&absent)
        .stdin(Stdio::null())
        .output()
        .expect("running lb check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "lb check said: {text}");
    assert_eq!(
        text.matches("No such file or directory").count(),
        1,
        "the OS error once: {text}"
    );
}

#[test]
fn shipped_examples_are_good_and_not_in_the_corpus() {
    let corpus: Vec<(String, Vec<u8>)> = toml_files(&corpus_dir())
        .iter()
        .map(|f| {
            (
                f.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(f).unwrap(),
            )
        })
        .collect();
    let examples = toml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../config"));
    assert!(
        examples.len() >= 2,
        "config/ holds the seed example and the demo config"
    );
    for example in examples {
        let text = std::fs::read_to_string(&example)
            .unwrap_or_else(|e| panic!("reading {}: {e}", example.display()));
        // Their interfaces are the demo's, not this host's: only those are
        // taken on trust here (cli_check.rs checks them in a namespace).
        if let Err(e) = Config::parse(&example, &text, &|_| true) {
            panic!("a shipped example is refused: {e}");
        }
        let name = example.file_name().unwrap().to_string_lossy();
        for (bad, bytes) in &corpus {
            assert!(
                *bad != name && *bytes != text.as_bytes(),
                "the corpus of bad configs holds {bad}, which is the good example {}",
                example.display()
            );
        }
    }
}
