//! `cargo xtask <command>`: the project's doors. Each command installs what it
//! needs when it is missing, so on a fresh machine these are the whole set-up.

mod package;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the XDP program (nightly, bpf-linker; installed if missing).
    BuildEbpf,
    /// Build everything: the XDP program and the `lb` binary (release).
    Build,
    /// Build, then run `lb` as root with these arguments: `cargo xtask run -- run --config FILE`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Everything CI runs: formatting, clippy, unit tests, kernel tests and the
    /// end-to-end suites in network namespaces (root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Per-packet cost of the data path (XDP and TC) against MAC-swap floors,
    /// how it grows, end to end against HAProxy, nftables and no balancer, and
    /// the control plane; writes bench/results/latest.{md,json,svg} (root).
    Bench {
        /// A shorter run (well under two minutes).
        #[arg(long)]
        quick: bool,
    },
    /// A Debian package (binary, systemd unit, example configs, man page) in
    /// target/debian.
    Package,
    /// Mutation testing (cargo-mutants, installed if missing) of `lb-common`
    /// and the control plane's planner, scoped by `.cargo/mutants.toml`;
    /// the results land in mutants.out/.
    Mutants {
        /// Extra arguments for `cargo mutants` (e.g. `--jobs 2`, or
        /// `-f lb-common/src/ring.rs` for one file).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The seed's whole infrastructure in network namespaces on this machine
    /// (DNS, our balancer, nginx, app servers, MariaDB primary and replica): a
    /// checked story, then everything is removed (root).
    Demo {
        /// Leave everything running after the story, until Ctrl-C.
        #[arg(long)]
        interactive: bool,
        /// Run the story once and clean up (the default; kept for old scripts).
        #[arg(long, hide = true)]
        once: bool,
    },
    /// The demo's topology under steady mixed load (HTTP on new and long-lived
    /// connections, MySQL writes and reads) while a chaos loop stops web
    /// servers, reloads configs, SIGKILLs the daemon, swaps the program and
    /// switches MySQL over; fails on any failure the design does not allow (root).
    Soak {
        /// How long the load and the chaos run.
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// The chaos loop's seed (printed by every run), to replay its order.
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Build => build_all(),
        Cmd::Run { args } => run_lb(&args),
        Cmd::Test { args } => test(&args),
        Cmd::Demo { interactive, .. } => demo(interactive),
        Cmd::Bench { quick } => bench(quick),
        Cmd::Soak { minutes, seed } => soak(minutes, seed),
        Cmd::Package => package::package().map(|_| ()),
        Cmd::Mutants { args } => mutants(&args),
    };
    if let Err(e) = r {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// A command run from the workspace root, without the toolchain selection of
/// the cargo that runs xtask (the eBPF build picks nightly explicitly).
pub fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args)
        .current_dir(root())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR");
    c
}

/// Runs a command to completion; fails with the command line if it fails.
pub fn run(c: &mut Command) -> Result<()> {
    let line = format!("{c:?}");
    let status = c.status().with_context(|| format!("cannot start {line}"))?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    Ok(())
}

fn build_ebpf() -> Result<()> {
    setup::ensure_nightly()?;
    setup::ensure_bpf_linker()?;
    println!("build: the XDP program (lb-ebpf)");
    run(&mut ebpf_cargo("build", &[]))
}

/// `cargo +nightly <verb>` for the eBPF crate, with its target and flags.
fn ebpf_cargo(verb: &str, extra: &[&str]) -> Command {
    let mut args = vec![
        "+nightly",
        verb,
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ];
    args.extend_from_slice(extra);
    let mut c = cmd("cargo", &args);
    // v3: the round-robin position needs the atomic fetch-and-add instruction.
    c.current_dir(root().join("lb-ebpf")).env(
        "RUSTFLAGS",
        "-C debuginfo=2 -C link-arg=--btf -C target-cpu=v3",
    );
    c
}

/// A second build of the program, with `verbose-logs`: the upgrade test swaps
/// it in for the embedded one, as a new release would be.
fn build_ebpf_variant() -> Result<PathBuf> {
    let dir = root().join("target/ebpf-verbose");
    println!("build: a second build of the XDP program (verbose-logs) for the upgrade test");
    run(&mut ebpf_cargo(
        "build",
        &[
            "--features",
            "verbose-logs",
            "--target-dir",
            dir.to_str().expect("utf-8 path"),
        ],
    ))?;
    Ok(dir.join("bpfel-unknown-none/release/lb-ebpf"))
}

fn build_all() -> Result<()> {
    build_ebpf()?;
    run(&mut cmd(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "lb-userspace",
            "-p",
            "lb-tests",
            "-p",
            "lb-bench",
            "--bins",
        ],
    ))
}

/// Re-runs through sudo when not root.
fn as_root(program: &Path, args: &[String]) -> Result<()> {
    let mut c = if setup::is_root() {
        Command::new(program)
    } else {
        println!("(not root: running through sudo)");
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    };
    c.args(args);
    run(&mut c)
}

fn run_lb(args: &[String]) -> Result<()> {
    build_all()?;
    as_root(&root().join("target/release/lb"), args)
}

fn bench(quick: bool) -> Result<()> {
    setup::ensure_packages(&setup::bench_packages())?;
    // The eBPF build makes the floor program (xdp-floor) alongside lb's.
    build_all()?;
    let args: Vec<String> = if quick {
        vec!["--quick".into()]
    } else {
        vec![]
    };
    as_root(&root().join("target/release/lb-bench"), &args)
}

fn demo(interactive: bool) -> Result<()> {
    setup::ensure_packages(setup::DEMO_PACKAGES)?;
    build_all()?;
    let args: Vec<String> = if interactive {
        vec!["--interactive".into()]
    } else {
        vec![]
    };
    as_root(&root().join("target/release/lb-demo"), &args)
}

