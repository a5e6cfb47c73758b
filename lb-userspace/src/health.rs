//! Health checkers. Each backend's checker is its own task on its own timer,
//! so a slow or hanging backend never delays another's checks. Checkers only
//! report: the reconciler decides what a result means and writes the maps.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::config::{HealthCheck, HealthKind};

/// The outcome of one check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckResult {
    pub ok: bool,
    /// Time to the answer (or to the failure, or the timeout).
    pub latency_us: u64,
    /// "HTTP 200", "connected", "timed out after 500 ms", "connection refused"...
    pub detail: String,
    /// When the check finished, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// A result on its way to the reconciler.
#[derive(Debug)]
pub struct Report {
    pub service: String,
    pub backend: String,
    /// Which checker sent it: a result from a checker that was since replaced
    /// (the backend's check or address changed) is ignored.
    pub checker: u64,
    pub result: CheckResult,
}

/// Starts checking `addr:port` with `check` every interval, first at once.
pub fn spawn(
    service: String,
    backend: String,
    addr: Ipv4Addr,
    port: u16,
    check: HealthCheck,
    checker: u64,
    to_reconciler: mpsc::Sender<Report>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let client = match check.kind {
            HealthKind::Http => match http_client(&check) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!(service = %service, backend = %backend, error = %e, "cannot build the HTTP client: not checking");
                    return;
                }
            },
            HealthKind::Tcp => None,
        };
        let target = SocketAddrV4::new(addr, port);
        let mut tick = tokio::time::interval(Duration::from_millis(check.interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = check_once(client.as_ref(), target, &check).await;
            let report = Report {
                service: service.clone(),
                backend: backend.clone(),
                checker,
                result,
            };
            if to_reconciler.send(report).await.is_err() {
                return;
            }
        }
    })
}

fn http_client(check: &HealthCheck) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(check.timeout_ms))
        // A new connection per check, as HAProxy's checks: a pooled connection
        // would hide a server that stopped accepting.
        .pool_max_idle_per_host(0)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("lb-health-check/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Runs one check now.
pub async fn check_once(
    client: Option<&reqwest::Client>,
    target: SocketAddrV4,
    check: &HealthCheck,
) -> CheckResult {
    let start = Instant::now();
    let timeout = Duration::from_millis(check.timeout_ms);
    let (ok, detail) = match (check.kind, client) {
        (HealthKind::Http, Some(client)) => {
            let url = format!("http://{target}{}", check.path);
            let mut req = client.get(&url);
            if let Some(host) = &check.host {
                req = req.header(reqwest::header::HOST, host);
            }
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    (status == check.expect_status, format!("HTTP {status}"))
                }
                Err(e) if e.is_timeout() => {
                    (false, format!("timed out after {} ms", check.timeout_ms))
                }
                Err(e) => (false, describe(&e)),
            }
        }
        _ => match tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect(SocketAddr::V4(target)),
        )
        .await
        {
            Ok(Ok(_)) => (true, "connected".to_owned()),
            Ok(Err(e)) => (false, e.to_string()),
            Err(_) => (false, format!("timed out after {} ms", check.timeout_ms)),
        },
    };
    CheckResult {
        ok,
        latency_us: start.elapsed().as_micros() as u64,
        detail,
        at_unix_ms: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}

/// The innermost cause of an HTTP client error ("Connection refused"), which
/// is what an operator needs, rather than reqwest's outer "error sending request".
fn describe(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A backend's health as rise/fall counting makes it (HAProxy's meaning).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    pub up: bool,
    /// Successes in a row (while down) or failures in a row (while up).
    pub streak: u32,
    pub last: Option<CheckResult>,
}

impl Default for Health {
    fn default() -> Self {
        Health::UNCHECKED
    }
}

impl Health {
    /// A backend is taken to be up until its checks say otherwise.
    pub const UNCHECKED: Health = Health {
        up: true,
        streak: 0,
        last: None,
    };

    /// Counts a result; returns true if the backend changed state.
    pub fn record(&mut self, result: CheckResult, rise: u32, fall: u32) -> bool {
        let ok = result.ok;
        self.last = Some(result);
        if ok == self.up {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(ok: bool) -> CheckResult {
        CheckResult {
            ok,
            latency_us: 1,
            detail: String::new(),
            at_unix_ms: 0,
        }
    }

    #[test]
    fn fall_failures_in_a_row_take_it_down_and_rise_successes_bring_it_back() {
        let mut h = Health::default();
        assert!(h.up);
        assert!(!h.record(r(false), 2, 3));
        assert!(!h.record(r(false), 2, 3));
        assert!(!h.record(r(true), 2, 3), "a success breaks the streak");
        assert!(!h.record(r(false), 2, 3));
        assert!(!h.record(r(false), 2, 3));
        assert!(h.record(r(false), 2, 3), "third failure in a row");
        assert!(!h.up);
        assert!(!h.record(r(true), 2, 3));
        assert!(!h.record(r(false), 2, 3));
        assert!(!h.record(r(true), 2, 3));
        assert!(h.record(r(true), 2, 3), "second success in a row");
        assert!(h.up);
    }
}
