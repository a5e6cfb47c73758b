//! Real MariaDB servers in namespaces, with real GTID replication (see
//! `shared/mariadb-notes.md` for the facts this relies on).

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use crate::{netns::Netns, sh, try_sh, TempDir};

/// The monitoring user the balancer logs in as.
pub const MONITOR_USER: &str = "lbmonitor";
pub const MONITOR_PASSWORD: &str = "mon-secret-7";
/// The application's user: no privilege to write to a read-only server.
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-secret-3";
const REPL_PASSWORD: &str = "repl-secret-5";

pub struct MariaDb {
    pub name: String,
    pub addr: Ipv4Addr,
    pub server_id: u32,
    ns: String,
    child: Option<Child>,
    dir: TempDir,
}

impl MariaDb {
    /// Initialises a data directory and starts `mariadbd` in `ns` on
    /// `addr:3306`, read-only (a restarted server never comes back writable).
    pub fn start(ns: &Netns, name: &str, addr: Ipv4Addr, server_id: u32) -> MariaDb {
        let dir = TempDir::new(&format!("mariadb-{name}"));
        let d = dir.path().display().to_string();
        let cnf = format!(
            "[mariadbd]\nuser=mysql\ndatadir={d}/data\nsocket={d}/mysqld.sock\npid-file={d}/mysqld.pid\n\
             log-error={d}/error.log\nbind-address={addr}\nport=3306\nserver-id={server_id}\n\
             log-bin={name}-bin\nrelay-log={name}-relay\nlog-slave-updates=ON\ngtid-strict-mode=ON\n\
             read-only=ON\nskip-slave-start\nskip-name-resolve\ninnodb_buffer_pool_size=32M\n\
             performance_schema=OFF\ninnodb_flush_log_at_trx_commit=2\nsync_binlog=0\n"
        );
        std::fs::write(dir.path().join("my.cnf"), cnf).expect("writing my.cnf");
        sh("chown", &["-R", "mysql:mysql", &d]);
        sh(
            "mariadb-install-db",
            &[
                &format!("--defaults-file={d}/my.cnf"),
                "--skip-test-db",
                "--skip-name-resolve",
                "--auth-root-authentication-method=socket",
            ],
        );
        let mut db = MariaDb {
            name: name.to_owned(),
            addr,
            server_id,
            ns: ns.name.clone(),
            child: None,
            dir,
        };
        db.spawn();
        db
    }

