//! The testbed the end-to-end suites, `cargo xtask demo` and the bench share: network
//! namespaces joined by veth pairs, real nginx, the real `lb` daemon, and
//! frame builders for BPF_PROG_TEST_RUN. Everything it creates is removed by
//! RAII guards when they drop, also when a test panics.

pub mod daemon;
pub mod flood;
pub mod frames;
pub mod http;
pub mod load;
pub mod mariadb;
pub mod model;
pub mod netns;
pub mod nginx;
pub mod rng;
pub mod scan;
pub mod seed;
pub mod testrun;
pub mod topology;
pub mod udp;

/// Runs a command and panics with its output if it fails: test set-up that
/// fails must fail loudly.
pub fn sh(program: &str, args: &[&str]) -> String {
    match try_sh(program, args) {
        Ok(out) => out,
        Err(e) => panic!("{e}"),
    }
}

/// Runs a command; `Err` carries the command line and what it printed.
pub fn try_sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| {
            format!("cannot run `{program}`: {e} (is it installed? `cargo xtask test` installs it)")
        })?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("lb-{tag}-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("LB_KEEP_TEMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A number unique within this process (for names of namespaces and dirs).
pub fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Panics unless running as root: the kernel and namespace suites need it, and
/// must fail (not skip) when they cannot run.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test needs root (BPF, network namespaces): run it with `sudo cargo xtask test`"
        );
    }
}

/// Sends `n` requests, each on a new connection, from `ns` to `target`;
/// returns how many were answered with 200.
pub fn burst_ok(ns: &netns::Netns, target: std::net::SocketAddr, n: usize) -> usize {
    ns.run(move || {
        (0..n)
            .filter(|_| matches!(http::get(target, "/"), Ok((200, _))))
            .count()
    })
}
