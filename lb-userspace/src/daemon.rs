//! `lb run`: load, write the maps, attach, serve the control socket, and on
//! SIGINT/SIGTERM detach everything it attached.
//!
//! One task owns the [`Dataplane`]; everything else talks to it by message.

use anyhow::{bail, Context, Result};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    config::Config,
    control::{self, Envelope, Request, Response},
    dataplane::Dataplane,
    neigh,
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

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<()> {
    preflight(&cfg)?;
    let mut dp = Dataplane::load().context("loading the data path")?;
    // Maps first, then attach: the first packet already sees every service.
    dp.apply(&cfg.services)
        .context("writing the service maps")?;
    for iface in &cfg.daemon.interfaces {
        let mode = dp
            .attach(iface, cfg.daemon.xdp_mode)
            .with_context(|| format!("attaching to {iface}"))?;
        tracing::info!(iface = %iface, mode, "XDP attached");
    }
    if cfg.daemon.manage_neighbours {
        for s in &cfg.services {
            for b in &s.backends {
                match neigh::ensure_managed(b.address) {
                    Ok((hop, dev)) => {
                        tracing::debug!(service = %s.name, backend = %b.name, next_hop = %hop, dev = %dev, "neighbour managed")
                    }
                    Err(e) => {
                        tracing::warn!(service = %s.name, backend = %b.name, error = %e, "cannot keep the backend's next hop resolved")
                    }
                }
            }
        }
    }
    let _logger = start_program_logs(&mut dp);

    let (tx, mut rx) = mpsc::channel::<Envelope>(64);
    let _control = control::serve(&cfg.daemon.control_socket, tx)?;
    tracing::info!(socket = %cfg.daemon.control_socket.display(), services = cfg.services.len(), "running");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some((req, reply)) = rx.recv() => {
                let _ = reply.send(answer(&dp, req));
            }
        }
    }
    tracing::info!("stopping: detaching XDP");
    dp.detach_all();
    Ok(())
}

fn answer(dp: &Dataplane, req: Request) -> Response {
    match req {
        Request::Status => match dp.status() {
            Ok(s) => match serde_json::to_value(s) {
                Ok(v) => Response::Ok(v),
                Err(e) => Response::Error(e.to_string()),
            },
            Err(e) => Response::Error(format!("{e:#}")),
        },
    }
}

/// Forwards the program's aya-log lines to tracing, if it was built with them
/// (the `verbose-logs` feature of lb-ebpf); otherwise there is nothing to read.
fn start_program_logs(dp: &mut Dataplane) -> Option<tokio::task::JoinHandle<()>> {
    let logger = match dp.logger() {
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
