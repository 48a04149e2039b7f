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
