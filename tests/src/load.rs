//! Continuous client load: a thread in the client namespace sending one HTTP
//! request per new TCP connection, recording when each started and who
//! answered (or why it failed).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{http, netns::Netns};

/// One request: when it started, and the answering backend's name or the error.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub answer: Result<String, String>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Sample>>>,
}

impl Load {
    /// Starts requesting `GET /` from `target`, pausing `pause` between requests.
    pub fn start(ns: &Netns, target: SocketAddr, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = ns.spawn(move || {
            let mut samples = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                let answer = match http::get(target, "/") {
                    Ok((200, body)) => Ok(body.trim().to_owned()),
                    Ok((status, body)) => Err(format!("HTTP {status}: {}", body.trim())),
                    Err(e) => Err(e.to_string()),
                };
                samples.push(Sample { at, answer });
                std::thread::sleep(pause);
            }
            samples
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns every sample.
    pub fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("load thread panicked")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP listener that completes handshakes (the kernel does) and never
/// answers: a hung server.
pub struct Hang {
    _stop: std::sync::mpsc::Sender<()>,
}

impl Hang {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Hang {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        ns.spawn(move || {
            let l =
                std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
            ready_tx.send(()).unwrap();
            // Hold the listener (and never accept) until the guard drops.
            let _ = rx.recv();
            drop(l);
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("hang listener did not start");
        Hang { _stop: tx }
    }
}
