//! `lb`: the load balancer's command line.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    config::{Config, DEFAULT_CONTROL_SOCKET},
    control::{self, Request},
    daemon,
    reconcile::Status,
};

#[derive(Parser)]
#[command(name = "lb", version, about = "XDP layer-4 load balancer")]
struct Cli {
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program, attach it and balance until SIGINT/SIGTERM or
    /// `lb stop` (root). Adopts the pinned state of an earlier daemon.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Remove pinned state of an earlier daemon and start clean
        /// (established flows are forgotten).
        #[arg(long)]
        fresh: bool,
        /// Run in the named network namespace (/run/netns/NAME), entering
        /// only it: pins stay on the host's bpffs and outlive the daemon, as
        /// they do not under `ip netns exec`. Overrides [daemon] netns.
        #[arg(long, value_name = "NAME")]
        netns: Option<String>,
    },
    /// Stop the daemon: detach XDP and remove the pins (as SIGTERM), or with
    /// --keep-datapath leave it forwarding for the next `lb run` to adopt.
    Stop {
        #[arg(long)]
        keep_datapath: bool,
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Validate a config file and exit: 0 if valid, 1 with the problems if not.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show services, backends (state, weight, flows, last check) and counters.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket.
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Walk the connection table (a diagnostic: seconds when it is full;
    /// `status` counts flows without it).
    Census {
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Re-read the daemon's config file and apply the difference (as SIGHUP);
    /// an invalid file changes nothing and its error is printed.
    Reload {
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Change a backend now, without a reload (lost on the next reload unless
    /// the file says the same).
    Backend {
        #[command(subcommand)]
        op: BackendOp,
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET, global = true)]
        socket: PathBuf,
    },
    /// Print the manual page (roff), made from this help.
    #[command(hide = true)]
    Manpage,
}

#[derive(Subcommand)]
enum BackendOp {
    /// Add a backend: `lb backend add web web3 10.0.2.13[:80] [--weight 2]`.
    Add {
        service: String,
        name: String,
        /// IPv4 address, optionally with `:port` (default: the service's port).
        address: String,
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Remove a backend; its established flows are dropped.
    Remove { service: String, name: String },
    /// No new flows; established flows continue until they end.
    Drain { service: String, name: String },
    /// Back in service (undoes drain and disable).
    Enable { service: String, name: String },
    /// Out of service: no new flows.
    Disable { service: String, name: String },
    /// Set the weight (weighted-round-robin services).
    Weight {
        service: String,
        name: String,
        weight: u32,
    },
}

fn main() -> ExitCode {
    unblock_signals();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A parent may hand us blocked signals (a supervisor, a script that
/// took Ctrl-C for itself): `lb run` must still see SIGINT, SIGTERM and SIGHUP,
/// or a stop would end in SIGKILL with nothing cleaned up (seen with the demo).
fn unblock_signals() {
    // SAFETY: plain signal-mask calls on a zeroed, then initialised, sigset,
    // before any other thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            let backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
            println!(
                "{}: OK ({} services, {} backends)",
                config.display(),
                cfg.services.len(),
                backends
            );
            Ok(())
        }
        Command::Stop {
            keep_datapath,
            socket,
        } => say(&socket, Request::Stop { keep_datapath }),
        Command::Run {
            config,
            fresh,
            netns,
        } => {
            // The namespace first: the config names its interfaces. Still one
            // thread here, so every thread started later is in it too.
            if let Some(name) = netns.or_else(|| lb_userspace::config::netns_of(&config)) {
                daemon::enter_netns(&name)?;
            }
            // Validate the whole file before anything touches the kernel.
            let cfg = Config::load(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(daemon::run(cfg, fresh))
        }
        Command::Status { json, socket } => {
            let v = control::request(&socket, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let status: Status = serde_json::from_value(v).context(
                    "the daemon's status is not what this `lb` reads (another version?)",
                )?;
                print!("{}", render_status(&status));
            }
            Ok(())
        }
        Command::Census { socket } => {
            let v = control::request(&socket, &Request::Census)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Command::Reload { socket } => say(&socket, Request::Reload),
        Command::Manpage => {
            let mut out = Vec::new();
            manpage(&mut out)?;
            std::io::Write::write_all(&mut std::io::stdout(), &out)?;
            Ok(())
        }
        Command::Backend { op, socket } => {
            let req = match op {
                BackendOp::Add {
                    service,
                    name,
                    address,
                    weight,
                } => {
                    let (address, port) = parse_addr_port(&address)?;
                    Request::BackendAdd {
                        service,
                        name,
                        address,
                        port,
                        weight,
                    }
                }
                BackendOp::Remove { service, name } => Request::BackendRemove { service, name },
                BackendOp::Drain { service, name } => Request::BackendDrain { service, name },
                BackendOp::Enable { service, name } => Request::BackendEnable { service, name },
                BackendOp::Disable { service, name } => Request::BackendDisable { service, name },
                BackendOp::Weight {
                    service,
                    name,
                    weight,
                } => Request::BackendWeight {
                    service,
                    name,
                    weight,
                },
            };
            say(&socket, req)
        }
    }
}

/// Sends a request and prints the daemon's message.
fn say(socket: &std::path::Path, req: Request) -> Result<()> {
    let v = control::request(socket, &req)?;
    println!("{}", v["message"].as_str().unwrap_or_default());
    Ok(())
}

/// `10.0.2.13` or `10.0.2.13:8080`.
fn parse_addr_port(s: &str) -> Result<(std::net::Ipv4Addr, Option<u16>)> {
    let (a, p) = match s.split_once(':') {
        Some((a, p)) => (
            a,
            Some(
                p.parse::<u16>()
                    .with_context(|| format!("bad port in {s:?}"))?,
            ),
        ),
        None => (s, None),
    };
    let a = a
        .parse()
        .with_context(|| format!("{a:?} is not an IPv4 address"))?;
    Ok((a, p))
}

/// The manual page: the command's own page, then each subcommand's
/// description and options.
fn manpage(out: &mut Vec<u8>) -> Result<()> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    clap_mangen::Man::new(cmd.clone()).render(out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub = sub.clone().name(format!("lb {}", sub.get_name()));
        std::io::Write::write_all(
            out,
            format!(".SH \"{}\"\n", sub.get_name().to_uppercase()).as_bytes(),
        )?;
        let man = clap_mangen::Man::new(sub);
        man.render_synopsis_section(out)?;
        man.render_description_section(out)?;
        man.render_options_section(out)?;
    }
    Ok(())
}

/// A value's name as the status JSON spells it (`weighted-round-robin`).
fn json_name<T: serde::Serialize>(x: &T) -> String {
    match serde_json::to_value(x) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "-".into(),
    }
}

/// The human form of `lb status`.
fn render_status(v: &Status) -> String {
    use std::fmt::Write;
    let opt = |x: Option<String>| x.unwrap_or_else(|| "-".into());
    let mut out = String::new();
    let state = &v.state;
    match state.survives_restart {
        Some(true) => {
            let _ = writeln!(out, "state: survives a restart ({})", state.why);
        }
        Some(false) => {
            let _ = writeln!(
                out,
                "state: DOES NOT survive a restart of the daemon: {}",
                state.why
            );
        }
        None => {
            let _ = writeln!(
                out,
                "state: whether it survives a restart is unknown ({})",
                state.why
            );
        }
    }
    let ct = &v.conntrack;
    let _ = writeln!(
        out,
        "flows: {} established of {} ({}{})",
        ct.entries,
        ct.capacity,
        ct.pressure.name(),
        match ct.pressure_events {
            0 => String::new(),
            n => format!(", past 90% {n} times"),
        }
    );
    for a in &v.attachments {
        let _ = writeln!(out, "interface {} ({}): {}", a.interface, a.hook, a.reason);
    }
    for s in &v.services {
        let tr = &s.traffic;
        let _ = writeln!(
            out,
            "\nservice {} {}:{}/{} {}: {} flows, {} packets, {} bytes in; {} packets out",
            s.name,
            s.vip,
            s.port,
            json_name(&s.protocol),
            json_name(&s.scheduler),
            tr.new_flows,
            tr.packets,
            tr.bytes,
            tr.reply_packets,
        );
        let _ = writeln!(
            out,
            "  {:<12} {:<21} {:<9} {:>6} {:>7} {:>8} {:>10} {:>12} {:>10}  LAST CHECK",
            "BACKEND",
            "ADDRESS",
            "STATE",
            "WEIGHT",
            "ACTIVE",
            "FLOWS",
            "PACKETS",
            "BYTES",
            "REPLIES"
        );
        for b in &s.backends {
            let tr = &b.traffic;
            let check = match &b.health {
                None => "not checked".to_owned(),
                Some(h) => match &h.last {
                    None => "pending".to_owned(),
                    Some(last) => format!(
                        "{} {} in {:.1} ms",
                        if last.ok { "ok" } else { "FAILED" },
                        last.detail,
                        last.latency_us as f64 / 1000.0
                    ),
                },
            };
            let _ = writeln!(
                out,
                "  {:<12} {:<21} {:<9} {:>6} {:>7} {:>8} {:>10} {:>12} {:>10}  {check}",
                b.name,
                format!("{}:{}", b.address, b.port),
                b.state.name(),
                b.weight,
                b.active_flows,
                tr.new_flows,
                tr.packets,
                tr.bytes,
                tr.reply_packets,
            );
        }
    }
    for s in &v.services {
        let Some(m) = &s.mysql else {
            continue;
        };
        let _ = writeln!(
            out,
            "\nmysql {} ({}): primary {}{}",
            s.name,
            json_name(&s.steering),
            opt(m.primary.clone()),
            match &m.alarm {
                Some(a) => format!("  ALARM: {a}"),
                None => String::new(),
            }
        );
        for b in &s.backends {
            let m = b.mysql.as_ref();
            let o = m.map(|m| &m.observation);
            let _ = writeln!(
                out,
                "  {:<12} role {:<11} read_only {:<5} io {:<10} sql {:<5} lag {:<4} {}",
                b.name,
                opt(m.map(|m| m.role.name().to_owned())),
                opt(o.map(|o| o.read_only.to_string())),
                opt(o.and_then(|o| o.io_running.clone())),
                opt(o.and_then(|o| o.sql_running.clone())),
                opt(o.and_then(|o| o.lag_s).map(|l| l.to_string())),
                o.and_then(|o| o.error.as_deref()).unwrap_or_default(),
            );
        }
    }
    let _ = writeln!(out, "\npackets by outcome:");
    let width = lb_common::counter::NAMES
        .iter()
        .map(|n| n.len())
        .max()
        .unwrap_or(0);
    for counter in lb_common::counter::NAMES {
        let n = opt(v.counters.get(counter).map(|n| n.to_string()));
        let _ = writeln!(out, "  {counter:<width$} {n}");
    }
    out
}