    fn spawn(&mut self) {
        let d = self.dir.path().display().to_string();
        let child = Netns::attach(&self.ns)
            .command("mariadbd")
            .arg(format!("--defaults-file={d}/my.cnf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting mariadbd: {e} (is mariadb-server installed?)"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.try_sql("SELECT 1").is_err() {
            if Instant::now() > deadline {
                panic!("{} did not start:\n{}", self.name, self.error_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    /// Runs SQL as root over the server's socket; tab-separated rows.
    pub fn try_sql(&self, q: &str) -> Result<String, String> {
        let sock = self.socket();
        try_sh(
            "mariadb",
            &[
                "--no-defaults",
                "-S",
                sock.to_str().unwrap(),
                "-uroot",
                "-N",
                "-B",
                "-e",
                q,
            ],
        )
    }

    pub fn sql(&self, q: &str) -> String {
        self.try_sql(q)
            .unwrap_or_else(|e| panic!("{}: {q}: {e}", self.name))
    }

    /// Creates the users (the balancer's monitor with `monitor_password`) and
    /// the application's table (on the primary; a replica gets them through
    /// replication).
    pub fn create_users_and_schema(&self, monitor_password: &str) {
        self.sql(&format!(
            "CREATE USER '{MONITOR_USER}'@'%' IDENTIFIED BY '{monitor_password}';\
             GRANT REPLICA MONITOR ON *.* TO '{MONITOR_USER}'@'%';\
             CREATE USER 'repl'@'%' IDENTIFIED BY '{REPL_PASSWORD}';\
             GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%';\
             CREATE DATABASE appdb;\
             CREATE TABLE appdb.t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(64), server INT);\
             CREATE USER '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}';\
             GRANT ALL ON appdb.* TO '{APP_USER}'@'%';"
        ));
    }

    /// Makes this server writable: the primary.
    pub fn make_writable(&self) {
        self.sql("SET GLOBAL read_only = 0");
    }

    /// Makes this server replicate from `primary` (GTID, slave_pos).
    pub fn replicate_from(&self, primary: &MariaDb) {
        self.sql(&format!(
            "STOP SLAVE; CHANGE MASTER TO MASTER_HOST='{}', MASTER_USER='repl', \
             MASTER_PASSWORD='{REPL_PASSWORD}', MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1; \
             START SLAVE;",
            primary.addr
        ));
    }

    /// Waits until this replica has applied everything `primary` has logged.
    pub fn catch_up(&self, primary: &MariaDb) {
        let pos = primary
            .sql("SELECT @@GLOBAL.gtid_binlog_pos")
            .trim()
            .to_owned();
        let r = self.sql(&format!("SELECT MASTER_GTID_WAIT('{pos}', 10)"));
        assert_eq!(r.trim(), "0", "{} did not catch up with {pos}", self.name);
    }

    /// Planned switchover (mariadb-notes.md): `old` goes read-only, this
    /// replica catches up and becomes the writable primary, `old` replicates
    /// from it. Returns the instants `old` went read-only and this one writable.
    pub fn take_over_from(&self, old: &MariaDb) -> (Instant, Instant) {
        old.sql("SET GLOBAL read_only = 1");
        let demoted = Instant::now();
        self.catch_up(old);
        self.sql("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0");
        let promoted = Instant::now();
        old.sql("SET GLOBAL gtid_slave_pos = @@GLOBAL.gtid_binlog_pos");
        old.replicate_from(self);
        (demoted, promoted)
    }

    /// Promotes this replica after its primary died.
    pub fn promote(&self) -> Instant {
        self.sql("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0");
        Instant::now()
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `mariadb` client run in `ns` against `host:port` as the application's user.
/// Returns its output, or the error it printed.
pub fn client(ns: &Netns, host: Ipv4Addr, port: u16, q: &str) -> Result<String, String> {
    ns.try_exec(
        "mariadb",
        &[
            "--no-defaults",
            "-h",
            &host.to_string(),
            "-P",
            &port.to_string(),
            "-u",
            APP_USER,
            &format!("-p{APP_PASSWORD}"),
            "--connect-timeout=3",
            "-N",
            "-B",
            "-e",
            q,
        ],
    )
    .map(|s| s.trim().to_owned())
}

/// One MySQL connection held open from a namespace (a pooled application
/// connection): queries go over the same TCP flow until it breaks.
pub struct Session {
    tx: std::sync::mpsc::Sender<(String, std::sync::mpsc::Sender<Result<String, String>>)>,
}

impl Session {
    /// Connects from `ns` to `host:port` as the application's user.
    pub fn open(ns: &Netns, host: Ipv4Addr, port: u16) -> Result<Session, String> {
        use mysql_async::prelude::Queryable;
        type Job = (String, std::sync::mpsc::Sender<Result<String, String>>);
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let opts = mysql_async::OptsBuilder::default()
                    .ip_or_hostname(host.to_string())
                    .tcp_port(port)
                    .user(Some(APP_USER))
                    .pass(Some(APP_PASSWORD))
                    .prefer_socket(false);
                let mut conn = match mysql_async::Conn::new(opts).await {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                while let Ok((q, reply)) = rx.recv() {
                    let r =
                        tokio::time::timeout(Duration::from_secs(5), conn.query::<String, _>(q))
                            .await
                            .map_err(|_| "timed out".to_owned())
                            .and_then(|r| r.map_err(|e| e.to_string()))
                            .map(|rows| rows.join("\n"));
                    let _ = reply.send(r);
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| e.to_string())??;
        Ok(Session { tx })
    }

    /// Runs a query whose rows are single strings; their lines joined.
    pub fn query(&self, q: &str) -> Result<String, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .send((q.to_owned(), tx))
            .map_err(|e| e.to_string())?;
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|e| e.to_string())?
    }
}
