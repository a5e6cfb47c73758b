//! The Debian package (root): `cargo xtask test` builds it
//! (`$LB_TEST_PACKAGE`); installed with dpkg into an empty root, it holds
//! what it should, its `lb` validates the example configs it ships (in a
//! namespace with the interfaces they name), its man page is there, and
//! `systemd-analyze verify` accepts its unit without a warning.

use std::path::{Path, PathBuf};

use lb_tests::{netns::Netns, require_root, unique, TempDir};

fn sh(program: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Copies the regular files of `from` into `to` (not over existing ones).
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_file() && !target.exists() {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn root_the_debian_package_installs_checks_its_examples_and_its_unit_verifies() {
    require_root();
    let deb = PathBuf::from(std::env::var_os("LB_TEST_PACKAGE").expect(
        "LB_TEST_PACKAGE names the package: run this through `cargo xtask test`, which builds it",
    ));
    let dir = TempDir::new("pkgroot");
    let root = dir.path();
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let r = root.to_str().unwrap();
    let (ok, out) = sh(
        "dpkg",
        &[
            &format!("--root={r}"),
            "--force-depends",
            "-i",
            deb.to_str().unwrap(),
        ],
    );
    assert!(ok, "dpkg -i {}:\n{out}", deb.display());
    let (ok, files) = sh("dpkg", &[&format!("--root={r}"), "-L", "lb"]);
    assert!(ok, "{files}");
    for f in [
        "/usr/bin/lb",
        "/lib/systemd/system/lb.service",
        "/usr/share/man/man1/lb.1.gz",
        "/usr/share/doc/lb/examples/seed.toml",
        "/usr/share/doc/lb/examples/demo.toml",
        "/usr/share/doc/lb/README.md",
    ] {
        assert!(
            files.lines().any(|l| l == f),
            "the package installs {f}:\n{files}"
        );
        assert!(root.join(&f[1..]).exists(), "{f} is in the root");
    }
    let (ok, man) = sh(
        "zcat",
        &[root.join("usr/share/man/man1/lb.1.gz").to_str().unwrap()],
    );
    assert!(
        ok && man.contains(".TH lb") && man.contains("RUN"),
        "the man page:\n{man}"
    );

    // The shipped configs name eth0..eth2: check them where those exist.
    let ns = Netns::new(&format!("pk{}{}", std::process::id() % 10_000, unique()));
    for (i, peer) in [("eth0", "p0"), ("eth1", "p1"), ("eth2", "p2")] {
        ns.ip(&["link", "add", i, "type", "veth", "peer", "name", peer]);
    }
    let lb = root.join("usr/bin/lb");
    for example in ["seed.toml", "demo.toml"] {
        let cfg = root.join("usr/share/doc/lb/examples").join(example);
        let out = ns.exec(
            lb.to_str().unwrap(),
            &["check", "--config", cfg.to_str().unwrap()],
        );
        assert!(out.contains(": OK ("), "lb check {example}: {out}");
        println!("{}", out.trim());
    }

    // systemd-analyze verify in the root: the host's units (for the
    // targets the unit is ordered after) and kill (ExecReload) beside ours.
    copy_files(
        Path::new("/lib/systemd/system"),
        &root.join("lib/systemd/system"),
    );
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/kill", root.join("bin/kill")).unwrap();
    let (ok, out) = sh(
        "systemd-analyze",
        &[
            "verify",
            "--man=no",
            &format!("--root={r}"),
            "lib/systemd/system/lb.service",
        ],
    );
    assert!(ok, "systemd-analyze verify:\n{out}");
    assert!(
        !out.contains("lb.service"),
        "systemd-analyze verify has something to say about the unit:\n{out}"
    );
    println!("systemd-analyze verify: accepted");
}
