//! MySQL/MariaDB monitors: one task per server of a steered service, each on
//! its own timer, logged in as the monitoring user (password from a file, never
//! logged). They observe `read_only` and the replication status and report; the
//! reconciler decides roles (see `steer`).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant, SystemTime},
};

use mysql_async::{prelude::Queryable, Conn, OptsBuilder, Row};
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::config::MysqlMonitor;

/// What one look at a server saw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Observation {
    pub reachable: bool,
    /// `@@global.read_only` (or `super_read_only` where it exists) is on.
    pub read_only: bool,
    /// It replicates from another server (an I/O or SQL thread is running or
    /// connecting).
    pub replicating: bool,
    /// Replication I/O and SQL thread states, as the server reports them.
    pub io_running: Option<String>,
    pub sql_running: Option<String>,
    /// `Seconds_Behind_Master`; None when unknown (NULL: the SQL thread stopped).
    pub lag_s: Option<u64>,
    /// The server it replicates from.
    pub source: Option<String>,
    /// Why it is unreachable, if it is.
    pub error: Option<String>,
    pub latency_us: u64,
    pub at_unix_ms: u64,
}

/// An observation on its way to the reconciler.
#[derive(Debug)]
pub struct Report {
    pub service: String,
    pub backend: String,
    pub monitor: u64,
    pub observation: Observation,
}

fn opts(addr: Ipv4Addr, port: u16, cfg: &MysqlMonitor) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname(addr.to_string())
        .tcp_port(port)
        .user(Some(cfg.user.clone()))
        .pass(Some(cfg.password.0.clone()))
        .prefer_socket(false)
        .stmt_cache_size(0)
}

/// One observation on a new connection, within the timeout: what the daemon
/// learns before it writes a steered service's first ring.
pub async fn observe_once(addr: Ipv4Addr, port: u16, cfg: &MysqlMonitor) -> Observation {
    let start = Instant::now();
    let o = opts(addr, port, cfg);
    let r = tokio::time::timeout(Duration::from_millis(cfg.timeout_ms), async {
        let mut c = Conn::new(o).await?;
        let obs = observe(&mut c).await;
        let _ = c.disconnect().await;
        obs
    })
    .await;
    let mut obs = match r {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => unreachable(e.to_string()),
        Err(_) => unreachable(format!("timed out after {} ms", cfg.timeout_ms)),
    };
    obs.latency_us = start.elapsed().as_micros() as u64;
    obs.at_unix_ms = now_ms();
    obs
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts watching `addr:port` every `cfg.interval_ms`, first at once.
pub fn spawn(
    service: String,
    backend: String,
    addr: Ipv4Addr,
    port: u16,
    cfg: MysqlMonitor,
    monitor: u64,
    to_reconciler: mpsc::Sender<Report>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let opts = opts(addr, port, &cfg);
        let mut conn: Option<Conn> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let start = Instant::now();
            let timeout = Duration::from_millis(cfg.timeout_ms);
            let result = tokio::time::timeout(timeout, async {
                if conn.is_none() {
                    conn = Some(Conn::new(opts.clone()).await?);
                }
                observe(conn.as_mut().expect("just connected")).await
            })
            .await;
            let mut obs = match result {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => {
                    conn = None;
                    unreachable(e.to_string())
                }
                Err(_) => {
                    conn = None;
                    unreachable(format!("timed out after {} ms", cfg.timeout_ms))
                }
            };
            obs.latency_us = start.elapsed().as_micros() as u64;
            obs.at_unix_ms = now_ms();
            let report = Report {
                service: service.clone(),
                backend: backend.clone(),
                monitor,
                observation: obs,
            };
            if to_reconciler.send(report).await.is_err() {
                return;
            }
        }
    })
}

fn unreachable(error: String) -> Observation {
    Observation {
        reachable: false,
        read_only: false,
        replicating: false,
        io_running: None,
        sql_running: None,
        lag_s: None,
        source: None,
        error: Some(error),
        latency_us: 0,
        at_unix_ms: 0,
    }
}

/// One look: read-only flags and replication status.
async fn observe(conn: &mut Conn) -> mysql_async::Result<Observation> {
    let flags: Vec<(String, String)> = conn
        .query("SHOW GLOBAL VARIABLES WHERE Variable_name IN ('read_only', 'super_read_only')")
        .await?;
    let read_only = flags
        .iter()
        .any(|(_, v)| v.eq_ignore_ascii_case("ON") || v == "1");
    // MariaDB 10.5+ and MySQL 8.0.22+ know the new statement; older ones the old.
    let rows: Vec<Row> = match conn.query("SHOW REPLICA STATUS").await {
        Ok(r) => r,
        Err(mysql_async::Error::Server(_)) => conn.query("SHOW SLAVE STATUS").await?,
        Err(e) => return Err(e),
    };
    let mut obs = Observation {
        reachable: true,
        read_only,
        replicating: false,
        io_running: None,
        sql_running: None,
        lag_s: None,
        source: None,
        error: None,
        latency_us: 0,
        at_unix_ms: 0,
    };
    if let Some(row) = rows.first() {
        // Column names differ between MariaDB (Slave_*, Master_*) and MySQL 8 (Replica_*, Source_*).
        let text = |names: &[&str]| -> Option<String> {
            names
                .iter()
                .find_map(|n| row.get_opt::<Option<String>, _>(*n).and_then(|r| r.ok()))
                .flatten()
        };
        obs.io_running = text(&["Slave_IO_Running", "Replica_IO_Running"]);
        obs.sql_running = text(&["Slave_SQL_Running", "Replica_SQL_Running"]);
        obs.source = text(&["Master_Host", "Source_Host"]);
        obs.lag_s =
            text(&["Seconds_Behind_Master", "Seconds_Behind_Source"]).and_then(|s| s.parse().ok());
        let running = |s: &Option<String>| {
            s.as_deref().is_some_and(|v| {
                v.eq_ignore_ascii_case("Yes") || v.eq_ignore_ascii_case("Connecting")
            })
        };
        obs.replicating = running(&obs.io_running) || running(&obs.sql_running);
    }
    Ok(obs)
}

