//! Prometheus metrics, rendered at scrape time from the data path's per-CPU
//! maps (nothing is added to the packet path) and the reconciler's state.
//!
//! Counters come straight from pinned maps, so they are monotonic across
//! daemon restarts that adopt the maps. Names follow Prometheus conventions:
//! `_total` for counters, base units (`_bytes`, `_seconds`).

use crate::reconcile::{BackendState, MysqlRole, Status};
use lb_common::counter::Kind;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// What outlives one scrape: the health-check latency histograms.
#[derive(Clone)]
pub struct Metrics {
    check_latency: HistogramVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let check_latency = HistogramVec::new(
            HistogramOpts::new(
                "lb_health_check_duration_seconds",
                "Time each health check took, to its answer, failure or timeout.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["service", "backend", "result"],
        )
        .expect("valid histogram options");
        Metrics { check_latency }
    }

    /// Records one health check.
    pub fn observe_check(&self, service: &str, backend: &str, ok: bool, latency_us: u64) {
        self.check_latency
            .with_label_values(&[service, backend, if ok { "ok" } else { "failed" }])
            .observe(latency_us as f64 / 1e6);
    }

    /// The text exposition of everything, from `status` (what `lb status
    /// --json` shows).
    pub fn render(&self, status: &Status) -> String {
        let r = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        r.register(Box::new(self.check_latency.clone()))
            .expect("unique metric");

        let svc_packets = counter(
            "lb_service_packets_total",
            "Packets of a service's flows, by direction (to_backend: client to backend; to_client: replies).",
            &["service", "direction"],
        );
        let svc_bytes = counter(
            "lb_service_bytes_total",
            "Bytes (whole frames) of a service's flows, by direction.",
            &["service", "direction"],
        );
        let svc_flows = counter(
            "lb_service_flows_total",
            "Flows a service scheduled.",
            &["service"],
        );
        let be_packets = counter(
            "lb_backend_packets_total",
            "Packets of a backend's flows, by direction.",
            &["service", "backend", "direction"],
        );
        let be_bytes = counter(
            "lb_backend_bytes_total",
            "Bytes (whole frames) of a backend's flows, by direction.",
            &["service", "backend", "direction"],
        );
        let be_flows = counter(
            "lb_backend_flows_total",
            "Flows scheduled to a backend.",
            &["service", "backend"],
        );
        let be_active = gauge(
            "lb_backend_active_flows",
            "A backend's flows in the connection table that have not closed and are not idle.",
            &["service", "backend"],
        );
        let be_state = gauge(
            "lb_backend_state",
            "1 for the backend's current state (up, down, draining, disabled), 0 for the others.",
            &["service", "backend", "state"],
        );
        let be_up = gauge(
            "lb_backend_up",
            "1 if the backend's health checks say up (always 1 without checks).",
            &["service", "backend"],
        );
        let be_weight = gauge(
            "lb_backend_weight",
            "The backend's weight.",
            &["service", "backend"],
        );
        let mysql_role = gauge(
            "lb_mysql_role",
            "1 for the MySQL server's current role (primary, replica, writable, read-only, unreachable).",
            &["service", "backend", "role"],
        );
        let mysql_ro = gauge(
            "lb_mysql_read_only",
            "1 if the MySQL server is read-only.",
            &["service", "backend"],
        );
        let mysql_lag = gauge(
            "lb_mysql_replication_lag_seconds",
            "Replication lag of a MySQL replica (absent when unknown).",
            &["service", "backend"],
        );
        let mysql_alarm = gauge(
            "lb_mysql_alarm",
            "1 while the MySQL service is in an alarm state (no primary, two writable servers).",
            &["service"],
        );
        let packets = counter(
            "lb_packets_total",
            "Every packet the XDP program saw, by what it did (forward, pass, drop, reset) and why.",
            &["action", "reason"],
        );
        let flows = counter(
            "lb_flows_total",
            "Flows scheduled (kind=scheduled), of those the ones Maglev placed mid-flow (kind=recovered); TCP flows whose handshake completed (kind=established) and flows that ended (kind=closed).",
            &["kind"],
        );
        let ct = gauge(
            "lb_conntrack_entries",
            "Established flows in the connection table (counted by the data path as flows enter and leave it; half-open and closed flows wait apart).",
            &[],
        );
        let hop_lookups = counter(
            "lb_next_hop_lookups_total",
            "Packets whose next hop was not cached (or stale) and was looked up in the kernel's FIB.",
            &[],
        );
        let pressure = counter(
            "lb_conntrack_pressure_events_total",
            "Times the connection table filled past 90% of its capacity (at 100% established flows are evicted).",
            &[],
        );
        let ct_cap = gauge(
            "lb_conntrack_capacity",
            "Size of the connection table.",
            &[],
        );
        let xdp = gauge(
            "lb_xdp_attached",
            "1 per interface the data path runs on, with its hook (xdp, xdp-generic or tc), mode (its older name: native, generic or tc) and why that hook.",
            &["interface", "hook", "mode", "reason"],
        );

        for svc in &status.services {
            let name = svc.name.as_str();
            let t = &svc.traffic;
            svc_packets
                .with_label_values(&[name, "to_backend"])
                .inc_by(t.packets);
            svc_packets
                .with_label_values(&[name, "to_client"])
                .inc_by(t.reply_packets);
            svc_bytes
                .with_label_values(&[name, "to_backend"])
                .inc_by(t.bytes);
            svc_bytes
                .with_label_values(&[name, "to_client"])
                .inc_by(t.reply_bytes);
            svc_flows.with_label_values(&[name]).inc_by(t.new_flows);
            if let Some(m) = &svc.mysql {
                mysql_alarm
                    .with_label_values(&[name])
                    .set(m.alarm.is_some() as i64);
            }
            for b in &svc.backends {
                let l = [name, b.name.as_str()];
                let t = &b.traffic;
                be_packets
                    .with_label_values(&[l[0], l[1], "to_backend"])
                    .inc_by(t.packets);
                be_packets
                    .with_label_values(&[l[0], l[1], "to_client"])
                    .inc_by(t.reply_packets);
                be_bytes
                    .with_label_values(&[l[0], l[1], "to_backend"])
                    .inc_by(t.bytes);
                be_bytes
                    .with_label_values(&[l[0], l[1], "to_client"])
                    .inc_by(t.reply_bytes);
                be_flows.with_label_values(&l).inc_by(t.new_flows);
                be_active.with_label_values(&l).set(b.active_flows as i64);
                be_weight.with_label_values(&l).set(b.weight as i64);
                for st in BackendState::ALL {
                    be_state
                        .with_label_values(&[l[0], l[1], st.name()])
                        .set((st == b.state) as i64);
                }
                let up = b.health.as_ref().is_none_or(|h| h.up);
                be_up.with_label_values(&l).set(up as i64);
                if let Some(m) = &b.mysql {
                    for r in MysqlRole::ALL {
                        mysql_role
                            .with_label_values(&[l[0], l[1], r.name()])
                            .set((r == m.role) as i64);
                    }
                    mysql_ro
                        .with_label_values(&l)
                        .set(m.observation.read_only as i64);
                    if let Some(lag) = m.observation.lag_s {
                        mysql_lag.with_label_values(&l).set(lag as i64);
                    }
                }
            }
        }
        for (name, &v) in &status.counters {
            let Some(d) = lb_common::counter::by_name(name) else {
                continue;
            };
            match d.kind {
                Kind::Outcome { action, reason } => packets
                    .with_label_values(&[action.name(), reason])
                    .inc_by(v),
                Kind::Flows(kind) => flows.with_label_values(&[kind]).inc_by(v),
                Kind::NextHopLookups => hop_lookups.with_label_values::<&str>(&[]).inc_by(v),
            }
        }
        let table = &status.conntrack;
        ct.with_label_values::<&str>(&[]).set(table.entries as i64);
        ct_cap
            .with_label_values::<&str>(&[])
            .set(table.capacity as i64);
        pressure
            .with_label_values::<&str>(&[])
            .inc_by(table.pressure_events);
        for a in &status.attachments {
            xdp.with_label_values(&[&a.interface, &a.hook, &a.mode, &a.reason])
                .set(1);
        }

        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&r.gather(), &mut out)
            .expect("text encoding into memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
