//! A UDP echo-style server that answers every datagram with its own name.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::Netns;

pub struct UdpNamer {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpNamer {
    /// Binds `addr` inside `ns` and answers each datagram with "`name`".
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> UdpNamer {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, r, n) = (stop.clone(), received.clone(), name.to_owned());
        let thread = ns.spawn(move || {
            let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    r.fetch_add(1, Ordering::Relaxed);
                    let _ = sock.send_to(n.as_bytes(), from);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("UDP server did not start");
        UdpNamer {
            stop,
            received,
            thread: Some(thread),
        }
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpNamer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP receiver that only counts (a sink for packets-per-second runs).
pub struct UdpSink {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpSink {
    pub fn start(ns: &Netns, addr: SocketAddr) -> UdpSink {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, r) = (stop.clone(), received.clone());
        let thread = ns.spawn(move || {
            let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if sock.recv_from(&mut buf).is_ok() {
                    r.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("UDP sink did not start");
        UdpSink {
            stop,
            received,
            thread: Some(thread),
        }
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends 64-byte datagrams to `target` from one socket in `ns` as fast as it
/// can for `secs` seconds (batches of 64 with sendmmsg); returns how many.
pub fn flood(ns: &Netns, target: SocketAddr, secs: f64) -> u64 {
    ns.run(move || {
        use std::os::fd::AsRawFd;
        let sock = UdpSocket::bind("0.0.0.0:0").expect("binding the generator");
        sock.connect(target).expect("connecting the generator");
        let payload = [0x5au8; 64];
        const BATCH: usize = 64;
        let mut iov: Vec<libc::iovec> = (0..BATCH)
            .map(|_| libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            })
            .collect();
        // SAFETY: zeroed mmsghdr entries, each pointing at one iovec.
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
            .map(|i| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = &mut iov[i];
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let end = std::time::Instant::now() + Duration::from_secs_f64(secs);
        let mut sent = 0u64;
        while std::time::Instant::now() < end {
            // SAFETY: msgs holds BATCH valid headers for a connected socket.
            let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent += n as u64;
            }
        }
        sent
    })
}

/// From the client (10.0.1.2) in `ns`, `flows` UDP flows to
/// `vip`, each its own socket, `rounds` datagrams each in turn; every answer
/// must come from `vip`. Returns each flow's answers (the backends' names).
pub fn flows_through(ns: &Netns, vip: SocketAddr, flows: usize, rounds: usize) -> Vec<Vec<String>> {
    ns.run(move || {
        let socks: Vec<UdpSocket> = (0..flows)
            .map(|_| {
                let s = UdpSocket::bind("10.0.1.2:0").unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
                    .unwrap();
                s
            })
            .collect();
        let mut answers = vec![Vec::new(); flows];
        for round in 0..rounds {
            for (i, s) in socks.iter().enumerate() {
                s.send_to(b"who?", vip).unwrap();
                let mut buf = [0u8; 64];
                let (n, from) = s
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("UDP flow {i} round {round}: no answer: {e}"));
                assert_eq!(from, vip, "the answer must come from the VIP");
                answers[i].push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        answers
    })
}