/// Roles in a steered service, decided from the latest observations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Roles {
    /// The current primary (backend name).
    pub primary: Option<String>,
    /// An ambiguous or bad state an operator must see (two writable servers,
    /// no primary), also logged when it starts.
    pub alarm: Option<String>,
}

/// Decides the primary: reachable, writable and not replicating from another
/// server. The current primary stays while it qualifies, whatever else does
/// (no flip-flop); otherwise the first qualifying server in config order takes
/// over. `observed` lists (name, latest observation) in config order; nothing
/// is decided until every server has been observed once.
pub fn decide(current: &Roles, observed: &[(&str, Option<&Observation>)]) -> Roles {
    if observed.iter().any(|(_, o)| o.is_none()) {
        return current.clone();
    }
    let candidates: Vec<&str> = observed
        .iter()
        .filter(|(_, o)| o.is_some_and(|o| o.reachable && !o.read_only && !o.replicating))
        .map(|(n, _)| *n)
        .collect();
    let primary = match &current.primary {
        Some(p) if candidates.contains(&p.as_str()) => Some(p.clone()),
        _ => candidates.first().map(|c| c.to_string()),
    };
    let alarm = match (&primary, candidates.len()) {
        (None, _) => Some("no primary: no server is reachable, writable and not replicating; new write connections are refused".to_owned()),
        (Some(p), n) if n > 1 => Some(format!(
            "{n} writable servers ({}); writes stay on {p}",
            candidates.join(", ")
        )),
        _ => None,
    };
    Roles { primary, alarm }
}

/// A replica fit for reads: reachable, read-only, replicating and within the
/// lag limit (an unknown lag counts as too much).
pub fn fit_replica(o: &Observation, max_lag_s: u64) -> bool {
    o.reachable && o.read_only && o.replicating && o.lag_s.is_some_and(|l| l <= max_lag_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(reachable: bool, read_only: bool, replicating: bool, lag: Option<u64>) -> Observation {
        Observation {
            reachable,
            read_only,
            replicating,
            io_running: None,
            sql_running: None,
            lag_s: lag,
            source: None,
            error: None,
            latency_us: 0,
            at_unix_ms: 0,
        }
    }

    #[test]
    fn the_writable_non_replicating_server_is_primary() {
        let p = obs(true, false, false, None);
        let r = obs(true, true, true, Some(0));
        let roles = decide(&Roles::default(), &[("db1", Some(&p)), ("db2", Some(&r))]);
        assert_eq!(roles.primary.as_deref(), Some("db1"));
        assert!(roles.alarm.is_none());
    }

    #[test]
    fn nothing_is_decided_before_every_server_was_seen() {
        let p = obs(true, false, false, None);
        let roles = decide(&Roles::default(), &[("db1", Some(&p)), ("db2", None)]);
        assert_eq!(roles, Roles::default());
    }

    #[test]
    fn two_writable_servers_keep_the_current_primary_and_alarm() {
        let w = obs(true, false, false, None);
        let cur = Roles {
            primary: Some("db2".into()),
            alarm: None,
        };
        let roles = decide(&cur, &[("db1", Some(&w)), ("db2", Some(&w))]);
        assert_eq!(
            roles.primary.as_deref(),
            Some("db2"),
            "no flip-flop to config order"
        );
        assert!(roles.alarm.unwrap().contains("2 writable servers"));
    }

    #[test]
    fn a_read_only_or_dead_primary_is_replaced_or_leaves_none() {
        let cur = Roles {
            primary: Some("db1".into()),
            alarm: None,
        };
        let ro = obs(true, true, false, None);
        let dead = obs(false, false, false, None);
        let repl = obs(true, true, true, Some(0));
        let promoted = obs(true, false, false, None);
        let none = decide(&cur, &[("db1", Some(&ro)), ("db2", Some(&repl))]);
        assert_eq!(none.primary, None);
        assert!(none.alarm.unwrap().starts_with("no primary"));
        let next = decide(&cur, &[("db1", Some(&dead)), ("db2", Some(&promoted))]);
        assert_eq!(next.primary.as_deref(), Some("db2"));
    }

    #[test]
    fn replicas_fit_for_reads_are_within_the_lag_limit() {
        assert!(fit_replica(&obs(true, true, true, Some(5)), 5));
        assert!(!fit_replica(&obs(true, true, true, Some(6)), 5));
        assert!(
            !fit_replica(&obs(true, true, true, None), 5),
            "NULL lag counts as lagging"
        );
        assert!(
            !fit_replica(&obs(true, false, false, None), 5),
            "a primary is not a replica"
        );
    }
}
