//! The real `lb` binary, run as a daemon inside a namespace.

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use lb_userspace::control::{self, Request};

use crate::{netns::Netns, TempDir};

/// Where the `lb` binary is: `$LB_BIN`, or next to the test executable's
/// directory (cargo puts test binaries in target/<profile>/deps).
pub fn lb_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let p = dir.join("lb");
    assert!(
        p.exists(),
        "the lb binary is not at {}: build it first (`cargo xtask test` does) or set LB_BIN",
        p.display()
    );
    p
}

/// How the daemon is put into its network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// The test enters the network namespace alone before exec (as
    /// `nsenter --net` would): the daemon shares the host's mounts.
    SameMounts,
    /// `lb run --netns NAME`, started from the host.
    NetnsFlag,
    /// `ip netns exec NAME lb run`: a private mount namespace, a fresh /sys.
    IpNetnsExec,
}

/// A running `lb run`, stopped with SIGTERM on drop.
pub struct LbDaemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub config: PathBuf,
    ns: String,
    object: Option<PathBuf>,
    launch: Launch,
    _dir: TempDir,
}

impl LbDaemon {
    /// Writes `config` (with `{socket}` replaced by the control socket path) and
    /// starts `lb run` in `ns`; returns once the daemon answers on its socket.
    pub fn start(ns: &Netns, config: impl FnOnce(&Path) -> String) -> LbDaemon {
        LbDaemon::start_as(ns, Launch::SameMounts, config)
    }

    /// Like [`LbDaemon::start`], put into `ns` the way `launch` says.
    pub fn start_as(ns: &Netns, launch: Launch, config: impl FnOnce(&Path) -> String) -> LbDaemon {
        let dir = TempDir::new("lbd");
        let socket = dir.path().join("lb.sock");
        let cfg_path = dir.path().join("lb.toml");
        std::fs::write(&cfg_path, config(&socket)).expect("writing lb.toml");
        let mut d = LbDaemon::new(ns, &cfg_path, &socket, dir);
        d.launch = launch;
        d.spawn(&[]);
        d
    }

    /// Starts `lb run --config cfg_path` in `ns`, whose config names `socket`
    /// as its control socket; its log goes into `dir`.
    pub fn start_file(ns: &Netns, cfg_path: &Path, socket: &Path, dir: TempDir) -> LbDaemon {
        let mut d = LbDaemon::new(ns, cfg_path, socket, dir);
        d.spawn(&[]);
        d
    }

    fn new(ns: &Netns, cfg_path: &Path, socket: &Path, dir: TempDir) -> LbDaemon {
        LbDaemon {
            child: None,
            socket: socket.to_owned(),
            log: dir.path().join("lb.log"),
            config: cfg_path.to_owned(),
            ns: ns.name.clone(),
            object: None,
            launch: Launch::SameMounts,
            _dir: dir,
        }
    }

    /// Starts `lb run` again (after [`LbDaemon::kill`] or a stop), with the same
    /// config, socket and log (appended), plus `extra` arguments.
    pub fn restart(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.spawn(extra);
    }

