//! Starts Debian's `etcd` (package `etcd-server`) in a temporary directory on free loopback
//! ports, and can stop, kill, restart and wipe it, so tests can break the registry for real.
//! The client port stays the same across restarts, as an etcd Service address would.
//! With TLS, certificates made by the `openssl` command-line tool for the occasion: etcd
//! serves https and requires a client certificate signed by the same test CA.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct EtcdServer {
    binary: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health`, also when clients must use TLS.
    metrics_port: u16,
    tls: Option<TlsFiles>,
    child: Option<Child>,
}

/// PEM files of a test CA, etcd's server certificate (127.0.0.1) and a client certificate.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

impl EtcdServer {
    /// A running etcd, or `None` (with the reason printed) when no etcd binary is installed.
    /// `ETCD_BIN` overrides the binary; else `etcd` on PATH.
    pub fn start_or_skip() -> Option<EtcdServer> {
        let (binary, dir) = prepare()?;
        Some(EtcdServer::launch(binary, dir, None))
    }

    /// The same over TLS with client-certificate authentication; also `None` when the
    /// `openssl` tool is missing.
    pub fn start_tls_or_skip() -> Option<EtcdServer> {
        let (binary, dir) = prepare()?;
        let tls = match make_certificates(&dir) {
            Ok(tls) => tls,
            Err(why) => {
                eprintln!("SKIPPED: making test certificates with openssl: {why}");
                return None;
            }
        };
        Some(EtcdServer::launch(binary, dir, Some(tls)))
    }

    fn launch(binary: PathBuf, dir: PathBuf, tls: Option<TlsFiles>) -> EtcdServer {
        let (client_port, peer_port, metrics_port) = (free_port(), free_port(), free_port());
        let mut server = EtcdServer { binary, dir, client_port, peer_port, metrics_port, tls, child: None };
        server.start();
        server
    }

    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Starts the process (again) on the same ports and data directory and waits until it
    /// answers `/health`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let log = std::fs::File::create(self.dir.join("etcd.log")).expect("creating etcd.log");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(&self.binary);
        command
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.endpoint(), "--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", self.metrics_port)])
            .args(["--logger", "zap", "--log-level", "warn"]);
        if let Some(tls) = &self.tls {
            command.arg("--cert-file").arg(&tls.server_cert).arg("--key-file").arg(&tls.server_key);
            command.arg("--client-cert-auth").arg("--trusted-ca-file").arg(&tls.ca);
        }
        let child = command
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
            if health_ok(self.metrics_port) {
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

/// The etcd binary and a fresh working directory, or `None` with the reason printed.
fn prepare() -> Option<(PathBuf, PathBuf)> {
    let Some(binary) = find_binary() else {
        eprintln!("SKIPPED: no etcd binary (install Debian's etcd-server or set ETCD_BIN)");
        return None;
    };
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("dlengine-etcd-{}-{id}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("creating {}: {e}", dir.display());
    }
    Some((binary, dir))
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, valid for a day.
fn make_certificates(dir: &Path) -> Result<TlsFiles, String> {
    let file = |name: &str| dir.join(name);
    let openssl = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl").args(args).current_dir(dir).output().map_err(|e| format!("running openssl: {e}"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr))),
        }
    };
    openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=dlengine test CA", "-keyout", "ca.key", "-out", "ca.crt"])?;
    for (name, cn, extensions) in [
        ("server", "etcd", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "dlengine", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (key, csr, crt, ext) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        std::fs::write(file(&ext), extensions).map_err(|e| format!("writing {ext}: {e}"))?;
        openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", &format!("/CN={cn}"), "-keyout", &key, "-out", &csr])?;
        openssl(&["x509", "-req", "-in", &csr, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-extfile", &ext, "-out", &crt])?;
    }
    Ok(TlsFiles {
        ca: file("ca.crt"),
        client_cert: file("client.crt"),
        client_key: file("client.key"),
        server_cert: file("server.crt"),
        server_key: file("server.key"),
    })
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
