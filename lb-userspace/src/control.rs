//! The control socket: a Unix socket, root-only, one JSON request and one JSON
//! response per connection. Requests go to the daemon's single owner of the
//! maps through a channel; the socket task never touches the data path.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// The Prometheus text exposition, as `{"text": ...}`.
    Metrics,
    /// A walk of the connection table (a diagnostic: seconds when it is full).
    Census,
    /// Stop the daemon. `keep_datapath`: leave the program attached and the
    /// maps pinned, so forwarding continues and the next `lb run` adopts them
    /// (restarts, upgrades); otherwise detach and remove the pins.
    Stop {
        #[serde(default)]
        keep_datapath: bool,
    },
    /// Re-read the config file; apply it whole or not at all.
    Reload,
    BackendAdd {
        service: String,
        name: String,
        address: std::net::Ipv4Addr,
        port: Option<u16>,
        weight: Option<u32>,
    },
    BackendRemove {
        service: String,
        name: String,
    },
    BackendDrain {
        service: String,
        name: String,
    },
    BackendEnable {
        service: String,
        name: String,
    },
    BackendDisable {
        service: String,
        name: String,
    },
    BackendWeight {
        service: String,
        name: String,
        weight: u32,
    },
}

/// The daemon's answer: a JSON value on success, or an error message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Ok(serde_json::Value),
    Error(String),
}

/// A request with the way back to its client.
pub type Envelope = (Request, oneshot::Sender<Response>);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the daemon at {} (is `lb run` running with this socket?)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent something that is not a response")]
    Protocol(#[from] serde_json::Error),
    #[error("the daemon refused: {0}")]
    Refused(String),
}

/// Binds the socket (mode 0600, in a 0700 directory it creates) and serves it
/// until the listener is dropped. Requests are forwarded to `to_owner`.
pub fn serve(path: &Path, to_owner: mpsc::Sender<Envelope>) -> Result<ServeGuard, ControlError> {
    let bind_err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(bind_err)?;
        }
    }
    // A socket file left by a daemon that died is stale; a live one answers.
    // Anything that is not a socket is never removed.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(bind_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something other than a socket is there; it is left alone",
            )));
        }
        if StdUnixStream::connect(path).is_ok() {
            return Err(bind_err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another daemon is serving it",
            )));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    // No access for others at any moment: bound inside a directory of its
    // own (0700), made 0600 there, then renamed into place. (Not by changing
    // the umask, which is the whole process's, other threads included.)
    let listener = bind_private(path).map_err(bind_err)?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let to_owner = to_owner.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, to_owner).await {
                    tracing::debug!(error = %e, "control connection failed");
                }
            });
        }
    });
    Ok(ServeGuard {
        path: path.to_owned(),
        task,
    })
}

/// Binds a socket at `path` that only this user can open.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let private = parent.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let bound = (|| {
        let tmp = private.join("socket");
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

async fn handle(
    stream: tokio::net::UnixStream,
    to_owner: mpsc::Sender<Envelope>,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    // One request is a short line: a longer one is not read past this.
    TokioBufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST_BYTES))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::Error(format!("bad request: {e}")),
        Ok(req) => {
            let (tx, rx) = oneshot::channel();
            if to_owner.send((req, tx)).await.is_err() {
                Response::Error("the daemon is shutting down".into())
            } else {
                rx.await
                    .unwrap_or_else(|_| Response::Error("no answer".into()))
            }
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

/// The longest request line read from a client.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// Stops serving and removes the socket file when dropped.
pub struct ServeGuard {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ServeGuard {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request to the daemon at `path` and returns its answer.
pub fn request(path: &Path, req: &Request) -> Result<serde_json::Value, ControlError> {
    let mut s = StdUnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    match serde_json::from_str(&answer)? {
        Response::Ok(v) => Ok(v),
        Response::Error(e) => Err(ControlError::Refused(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_socket_is_the_owners_alone_and_answers() {
        let dir = std::env::temp_dir().join(format!("lb-control-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("lb.sock");
        let (tx, mut rx) = mpsc::channel::<Envelope>(1);
        let guard = serve(&path, tx).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir), 0o700);
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("lb.sock")]);
        tokio::spawn(async move {
            let (_, back) = rx.recv().await.unwrap();
            let _ = back.send(Response::Ok(serde_json::json!({"ok": 1})));
        });
        let p = path.clone();
        let answer = tokio::task::spawn_blocking(move || request(&p, &Request::Status))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer["ok"], 1);
        // A second daemon on the same socket is refused while this one serves.
        let (tx2, _rx2) = mpsc::channel::<Envelope>(1);
        assert!(matches!(serve(&path, tx2), Err(ControlError::Bind { .. })));
        drop(guard);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
