//! `lb run`: load, write the maps, attach, serve the control socket, and on
//! SIGINT/SIGTERM detach everything it attached.
//!
//! One task owns the [`Balancer`] (and through it the maps); the control
//! socket and the health checkers talk to it by message.

use anyhow::{bail, Context, Result};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    config::Config,
    control::{self, Envelope, Request, Response},
    dataplane::Dataplane,
    health, mysql,
    reconcile::{self, Balancer},
};

/// Checks what the kernel must provide before anything is loaded: the route
/// lookup the data path makes is a forwarding lookup, which the kernel refuses
/// on interfaces with IPv4 forwarding off.
pub fn preflight(cfg: &Config) -> Result<()> {
    for iface in &cfg.daemon.interfaces {
        let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
        let v = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        if v.trim() != "1" {
            bail!(
                "IPv4 forwarding is off on {iface}: the XDP forwarder needs it for its route \
                 lookups. Enable it with `sysctl -w net.ipv4.conf.{iface}.forwarding=1` \
                 (netfilter can still drop what the kernel itself would forward)"
            );
        }
    }
    Ok(())
}

/// Moves the calling thread into network namespace `name` (/run/netns/NAME)
/// and nothing else: the mount namespace, and with it the host's bpffs,
/// stay as they are. Call it while the process has one thread.
pub fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let path = std::path::Path::new("/run/netns").join(name);
    let f = std::fs::File::open(&path).with_context(|| {
        format!(
            "entering network namespace {name}: opening {}",
            path.display()
        )
    })?;
    // SAFETY: f is an open namespace file; setns only changes this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "entering network namespace {name}: {}",
            std::io::Error::last_os_error()
        );
    }
    tracing::info!(netns = name, "running in network namespace {name}");
    Ok(())
}

