//! Network namespaces: creation guards, commands inside them, and running a
//! closure on a thread that has entered one.

use std::{fs::File, os::fd::AsRawFd, process::Command};

use crate::{sh, try_sh};

/// A named network namespace, deleted (with everything in it) on drop.
pub struct Netns {
    pub name: String,
    /// Created (and so deleted on drop) by this guard.
    owned: bool,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        assert!(
            name.len() <= 15,
            "namespace name {name} too long for interface-style names"
        );
        // A namespace of this name left by a crashed earlier run is stale.
        let _ = try_sh("ip", &["netns", "del", name]);
        sh("ip", &["netns", "add", name]);
        let ns = Netns {
            name: name.to_owned(),
            owned: true,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A handle on an existing namespace that does not delete it on drop.
    pub fn attach(name: &str) -> Netns {
        Netns {
            name: name.to_owned(),
            owned: false,
        }
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// Runs a program inside the namespace and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut a = vec!["netns", "exec", self.name.as_str(), program];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// Like [`Netns::exec`], returning the error instead of panicking.
    pub fn try_exec(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let mut a = vec!["netns", "exec", self.name.as_str(), program];
        a.extend_from_slice(args);
        try_sh("ip", &a)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A `Command` that runs `program` in this network namespace but, unlike
    /// `ip netns exec`, in the caller's mount namespace: it sees the host's
    /// bpffs, so pins it makes outlive it (as a daemon's under systemd do).
    pub fn command_same_mounts(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        let path = format!("/var/run/netns/{}", self.name);
        let f = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        let mut c = Command::new(program);
        // SAFETY: the closure only calls setns(2), which is async-signal-safe;
        // `f` stays open in the parent until the child has exec'd.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]);
    }

    /// Runs `f` on a new thread that has entered this namespace (sockets it
    /// opens live there) and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Starts `f` on a thread inside this namespace and returns its handle.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name);
            f()
        })
    }
}

/// Moves the calling thread into the named namespace.
pub fn enter(name: &str) {
    let path = format!("/var/run/netns/{name}");
    let f = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: f is an open namespace file; setns only affects this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            let _ = try_sh("ip", &["netns", "del", &self.name]);
        }
    }
}

/// Creates a veth pair with one end in each namespace, both up, with the
/// settings `ip link` gives it (TX checksum offload on, GRO off): what users
/// have.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    sh(
        "ip",
        &[
            "link", "add", "name", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if,
            "netns", &b.name,
        ],
    );
    for (ns, i) in [(a, a_if), (b, b_if)] {
        ns.ip(&["link", "set", i, "up"]);
    }
}

impl Netns {
    /// The program the data path runs on `iface` here, as "xdp id N tag T" or
    /// "tc id N tag T" (the tag hashes the instructions, so another build
    /// shows another tag); None when neither an XDP program nor a TCX
    /// ingress program is attached.
    pub fn attached_program(&self, iface: &str) -> Option<String> {
        let out = self.ip(&["-d", "link", "show", "dev", iface]);
        let w: Vec<&str> = out.split_whitespace().collect();
        if let Some(i) = w.iter().position(|x| *x == "prog/xdp") {
            let tag = w
                .iter()
                .position(|x| *x == "tag")
                .map(|j| w[j + 1])
                .unwrap_or("?");
            return Some(format!("xdp id {} tag {tag}", w[i + 2]));
        }
        let iface = iface.to_owned();
        self.run(move || {
            use aya::programs::{SchedClassifier, TcAttachType};
            let (_, progs) = SchedClassifier::query_tcx(&iface, TcAttachType::Ingress)
                .unwrap_or_else(|e| panic!("querying TCX programs on {iface}: {e}"));
            progs.first().map(|p| {
                let tag: String = p
                    .tag()
                    .to_be_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!("tc id {} tag {tag}", p.id())
            })
        })
    }
}
