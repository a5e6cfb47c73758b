//! A real nginx in a namespace that answers every request with its own name.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use crate::{netns::Netns, TempDir};

pub struct Nginx {
    pub name: String,
    child: Child,
    dir: TempDir,
    ns: String,
    target: SocketAddrV4,
}

impl Nginx {
    /// Starts nginx in `ns` listening on `addr:port`, answering "`name`\n".
    pub fn start(ns: &Netns, name: &str, addr: Ipv4Addr, port: u16) -> Nginx {
        Nginx::start_with_status(ns, name, addr, port, 200)
    }

    /// Like [`Nginx::start`], answering every request with HTTP `status`.
    pub fn start_with_status(
        ns: &Netns,
        name: &str,
        addr: Ipv4Addr,
        port: u16,
        status: u16,
    ) -> Nginx {
        let server = format!(
            "server {{\n    listen {addr}:{port} reuseport;\n\
             location / {{ default_type text/plain; return {status} \"{name}\\n\"; }}\n  }}"
        );
        Nginx::start_with_servers(ns, name, SocketAddrV4::new(addr, port), &server)
    }

    /// Starts nginx in `ns` with these `server { }` blocks; `target` is where
    /// it is ready once it accepts connections.
    pub fn start_with_servers(
        ns: &Netns,
        name: &str,
        target: SocketAddrV4,
        servers: &str,
    ) -> Nginx {
        let dir = TempDir::new(&format!("nginx-{name}"));
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
               proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               keepalive_requests 100000;\n  {servers}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("writing nginx.conf");
        let child = spawn(ns, &dir);
        let n = Nginx {
            name: name.to_owned(),
            child,
            dir,
            ns: ns.name.clone(),
            target,
        };
        n.wait_listening(ns);
        n
    }

    /// Starts it again after [`Nginx::stop`], with the same config and logs.
    pub fn restart(&mut self, ns: &Netns) {
        assert_eq!(ns.name, self.ns, "restart in the namespace it ran in");
        self.child = spawn(ns, &self.dir);
        self.wait_listening(ns);
    }

    fn wait_listening(&self, ns: &Netns) {
        let target = self.target;
        let log = self.dir.path().join("error.log");
        ns.run(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect_timeout(&target.into(), Duration::from_millis(200)).is_err() {
                if Instant::now() > deadline {
                    panic!(
                        "nginx did not start listening on {target}:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }

    /// Requests this nginx has logged so far.
    pub fn requests(&self) -> usize {
        std::fs::read_to_string(self.access_log())
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    pub fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// Stops nginx now (fast shutdown), as a crashed server would go away.
    pub fn stop(&mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn spawn(ns: &Netns, dir: &TempDir) -> Child {
    let d = dir.path().display();
    ns.command("nginx")
        .args([
            "-e",
            &format!("{d}/error.log"),
            "-c",
            &format!("{d}/nginx.conf"),
        ])
        .spawn()
        .unwrap_or_else(|e| panic!("starting nginx in {}: {e} (is nginx installed?)", ns.name))
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
