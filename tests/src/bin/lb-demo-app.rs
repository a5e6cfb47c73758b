//! The demo's application server (app1, app2 of the seed): nginx forwards to
//! it; it writes rows through the balancer's MySQL write VIP and reads them
//! through its read VIP.
//!
//! `lb-demo-app NAME LISTEN WRITE_VIP READ_VIP USER PASSWORD_FILE`
//!
//! - `GET /`          -> "web1 -> app1: hello"
//! - `GET /write?msg=M` -> "web1 -> app1: wrote 'M' on server_id 1"
//! - `GET /read`      -> "web2 -> app2: 3 rows from server_id 2: a,b,c"
//!
//! The web server that forwarded the request is named by its `X-Web` header.
//! Every request opens its own database connection, so a write always goes
//! to whichever server the write VIP leads to now.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    routing::get,
    Router,
};
use mysql_async::{prelude::Queryable, Conn, OptsBuilder};
use serde::Deserialize;

struct App {
    name: String,
    write: SocketAddr,
    read: SocketAddr,
    user: String,
    password: String,
}

impl App {
    async fn conn(&self, to: SocketAddr) -> mysql_async::Result<Conn> {
        let opts = OptsBuilder::default()
            .ip_or_hostname(to.ip().to_string())
            .tcp_port(to.port())
            .user(Some(self.user.clone()))
            .pass(Some(self.password.clone()))
            .db_name(Some("appdb"))
            .prefer_socket(false);
        Conn::new(opts).await
    }

    fn who(&self, headers: &HeaderMap) -> String {
        let web = headers
            .get("x-web")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?");
        format!("{web} -> {}", self.name)
    }
}

type Shared = State<Arc<App>>;
type Answer = Result<String, (StatusCode, String)>;

fn failed(e: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::BAD_GATEWAY, format!("database error: {e}\n"))
}

async fn hello(State(app): Shared, headers: HeaderMap) -> String {
    format!("{}: hello\n", app.who(&headers))
}

#[derive(Deserialize)]
struct Msg {
    msg: String,
}

async fn write(State(app): Shared, headers: HeaderMap, Query(m): Query<Msg>) -> Answer {
    let mut c = app.conn(app.write).await.map_err(failed)?;
    c.exec_drop(
        "INSERT INTO t (v, server) VALUES (?, @@server_id)",
        (m.msg.clone(),),
    )
    .await
    .map_err(failed)?;
    let id: Option<u32> = c.query_first("SELECT @@server_id").await.map_err(failed)?;
    let _ = c.disconnect().await;
    Ok(format!(
        "{}: wrote '{}' on server_id {}\n",
        app.who(&headers),
        m.msg,
        id.unwrap_or(0)
    ))
}

async fn read(State(app): Shared, headers: HeaderMap) -> Answer {
    let mut c = app.conn(app.read).await.map_err(failed)?;
    let rows: Vec<String> = c
        .query("SELECT v FROM t ORDER BY id")
        .await
        .map_err(failed)?;
    let id: Option<u32> = c.query_first("SELECT @@server_id").await.map_err(failed)?;
    let _ = c.disconnect().await;
    Ok(format!(
        "{}: {} rows from server_id {}: {}\n",
        app.who(&headers),
        rows.len(),
        id.unwrap_or(0),
        rows.join(",")
    ))
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 7 {
        eprintln!("usage: lb-demo-app NAME LISTEN WRITE_VIP READ_VIP USER PASSWORD_FILE");
        std::process::exit(2);
    }
    let parse = |s: &str| -> SocketAddr {
        s.parse().unwrap_or_else(|_| {
            eprintln!("lb-demo-app: {s:?} is not an address:port");
            std::process::exit(2)
        })
    };
    let password = std::fs::read_to_string(&a[6]).unwrap_or_else(|e| {
        eprintln!("lb-demo-app: reading {}: {e}", a[6]);
        std::process::exit(2)
    });
    let app = Arc::new(App {
        name: a[1].clone(),
        write: parse(&a[3]),
        read: parse(&a[4]),
        user: a[5].clone(),
        password: password.trim_end().to_owned(),
    });
    let listen = parse(&a[2]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| {
                eprintln!("lb-demo-app: binding {listen}: {e}");
                std::process::exit(1)
            });
        let router = Router::new()
            .route("/", get(hello))
            .route("/write", get(write))
            .route("/read", get(read))
            .with_state(app);
        if let Err(e) = axum::serve(l, router).await {
            eprintln!("lb-demo-app: {e}");
        }
    });
}
