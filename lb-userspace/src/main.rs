//! `lb`: the load balancer's command line.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    config::{Config, DEFAULT_CONTROL_SOCKET},
    control::{self, Request},
    daemon,
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
    /// Load the XDP program, attach it and balance until SIGINT/SIGTERM (root).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit: 0 if valid, 1 with the problems if not.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show services, backends and counters of the running daemon.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket.
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
}

fn main() -> ExitCode {
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
        Command::Run { config } => {
            // Validate the whole file before anything touches the kernel.
            let cfg = Config::load(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(daemon::run(cfg))
        }
        Command::Status { json, socket } => {
            let v = control::request(&socket, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render_status(&v));
            }
            Ok(())
        }
    }
}

/// The human form of `lb status`.
fn render_status(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    // JSON strings without their quotes, numbers as they are.
    let t = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = String::new();
    for a in v["attachments"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "interface {} (XDP {})",
            t(&a["interface"]),
            t(&a["mode"])
        );
    }
    for s in v["services"].as_array().into_iter().flatten() {
        let tr = &s["traffic"];
        let _ = writeln!(
            out,
            "\nservice {} {}:{}/{} {}: {} flows, {} packets, {} bytes in; {} packets out",
            t(&s["name"]),
            t(&s["vip"]),
            t(&s["port"]),
            t(&s["protocol"]),
            t(&s["scheduler"]),
            t(&tr["new_flows"]),
            t(&tr["packets"]),
            t(&tr["bytes"]),
            t(&tr["reply_packets"]),
        );
        let _ = writeln!(
            out,
            "  {:<12} {:<21} {:<8} {:>6} {:>8} {:>10} {:>12} {:>10}",
            "BACKEND", "ADDRESS", "STATE", "WEIGHT", "FLOWS", "PACKETS", "BYTES", "REPLIES"
        );
        for b in s["backends"].as_array().into_iter().flatten() {
            let tr = &b["traffic"];
            let _ = writeln!(
                out,
                "  {:<12} {:<21} {:<8} {:>6} {:>8} {:>10} {:>12} {:>10}",
                t(&b["name"]),
                format!("{}:{}", t(&b["address"]), t(&b["port"])),
                t(&b["state"]),
                t(&b["weight"]),
                t(&tr["new_flows"]),
                t(&tr["packets"]),
                t(&tr["bytes"]),
                t(&tr["reply_packets"]),
            );
        }
    }
    let _ = writeln!(out, "\npackets by outcome:");
    for name in lb_common::counter::NAMES {
        let _ = writeln!(out, "  {name:<18} {}", t(&v["counters"][name]));
    }
    out
}
