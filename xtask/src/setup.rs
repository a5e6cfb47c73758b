//! Installs what the commands need when it is missing, idempotently: the
//! nightly toolchain's rust-src, bpf-linker (built against the nightly's own
//! LLVM), cargo-mutants, and Debian packages. Each step says what it does before doing it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{cmd, run};

/// Whether `program` can be found in PATH or the sbin directories.
pub fn have(program: &str) -> bool {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.iter().any(|d| d.join(program).is_file())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Debian packages, by the program that tells whether they are installed,
/// that the demo needs.
pub const DEMO_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("ethtool", "ethtool"),
    ("nginx", "nginx"),
    ("sysctl", "procps"),
    ("mariadbd", "mariadb-server"),
    ("mariadb", "mariadb-client"),
    ("dnsmasq", "dnsmasq-base"),
    ("openssl", "openssl"),
    ("curl", "curl"),
];

/// What the tests need: the demo's packages and a browser for the status page.
pub fn test_packages() -> Vec<(&'static str, &'static str)> {
    let mut p = DEMO_PACKAGES.to_vec();
    p.extend([
        ("chromium", "chromium"),
        // The package test: build, install, verify the unit.
        ("dpkg-deb", "dpkg"),
        ("gzip", "gzip"),
        ("systemd-analyze", "systemd"),
    ]);
    p
}

/// What the benchmark needs: the demo's packages (nginx, MariaDB, nftables)
/// and the alternatives it compares with and the load it makes.
pub fn bench_packages() -> Vec<(&'static str, &'static str)> {
    let mut p = DEMO_PACKAGES.to_vec();
    p.extend([("haproxy", "haproxy"), ("wrk", "wrk")]);
    p
}

/// Installs the Debian packages whose program is missing.
pub fn ensure_packages(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!(
            "missing programs from packages {missing:?} and no apt-get to install them: \
             install them with your package manager"
        );
    }
    println!("setup: installing {} (Debian packages)", missing.join(" "));
    let sudo = if is_root() { None } else { Some("sudo") };
    let apt = |args: &[&str]| -> Result<()> {
        let mut c = match sudo {
            Some(s) => {
                let mut c = Command::new(s);
                c.arg("apt-get");
                c
            }
            None => Command::new("apt-get"),
        };
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut c)
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)?;
    let still: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(bin, _)| *bin)
        .collect();
    if !still.is_empty() {
        bail!("installed {missing:?} but {still:?} still cannot be found");
    }
    Ok(())
}

fn nightly_has(component: &str) -> Result<bool> {
    let out = cmd(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .output()
    .context("running rustup")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with(component)))
}

/// The nightly toolchain with rust-src (for `-Z build-std=core`) and clippy.
pub fn ensure_nightly() -> Result<()> {
    let toolchains = cmd("rustup", &["toolchain", "list"])
        .output()
        .context("running rustup (the eBPF build needs rustup's nightly toolchain)")?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        println!("setup: installing the nightly toolchain (the eBPF crate builds with it)");
        run(&mut cmd(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        ))?;
    }
    for component in ["rust-src", "clippy"] {
        if !nightly_has(component)? {
            println!("setup: adding {component} to the nightly toolchain");
            run(&mut cmd(
                "rustup",
                &["component", "add", component, "--toolchain", "nightly"],
            ))?;
        }
    }
    Ok(())
}

fn bpf_linker_works() -> bool {
    // Run outside rustup's environment: it must find its LLVM on its own.
    Command::new("bpf-linker")
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// bpf-linker, built from crates.io against the LLVM inside the nightly
/// toolchain (so it always reads the bitcode that nightly's rustc writes).
pub fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    println!(
        "setup: building bpf-linker against the nightly toolchain's LLVM (about 3 minutes, once)"
    );
    let vv = cmd("rustc", &["+nightly", "-vV"])
        .output()
        .context("running rustc +nightly")?;
    let vv = String::from_utf8_lossy(&vv.stdout);
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV printed no LLVM version")?
        .to_owned();
    let sysroot = cmd("rustc", &["+nightly", "--print", "sysroot"]).output()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let libdir = sysroot.join("lib");
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || n.starts_with("libLLVM-"))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home).join(".local/share/bpf-linker-llvm");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    // What the build links against, and the SONAME the binary loads at run time.
    for name in [
        std::ffi::OsString::from("libLLVM.so"),
        lib.file_name().unwrap().to_owned(),
    ] {
        let link = plib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let mut c = cmd(
        "cargo",
        &[
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ],
    );
    c.env("LLVM_PREFIX", &prefix);
    run(&mut c)?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails: is ~/.cargo/bin in PATH?"
        );
    }
    Ok(())
}

/// The cargo-mutants release `cargo xtask mutants` runs: pinned, so a report
/// reproduces (its mutation operators change between releases), and one that
/// builds with the stable toolchain here (it needs rustc 1.88 or later).
pub const CARGO_MUTANTS_VERSION: &str = "27.1.0";

/// Whether the installed cargo-mutants is the pinned release.
fn cargo_mutants_is_pinned() -> bool {
    cmd("cargo", &["mutants", "--version"])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).trim()
                    == format!("cargo-mutants {CARGO_MUTANTS_VERSION}")
        })
        .unwrap_or(false)
}

/// cargo-mutants at the pinned release, from crates.io with its own lock file.
pub fn ensure_cargo_mutants() -> Result<()> {
    if cargo_mutants_is_pinned() {
        return Ok(());
    }
    println!("setup: installing cargo-mutants {CARGO_MUTANTS_VERSION} (about 3 minutes, once)");
    run(&mut cmd(
        "cargo",
        &[
            "install",
            "--locked",
            &format!("cargo-mutants@{CARGO_MUTANTS_VERSION}"),
        ],
    ))?;
    if !cargo_mutants_is_pinned() {
        bail!(
            "cargo-mutants {CARGO_MUTANTS_VERSION} was installed but `cargo mutants --version` \
             does not say so: is ~/.cargo/bin in PATH?"
        );
    }
    Ok(())
}