    /// Like [`LbDaemon::restart`], loading the XDP object at `object` instead
    /// of the one built into `lb` (`LB_XDP_OBJECT`): an upgrade.
    pub fn restart_with_object(&mut self, object: &Path) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.object = Some(object.to_owned());
        self.spawn(&[]);
    }

    /// Like [`LbDaemon::restart`], loading the program built into `lb` again
    /// after [`LbDaemon::restart_with_object`] (the other way of a swap).
    pub fn restart_with_built_in_object(&mut self) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.object = None;
        self.spawn(&[]);
    }

    fn spawn(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening lb.log");
        let ns = Netns::attach(&self.ns);
        let mut cmd = match self.launch {
            Launch::SameMounts => ns.command_same_mounts(lb_binary()),
            Launch::NetnsFlag => {
                let mut c = std::process::Command::new(lb_binary());
                c.args(["run", "--netns", &self.ns]);
                c
            }
            Launch::IpNetnsExec => {
                let mut c = ns.command(lb_binary().to_str().expect("utf-8 path"));
                c.arg("run");
                c
            }
        };
        if self.launch == Launch::SameMounts {
            cmd.arg("run");
        }
        if let Some(o) = &self.object {
            cmd.env("LB_XDP_OBJECT", o);
        }
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting lb");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if control::request(&self.socket, &Request::Status).is_ok() {
                break;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "lb exited with {status} during start-up:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "lb did not answer on {} in 20 s:\n{}",
                    self.socket.display(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the daemon, as a crash would: nothing of it gets to clean up.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits for the daemon to exit on its own (after `lb stop`).
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("lb did not exit within {within:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `lb status --json`, through the control socket.
    pub fn status(&self) -> serde_json::Value {
        control::request(&self.socket, &Request::Status).unwrap_or_else(|e| {
            panic!(
                "lb status: {}\n{}",
                lb_userspace::error::Chain(&e),
                self.log_text()
            )
        })
    }

    /// One backend's traffic counters from `lb status`.
    pub fn backend_traffic(&self, service: &str, backend: &str) -> serde_json::Value {
        self.backend(service, backend)["traffic"].clone()
    }

    /// Runs the real `lb` CLI against this daemon's socket:
    /// `cli(&["backend", "drain", "web", "web1"])`. Returns (success, output).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new(lb_binary())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("running lb");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Replaces the daemon's config file as an operator's tool should: a
    /// new file renamed over the old, so a reload never reads half of it.
    pub fn write_config(&self, content: &str) {
        let tmp = self.config.with_extension("toml.new");
        std::fs::write(&tmp, content).expect("writing the new config");
        std::fs::rename(&tmp, &self.config).expect("renaming it into place");
    }

    /// (applied, rejected) reloads so far, from `lb status`.
    pub fn reloads(&self) -> (u64, u64) {
        let r = &self.status()["reloads"];
        (
            r["applied"].as_u64().expect("reloads.applied"),
            r["rejected"].as_u64().expect("reloads.rejected"),
        )
    }

    /// Sends SIGHUP and waits until the daemon has handled it: its count of
    /// applied (`applied`) or rejected reloads moved past `before`.
    pub fn sighup_and_wait(&self, before: (u64, u64), applied: bool) {
        self.signal(libc::SIGHUP);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.reloads();
            let moved = if applied {
                now.0 > before.0
            } else {
                now.1 > before.1
            };
            if moved {
                assert_eq!(
                    now,
                    if applied {
                        (before.0 + 1, before.1)
                    } else {
                        (before.0, before.1 + 1)
                    },
                    "one reload, of the kind expected"
                );
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "SIGHUP not handled within 5 s (reloads {now:?}, before {before:?})\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid, sig) };
    }

    /// A backend's entry in `lb status`.
    pub fn backend(&self, service: &str, backend: &str) -> serde_json::Value {
        let s = self.status();
        s["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["name"] == service)
            .and_then(|x| {
                x["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|b| b["name"] == backend)
                    .cloned()
            })
            .unwrap_or_else(|| panic!("no backend {service}/{backend} in status: {s}"))
    }

    /// Polls `lb status` until `cond` holds for the backend, or panics after `within`.
    pub fn wait_backend(
        &self,
        service: &str,
        backend: &str,
        within: Duration,
        what: &str,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let b = self.backend(service, backend);
            if cond(&b) {
                return b;
            }
            if Instant::now() > deadline {
                panic!("{service}/{backend} never became {what} within {within:?}: {b}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the daemon with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl LbDaemon {
    /// The pin directory the daemon's config names (the demo's is not the
    /// one its socket's name would give, and that one, `/sys/fs/bpf/lb`, is
    /// a real daemon's default: never removed on a guess).
    fn pin_dir(&self) -> PathBuf {
        std::fs::read_to_string(&self.config)
            .ok()
            .and_then(|text| {
                lb_userspace::config::Config::parse(&self.config, &text, &|_| true).ok()
            })
            .map(|c| c.daemon.pin_dir)
            .unwrap_or_else(|| crate::topology::pin_dir_for(&self.socket))
    }
}

impl Drop for LbDaemon {
    fn drop(&mut self) {
        self.stop();
        // A daemon killed and not restarted leaves its pins: remove them
        // (bpffs is shared by every namespace; the test's must not linger).
        let _ = lb_userspace::dataplane::remove_pins(&self.pin_dir());
    }
}
