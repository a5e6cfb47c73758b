//! A small HTTP/1.1 client for the tests and the demo: enough to send GETs to
//! nginx and read who answered. (Health checks in the daemon use a real HTTP
//! library; here the point is to control connections exactly.)

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

/// One request on a new TCP connection; returns the status and body.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut c = Conn::open(addr)?;
    c.get_with(path, true)
}

/// A keep-alive connection: every request goes over the same TCP flow.
pub struct Conn {
    reader: BufReader<TcpStream>,
    host: String,
}

/// One request on a new TCP connection from the namespace's address `from`,
/// giving up on the handshake after `wait` (a source the firewall drops gets
/// no answer at all: the error is a timeout, not a refusal).
pub fn get_from(
    from: Ipv4Addr,
    addr: SocketAddr,
    path: &str,
    wait: Duration,
) -> std::io::Result<(u16, String)> {
    let mut c = Conn::open_from(from, addr, wait)?;
    c.get_with(path, true)
}

impl Conn {
    pub fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        Conn::over(s, addr)
    }

    /// Like [`Conn::open`], from source address `from`, waiting `wait` for the handshake.
    pub fn open_from(from: Ipv4Addr, addr: SocketAddr, wait: Duration) -> std::io::Result<Conn> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.bind(&SocketAddr::new(from.into(), 0).into())?;
        s.connect_timeout(&addr.into(), wait)?;
        Conn::over(s.into(), addr)
    }

    fn over(s: TcpStream, addr: SocketAddr) -> std::io::Result<Conn> {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(s),
            host: addr.ip().to_string(),
        })
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        self.get_with(path, false)
    }

    fn get_with(&mut self, path: &str, close: bool) -> std::io::Result<(u16, String)> {
        let conn = if close { "close" } else { "keep-alive" };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: {conn}\r\n\r\n",
            self.host
        );
        self.reader.get_mut().write_all(req.as_bytes())?;
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
        let mut len = None;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(bad("connection closed in the headers"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                }
            }
        }
        let len = len.ok_or_else(|| bad("no Content-Length"))?;
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// From namespace `ns`, `n` GETs of `/` to `addr`, each on a new connection;
/// each must answer 200. Returns the bodies (the backends' names) in order
/// and how many times each name answered.
pub fn names(
    ns: &crate::netns::Netns,
    addr: SocketAddr,
    n: usize,
) -> (Vec<String>, std::collections::HashMap<String, usize>) {
    let answers: Vec<String> = ns.run(move || {
        (0..n)
            .map(|i| match get(addr, "/") {
                Ok((200, body)) => body.trim().to_owned(),
                Ok((status, body)) => panic!("request {i}: status {status}: {body}"),
                Err(e) => panic!("request {i} through {addr} failed: {e}"),
            })
            .collect()
    });
    let mut per = std::collections::HashMap::new();
    for a in &answers {
        *per.entry(a.clone()).or_default() += 1;
    }
    (answers, per)
}
