//! `cargo xtask demo`: the seed's whole infrastructure in network namespaces
//! on this one machine, with our XDP balancer in HAProxy's place (see
//! `lb_tests::seed`). It tells a short story, checks every step, writes a
//! transcript, and removes everything it created at the end of the story or
//! on Ctrl-C; `--interactive` leaves it all running until Ctrl-C.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use lb_tests::seed::{self, Narrator, Options, READ_VIP, WRITE_VIP, WWW};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let interactive = args.iter().any(|a| a == "--interactive");
    let transcript = args
        .iter()
        .position(|a| a == "--transcript")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/demo-transcript.txt"));
    lb_tests::require_root();
    // Ctrl-C and SIGTERM are taken synchronously (at the end, in interactive
    // mode): every guard then drops and removes what it created. During the
    // story, Ctrl-C reaches the servers too, the story stops at the failed
    // step, and the same guards clean up.
    let signals = block_signals();
    let opts = Options {
        prefix: "lbdemo".into(),
        config: root().join("config/demo.toml"),
        socket: PathBuf::from("/run/lb/demo.sock"),
        pin_dir: PathBuf::from("/sys/fs/bpf/lb-demo"),
    };
    let mut n = Narrator::new(Some(&transcript));
    let seed = match seed::run(&opts, &mut n) {
        Ok((seed, _)) => seed,
        Err(e) => {
            eprintln!("\ndemo failed at: {e}\n(everything it created is being removed)");
            return ExitCode::FAILURE;
        }
    };
    n.say("");
    n.say(format!("Transcript: {}", transcript.display()));
    if interactive {
        let lb = lb_tests::daemon::lb_binary();
        println!("\nEverything stays up until Ctrl-C. Try, as root:");
        println!("  ip netns exec lbdemo-cli curl http://www.foobar.com/");
        println!("  ip netns exec lbdemo-cli curl -k https://www.foobar.com/");
        println!("  ip netns exec lbdemo-cli curl 'http://www.foobar.com/write?msg=hi'");
        println!("  ip netns exec lbdemo-cli curl http://www.foobar.com/read");
        println!("  {} status --socket /run/lb/demo.sock", lb.display());
        println!("  ip netns exec lbdemo-lb curl http://127.0.0.1:9100/metrics   # and / for the status page");
        println!("  (VIPs: www {WWW}, MySQL writes {WRITE_VIP}, reads {READ_VIP})");
        wait_for(&signals);
    }
    println!("\nRemoving the namespaces, servers and the balancer.");
    drop(seed);
    ExitCode::SUCCESS
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain signal-mask calls on a zeroed, then initialised, sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for(set: &libc::sigset_t) {
    let mut sig = 0;
    // SAFETY: set was initialised by block_signals and the signals are blocked.
    unsafe { libc::sigwait(set, &mut sig) };
}