fn soak(minutes: f64, seed: Option<u64>) -> Result<()> {
    setup::ensure_packages(setup::DEMO_PACKAGES)?;
    build_all()?;
    // The program swaps alternate between lb's own program and a second
    // build, as the upgrade test's.
    let variant = build_ebpf_variant()?;
    as_root(
        &root().join("target/release/lb-soak"),
        &soak_args(minutes, seed, &variant),
    )
}

fn soak_args(minutes: f64, seed: Option<u64>, variant: &Path) -> Vec<String> {
    let mut args = vec![
        "--minutes".into(),
        minutes.to_string(),
        "--upgrade-object".into(),
        variant.display().to_string(),
    ];
    if let Some(s) = seed {
        args.extend(["--seed".into(), s.to_string()]);
    }
    args
}

fn test(extra: &[String]) -> Result<()> {
    if !setup::is_root() {
        bail!(
            "`cargo xtask test` runs kernel and network-namespace suites and needs root: \
             run it as root (CI does)"
        );
    }
    setup::ensure_packages(&setup::test_packages())?;
    build_ebpf()?;
    println!("test: formatting");
    run(&mut cmd("cargo", &["fmt", "--all", "--", "--check"]))?;
    let mut c = cmd("cargo", &["fmt", "--", "--check"]);
    c.current_dir(root().join("lb-ebpf"));
    run(&mut c)?;
    println!("test: clippy");
    run(&mut cmd(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    ))?;
    run(&mut ebpf_cargo("clippy", &["--", "-D", "warnings"]))?;
    run(&mut ebpf_cargo(
        "clippy",
        &["--features", "verbose-logs", "--", "-D", "warnings"],
    ))?;
    let variant = build_ebpf_variant()?;
    println!("test: building lb");
    run(&mut cmd(
        "cargo",
        &["build", "-p", "lb-userspace", "--bin", "lb"],
    ))?;
    println!("test: a Debian package of that build, for the package test");
    let deb = package::build_package(&root().join("target/debug/lb"))?;
    println!("test: unit, kernel (BPF_PROG_TEST_RUN) and end-to-end suites");
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    if !extra.iter().any(|a| a == "--") {
        // The namespace suites are heavy; one at a time keeps them deterministic
        // on a 2-core machine.
        args.extend(["--", "--test-threads=1"]);
    }
    let mut c = cmd("cargo", &args);
    c.env("LB_TEST_UPGRADE_OBJECT", &variant)
        .env("LB_TEST_PACKAGE", &deb);
    let suites = run(&mut c);
    // Two minutes of the soak (`cargo xtask soak`): the demo's topology under
    // load while the chaos loop runs every kind of event at least once. Run
    // even when a suite failed, so one run shows both.
    println!("test: a two-minute soak (cargo xtask soak --minutes 2; its seed is printed)");
    build_all()?;
    let soaked = as_root(
        &root().join("target/release/lb-soak"),
        &soak_args(2.0, None, &variant),
    );
    suites.and(soaked)
}

/// What `cargo xtask mutants` mutates: the pure code both sides of the kernel
/// boundary agree on, and the control plane's planner (the README's report
/// covers exactly these files).
const MUTANTS_SCOPE: &[&str] = &[
    "lb-common/src/*.rs",
    "lb-userspace/src/dataplane/plan.rs",
    "lb-userspace/src/reconcile/desired.rs",
];

fn mutants(extra: &[String]) -> Result<()> {
    setup::ensure_cargo_mutants()?;
    // lb-userspace embeds the XDP object: each mutant's build needs it (the
    // copy cargo-mutants builds in carries lb-ebpf/target along).
    build_ebpf()?;
    println!(
        "mutants: cargo-mutants {} (settings in .cargo/mutants.toml)",
        setup::CARGO_MUTANTS_VERSION
    );
    let mut args = vec!["mutants"];
    // Files given on the command line replace the scope (cargo-mutants adds
    // them to its config file's globs, so the scope is not kept there).
    let own_files = extra
        .iter()
        .any(|a| a.starts_with("-f") || a.starts_with("--file"));
    if !own_files {
        for glob in MUTANTS_SCOPE {
            args.extend(["--file", glob]);
        }
    }
    args.extend(extra.iter().map(String::as_str));
    let status = cmd("cargo", &args)
        .status()
        .context("cannot start cargo mutants")?;
    let out = mutants_output(extra).join("mutants.out");
    let missed = || {
        std::fs::read_to_string(out.join("missed.txt"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    // cargo-mutants' exit codes: 2 some mutant was missed, 3 some timed out
    // (also when some were missed: its list decides), 4 the tests fail on
    // the unmutated tree.
    match status.code() {
        Some(0) => Ok(()),
        Some(2 | 3) if missed() > 0 => bail!(
            "{} mutants missed: {} lists them",
            missed(),
            out.join("missed.txt").display()
        ),
        Some(3) => {
            // A mutant that makes the tests hang is one they notice.
            println!(
                "mutants: none missed; those that timed out ({}) count as caught",
                out.join("timeout.txt").display()
            );
            Ok(())
        }
        Some(4) => bail!(
            "the unit tests fail without any mutation: {}",
            out.join("log/baseline.log").display()
        ),
        _ => bail!("cargo mutants failed ({status})"),
    }
}

/// Where cargo-mutants writes its `mutants.out`: `-o`/`--output DIR`, else
/// the workspace root.
fn mutants_output(args: &[String]) -> PathBuf {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(dir) = a.strip_prefix("--output=") {
            return root().join(dir);
        }
        if a == "-o" || a == "--output" {
            if let Some(dir) = it.next() {
                return root().join(dir);
            }
        }
    }
    root()
}