/// Runs the daemon until SIGINT, SIGTERM or `lb stop`; SIGHUP reloads the
/// config file. Maps and links are pinned: state an earlier daemon left is
/// adopted unless `fresh`.
pub async fn run(cfg: Config, fresh: bool) -> Result<()> {
    // Before anything is read, written or removed: one daemon per state.
    let _lock = crate::lock::take(&cfg.daemon.pin_dir, &cfg.daemon.control_socket)?;
    preflight(&cfg)?;
    let pin_dir = cfg.daemon.pin_dir.clone();
    let (dp, adopted) = Dataplane::load_pinned(
        &pin_dir,
        fresh,
        cfg.daemon.conntrack_size,
        cfg.daemon.transient_size,
    )
    .context("loading the data path")?;
    let kept = crate::dataplane::persistence(&pin_dir);
    if kept.survives_restart == Some(false) {
        tracing::warn!(why = %kept.why, "the data path will not survive a restart of this daemon");
    }
    if adopted {
        tracing::info!(pins = %pin_dir.display(), "adopted the pinned maps and links of an earlier daemon: established flows continue");
    }
    let (report_tx, mut reports) = mpsc::channel::<health::Report>(1024);
    let socket = cfg.daemon.control_socket.clone();
    let interfaces = cfg.daemon.interfaces.clone();
    let daemon_cfg = cfg.daemon.clone();
    // Maps first, then attach: the first packet already sees every service.
    let (mysql_tx, mut mysql_reports) = mpsc::channel::<mysql::Report>(1024);
    let first_look = first_mysql_look(&cfg).await;
    let mut lb = Balancer::new(cfg, dp, report_tx, mysql_tx, first_look)
        .context("writing the service maps")?;
    for iface in &interfaces {
        let a = lb
            .attach(iface, daemon_cfg.hook_for(iface))
            .with_context(|| format!("attaching to {iface}"))?;
        tracing::info!(iface = %iface, hook = a.hook, reason = %a.reason, adopted = a.adopted, "attached");
    }
    lb.drop_stale_links(&interfaces);
    let _logger = start_program_logs(&mut lb);
    // Backends' next hops, kept current from the kernel's tables: until the
    // first answer (and whenever it fails) the data path asks the FIB itself.
    let (hop_tx, mut hop_events) = mpsc::unbounded_channel();
    let _nexthops = match crate::nexthop::spawn(
        lb.hop_targets(),
        interfaces.clone(),
        daemon_cfg.manage_neighbours,
        hop_tx,
    ) {
        Ok(task) => Some(AbortOnDrop(task)),
        Err(e) => {
            tracing::warn!(error = %crate::error::Chain(&e), "cannot watch the kernel's routes and neighbours: every packet's next hop is looked up in the FIB");
            None
        }
    };

    let (tx, mut requests) = mpsc::channel::<Envelope>(64);
    let metrics_listen = lb.config_file().daemon.metrics_listen;
    let _web = match metrics_listen {
        Some(addr) => {
            let task = crate::web::serve(addr, tx.clone()).await.with_context(|| {
                format!("listening for metrics on {addr} ([daemon] metrics_listen)")
            })?;
            tracing::info!(%addr, "metrics and status page listening");
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    let _control = control::serve(&socket, tx)?;
    tracing::info!(socket = %socket.display(), "running");
    // Under systemd (Type=notify): ready once attached and answering.
    notify("READY=1\nSTATUS=attached and balancing");

    // Idle UDP flows are over in the data path at once; their entries are
    // reclaimed by a sweep of the table, off the loop, every SWEEP.
    // One sweep at a time, and no sooner than ten times the last one took
    // after it (a walk of a big table is seconds of a core).
    let (swept_tx, mut swept) = mpsc::channel(1);
    let mut sweep = tokio::time::interval(UDP_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeping: Option<std::time::Instant> = None;
    let mut next_sweep = std::time::Instant::now();
    let mut sample = tokio::time::interval(reconcile::SAMPLE_EVERY);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let keep = loop {
        tokio::select! {
            _ = term.recv() => break false,
            _ = int.recv() => break false,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config file");
                if let Response::Error(e) = lb.control(Request::Reload) {
                    tracing::error!(error = %e, "reload rejected; the running configuration stays");
                }
            }
            Some((req, reply)) = requests.recv() => {
                if let Request::Stop { keep_datapath } = req {
                    let msg = if keep_datapath {
                        "stopping; the data path keeps forwarding and the next `lb run` adopts it"
                    } else {
                        "stopping; detaching XDP and removing the pins"
                    };
                    let _ = reply.send(Response::Ok(serde_json::json!({ "message": msg })));
                    break keep_datapath;
                }
                if matches!(req, Request::Census) {
                    // The census walks the whole connection table: off the
                    // loop, so it never delays a failover.
                    match lb.flow_query() {
                        Ok(q) => {
                            tokio::task::spawn_blocking(move || {
                                let _ = reply.send(q.answer());
                            });
                        }
                        Err(e) => {
                            let _ = reply.send(Response::Error(reconcile::message(&e)));
                        }
                    }
                    continue;
                }
                let _ = reply.send(lb.control(req));
            }
            Some(report) = reports.recv() => lb.on_report(report),
            Some(report) = mysql_reports.recv() => lb.on_mysql_report(report),
            Some(e) = hop_events.recv() => lb.on_next_hops(e),
            _ = sample.tick() => lb.sample(),
            _ = sweep.tick() => {
                if sweeping.is_none() && std::time::Instant::now() >= next_sweep {
                    if let Some(job) = lb.udp_sweep() {
                        sweeping = Some(std::time::Instant::now());
                        let tx = swept_tx.clone();
                        tokio::task::spawn_blocking(move || {
                            let _ = tx.blocking_send(job.run());
                        });
                    }
                }
            }
            Some(done) = swept.recv() => {
                if let Some(started) = sweeping.take() {
                    next_sweep = std::time::Instant::now() + started.elapsed() * 10;
                }
                lb.on_udp_sweep(done);
            }
        }
    };
    notify("STOPPING=1");
    if keep {
        tracing::info!(pins = %pin_dir.display(), "stopping: the data path stays attached and pinned");
    } else {
        tracing::info!("stopping: detaching the data path and removing the pins");
    }
    lb.shutdown(keep);
    // Let the connection task of an `lb stop` finish writing its answer
    // before the runtime (and with it that task) goes away.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    Ok(())
}

/// How often the connection table is swept for idle UDP flows.
const UDP_SWEEP: std::time::Duration = std::time::Duration::from_secs(10);

/// Aborts a task when dropped (the daemon's listeners end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One observation of every server of every MySQL-steered service, all at
/// once (each bounded by its timeout), so the first maps written already send
/// writes to the primary instead of refusing them until the monitors report.
async fn first_mysql_look(cfg: &Config) -> reconcile::FirstLook {
    let mut set = tokio::task::JoinSet::new();
    for s in &cfg.services {
        let Some(m) = s.steering.mysql() else {
            continue;
        };
        for b in &s.backends {
            let (key, addr, port, m) = (
                (s.name.clone(), b.name.clone()),
                b.address,
                b.port,
                m.clone(),
            );
            set.spawn(async move { (key, mysql::observe_once(addr, port, &m).await) });
        }
    }
    let mut out = reconcile::FirstLook::new();
    while let Some(r) = set.join_next().await {
        if let Ok((k, o)) = r {
            out.insert(k, o);
        }
    }
    out
}

/// Forwards the program's aya-log lines to tracing, if it was built with them
/// (the `verbose-logs` feature of lb-ebpf); otherwise there is nothing to read.
fn start_program_logs(lb: &mut Balancer) -> Option<tokio::task::JoinHandle<()>> {
    let logger = match lb.program_logger() {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "the XDP program logs nothing (built without verbose-logs)");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd, and the AsyncFd owns the
    // logger, so the fd stays open for as long as it is registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot poll the XDP program's log buffer");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// Tells the service manager `state` (sd_notify's protocol: a datagram to
/// the socket `$NOTIFY_SOCKET` names); nothing when no manager asked.
fn notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let addr = match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    let sent = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| addr.and_then(|a| s.send_to_addr(state.as_bytes(), &a)));
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}
