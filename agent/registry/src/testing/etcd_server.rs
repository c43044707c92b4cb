//! Starts Debian's `etcd` (package `etcd-server`) in a temporary directory on free loopback
//! ports, and can stop, kill, restart and wipe it, so tests can break the registry for real.
//! The client port stays the same across restarts, as an etcd Service address would.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct EtcdServer {
    binary: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

impl EtcdServer {
    /// A running etcd, or `None` (with the reason printed) when no etcd binary is installed.
    /// `ETCD_BIN` overrides the binary; else `etcd` on PATH.
    pub fn start_or_skip() -> Option<EtcdServer> {
        let binary = match find_binary() {
            Some(binary) => binary,
            None => {
                eprintln!("SKIPPED: no etcd binary (install Debian's etcd-server or set ETCD_BIN)");
                return None;
            }
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dlengine-etcd-{}-{id}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("creating {}: {e}", dir.display());
        }
        let mut server = EtcdServer { binary, dir, client_port: free_port(), peer_port: free_port(), child: None };
        server.start();
        Some(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts the process (again) on the same ports and data directory and waits until it
    /// answers `/health`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let log = std::fs::File::create(self.dir.join("etcd.log")).expect("creating etcd.log");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&self.binary)
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.endpoint(), "--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning etcd");
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(20));
    }

    /// SIGKILL: no goodbye to clients, as a crashed or partitioned etcd.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill and restart keeping the data: leases and keys survive, streams break.
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// Kill, delete the data, restart: every key and lease is gone, as after losing etcd.
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
        self.start();
    }

    fn wait_healthy(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("etcd exited with {status}; see {}", self.dir.join("etcd.log").display());
                }
            }
            if health_ok(self.client_port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd did not become healthy in {limit:?}; see {}", self.dir.join("etcd.log").display());
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ETCD_BIN") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("etcd")).find(|candidate| candidate.is_file())
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local addr").port()
}

/// A raw HTTP GET of etcd's `/health`, so the harness needs no HTTP client.
fn health_ok(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}
