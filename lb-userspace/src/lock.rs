//! One daemon per pin directory and per control socket.
//!
//! `lb run` takes both locks before it reads, writes or removes any map, pin,
//! link or socket: a second daemon pointed at the same state exits with a
//! clear message and touches nothing of the first one's (not even with
//! `--fresh`). The locks are `flock`s on small files: the kernel drops them
//! when the process ends, however it ends, so a SIGKILLed daemon never leaves
//! a stale lock behind. bpffs holds no regular files, so the pin directory's
//! lock lives under /run/lb; the socket's beside the socket.

use std::{
    fs::File,
    io::{Read, Seek, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

/// Where the pin directories' locks live.
const LOCK_DIR: &str = "/run/lb/locks";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another lb daemon{} runs with {what} {}: stop it first (`lb stop --socket SOCKET`), \
         or give this one its own [daemon] pin_dir and control_socket; nothing was changed",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        path.display()
    )]
    Busy {
        what: &'static str,
        path: PathBuf,
        holder: Option<u32>,
    },
    #[error("cannot take the lock {}", lock.display())]
    Io {
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Held for the daemon's life; dropping it releases both locks.
#[derive(Debug)]
pub struct DaemonLock {
    _files: Vec<File>,
}

/// The lock file of pin directory `dir`: its path with `/` escaped.
pub fn pin_dir_lock(dir: &Path) -> PathBuf {
    let name: String = dir
        .to_string_lossy()
        .chars()
        .map(|c| match c {
            '/' => '%',
            '%' => '+',
            c => c,
        })
        .collect();
    Path::new(LOCK_DIR).join(format!("{name}.lock"))
}

/// The lock file of control socket `socket`.
pub fn socket_lock(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// Takes both locks, or says who holds one.
pub fn take(pin_dir: &Path, socket: &Path) -> Result<DaemonLock, LockError> {
    let files = vec![
        take_one(&pin_dir_lock(pin_dir), "pin_dir", pin_dir)?,
        take_one(&socket_lock(socket), "control_socket", socket)?,
    ];
    Ok(DaemonLock { _files: files })
}

fn take_one(lock: &Path, what: &'static str, path: &Path) -> Result<File, LockError> {
    let io = |source| LockError::Io {
        lock: lock.to_owned(),
        source,
    };
    if let Some(dir) = lock.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock)
        .map_err(io)?;
    // SAFETY: plain flock(2) on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io(e));
        }
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        return Err(LockError::Busy {
            what,
            path: path.to_owned(),
            holder: pid.trim().parse().ok(),
        });
    }
    f.set_len(0).map_err(io)?;
    f.rewind().map_err(io)?;
    write!(f, "{}", std::process::id()).map_err(io)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_named_until_the_first_lets_go() {
        let dir = std::env::temp_dir().join(format!("lb-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = dir.join("x.lock");
        let first = take_one(&lock, "pin_dir", Path::new("/sys/fs/bpf/x")).unwrap();
        match take_one(&lock, "pin_dir", Path::new("/sys/fs/bpf/x")) {
            Err(LockError::Busy { holder, .. }) => {
                assert_eq!(
                    holder,
                    Some(std::process::id()),
                    "the holder's pid is named"
                )
            }
            other => panic!("a second lock must be refused: {other:?}"),
        }
        drop(first);
        take_one(&lock, "pin_dir", Path::new("/sys/fs/bpf/x")).expect("free again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lock_names_keep_pin_directories_apart() {
        assert_ne!(
            pin_dir_lock(Path::new("/sys/fs/bpf/a/b")),
            pin_dir_lock(Path::new("/sys/fs/bpf/a%b"))
        );
        assert_eq!(
            socket_lock(Path::new("/run/lb/lb.sock")),
            Path::new("/run/lb/lb.sock.lock")
        );
    }
}
