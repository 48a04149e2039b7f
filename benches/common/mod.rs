//! Helpers shared by the end-to-end benches (`load`, `delta`, `passthrough`): a real etcd on free loopback
//! ports, and latency quantiles. Not a bench target itself (a directory, not `benches/*.rs`).
#![allow(dead_code)] // each bench uses part of it

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;
use hdrhistogram::Histogram;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A fresh single-member etcd on free loopback ports, killed on drop.
pub struct Etcd {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Etcd {
    /// Starts etcd and waits until it answers; an etcd that exits at start (a free port taken
    /// by someone else in between) is started again on other ports.
    pub async fn start() -> Etcd {
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let (c, p) = (free_port(), free_port());
            let url = format!("http://127.0.0.1:{c}");
            let peer = format!("http://127.0.0.1:{p}");
            let child = Command::new(std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into()))
                .args(["--name", "b", "--data-dir"])
                .arg(dir.path().join("etcd"))
                .args(["--listen-client-urls", &url, "--advertise-client-urls", &url, "--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer, "--initial-cluster", &format!("b={peer}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd (Debian's etcd-server)");
            let mut etcd = Etcd { child, url, _dir: dir };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = etcd.child.try_wait() {
                    break; // exited: try other ports
                }
                if let Ok(mut c) = Client::connect([&etcd.url], None).await {
                    if c.get("probe", None).await.is_ok() {
                        return etcd;
                    }
                }
                assert!(Instant::now() < deadline, "etcd did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("etcd exited at start three times (ports taken?)");
    }

    /// Its process ID (for CPU accounting from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client on it.
    pub async fn client(&self) -> Client {
        Client::connect([&self.url], None).await.unwrap()
    }

    /// Maintenance.Status db_size, after a Maintenance.Hash: etcd commits its backend every
    /// 100 ms and Status reports the size at the last commit; Hash forces a commit first.
    pub async fn db_size(&self) -> i64 {
        let mut c = self.client().await;
        c.hash().await.unwrap();
        c.status().await.unwrap().db_size()
    }
}

/// The `q` quantile of a histogram of microseconds, in milliseconds.
pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Starts `cmd` with its output discarded; `what` names the package that provides it.
pub fn spawn_quiet(cmd: &mut Command, what: &str) -> Child {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// etcd's own `etcd grpc-proxy start` on 127.0.0.1:`port`, in front of `etcd` (`http://host:port`).
pub fn grpc_proxy(etcd: &str, port: u16) -> Child {
    let endpoints = etcd.trim_start_matches("http://");
    spawn_quiet(
        Command::new("etcd").args(["grpc-proxy", "start", "--endpoints", endpoints, "--listen-addr", &format!("127.0.0.1:{port}")]),
        "etcd (Debian's etcd-server)",
    )
}

/// etcd-squeeze `serve --config CONFIG`, from the binary `bin` (this build's, or a baseline's).
pub fn squeeze(bin: &std::path::Path, config: &std::path::Path) -> Child {
    spawn_quiet(Command::new(bin).args(["serve", "--config"]).arg(config), "etcd-squeeze")
}

/// A client of `url`, once a Get answers (polls until `timeout`).
pub async fn connect(url: &str, timeout: Duration) -> Client {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut c) = Client::connect([url], None).await {
            if c.get("probe", None).await.is_ok() {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "{url} did not come up within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU time of a process and all its threads (user, system), in clock ticks, from /proc/PID/stat.
pub fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11), ticks(12)) // utime, stime (fields 14 and 15 of proc(5))
}
