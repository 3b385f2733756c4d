//! A real etcd for a test: Debian's `etcd-server` binary on loopback ports picked at
//! run time, in a temp data dir, killed when dropped; one member or a cluster; plain
//! HTTP, or TLS (certificates from [`super::certs`]), with or without authentication
//! (set up with Debian's `etcdctl`, as a user would). Each member also serves plain
//! HTTP metrics and health on a port of its own, which the helpers read.
//!
//! No mocks: the tests talk to the etcd users run. Without `/usr/bin/etcd` a test
//! prints `SKIPPED: etcd not installed` and returns, except in CI (`CI` set), where a
//! missing etcd is a failure: `.ci/run` installs it.

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::PATIENCE;
use super::certs::Certs;

/// Where Debian's `etcd-server` installs etcd; `SINGLEFLIGHT_TEST_ETCD` overrides it.
const DEFAULT_BINARY: &str = "/usr/bin/etcd";
/// Where Debian's `etcd-client` installs etcdctl; `SINGLEFLIGHT_TEST_ETCDCTL` overrides it.
const DEFAULT_ETCDCTL: &str = "/usr/bin/etcdctl";
/// The password of etcd's `root` user where authentication is on.
pub const PASSWORD: &str = "sf-test-password";
/// Ports picked at run time may be taken by someone else before etcd binds them.
const START_TRIES: usize = 3;

/// The etcd binary, or `None` after saying the test is skipped.
pub fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("SINGLEFLIGHT_TEST_ETCD")
        .map_or_else(|| PathBuf::from(DEFAULT_BINARY), PathBuf::from);
    if path.is_file() {
        return Some(path);
    }
    super::skip(&format!(
        "etcd is not installed ({}); apt-get install etcd-server to run this test",
        path.display()
    ));
    None
}

/// The etcdctl binary, or `None` after saying the test is skipped.
pub fn etcdctl() -> Option<PathBuf> {
    let path = std::env::var_os("SINGLEFLIGHT_TEST_ETCDCTL")
        .map_or_else(|| PathBuf::from(DEFAULT_ETCDCTL), PathBuf::from);
    if path.is_file() {
        return Some(path);
    }
    super::skip(&format!(
        "etcdctl is not installed ({}); apt-get install etcd-client to run this test",
        path.display()
    ));
    None
}

/// How a test's etcd is to be secured.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// TLS on the client port (`etcd+https://`).
    pub tls: bool,
    /// TLS, and a client certificate signed by the test CA required.
    pub client_cert_auth: bool,
    /// Authentication on, with a `root` user whose password is [`PASSWORD`].
    pub auth: bool,
    /// `--auth-token simple --auth-token-ttl N`: a token unused for N seconds expires.
    pub token_ttl: Option<u32>,
    /// `--log-level debug`: where etcd says it authenticated a user (a login).
    pub debug_log: bool,
}

impl Options {
    /// TLS and authentication, as a production cluster would have.
    pub fn secure() -> Options {
        Options {
            tls: true,
            auth: true,
            ..Options::default()
        }
    }
}

/// A running etcd cluster of one or more members on 127.0.0.1.
pub struct Etcd {
    binary: PathBuf,
    dir: tempfile::TempDir,
    token: String,
    members: Vec<Member>,
    options: Options,
    certs: Option<Certs>,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    child: Option<Child>,
}

impl Etcd {
    /// One member; `None` if etcd is not installed (the skip has been said).
    pub fn start() -> Option<Etcd> {
        Etcd::cluster(1)
    }

    /// `size` members that form one cluster; `None` if etcd is not installed.
    pub fn cluster(size: usize) -> Option<Etcd> {
        Etcd::with(size, Options::default())
    }

    /// `size` members secured as `options` say; `None` if etcd (or, for
    /// authentication, etcdctl) is not installed.
    pub fn with(size: usize, options: Options) -> Option<Etcd> {
        let binary = binary()?;
        let etcdctl = if options.auth { Some(etcdctl()?) } else { None };
        let mut last_error = String::new();
        for attempt in 0..START_TRIES {
            let dir = tempfile::tempdir().expect("temp dir for etcd");
            let certs = (options.tls || options.client_cert_auth)
                .then(|| Certs::make(&dir.path().join("certs")));
            let ports = free_ports(3 * size);
            let members = (0..size)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client_port: ports[3 * i],
                    peer_port: ports[3 * i + 1],
                    metrics_port: ports[3 * i + 2],
                    child: None,
                })
                .collect();
            let mut etcd = Etcd {
                binary: binary.clone(),
                dir,
                token: format!("sf-test-{}-{attempt}", std::process::id()),
                members,
                options: options.clone(),
                certs,
            };
            for i in 0..size {
                etcd.spawn(i);
            }
            match etcd.wait_healthy_all() {
                Ok(()) => {
                    if let Some(etcdctl) = &etcdctl {
                        etcd.enable_auth(etcdctl);
                    }
                    return Some(etcd);
                }
                Err(e) => last_error = e,
            }
        }
        panic!("etcd did not start in {START_TRIES} tries: {last_error}");
    }

    /// Adds the `root` user and turns authentication on, with etcdctl.
    fn enable_auth(&self, etcdctl: &std::path::Path) {
        for args in [
            vec!["user", "add", "root", "--new-user-password", PASSWORD],
            vec!["auth", "enable"],
        ] {
            let mut command = Command::new(etcdctl);
            command
                .env("ETCDCTL_API", "3")
                .arg("--endpoints")
                .arg(self.etcdctl_endpoints())
                .args(self.etcdctl_tls_args())
                .args(&args);
            let out = command.output().expect("etcdctl runs");
            assert!(
                out.status.success(),
                "etcdctl {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// etcdctl's `--endpoints` value.
    pub fn etcdctl_endpoints(&self) -> String {
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .map(|i| format!("{scheme}://{}", self.addr(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// etcdctl's TLS options for this etcd.
    pub fn etcdctl_tls_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        if let Some(certs) = &self.certs {
            args.push("--cacert".into());
            args.push(certs.ca.clone().into_os_string());
            if self.options.client_cert_auth {
                args.push("--cert".into());
                args.push(certs.client.clone().into_os_string());
                args.push("--key".into());
                args.push(certs.client_key.clone().into_os_string());
            }
        }
        args
    }

    /// The certificates, where TLS is on.
    pub fn certs(&self) -> Option<&Certs> {
        self.certs.as_ref()
    }

    /// The environment a singleflight needs to use this etcd: its TLS files and login
    /// (the backend URL is [`Etcd::url`]).
    pub fn client_env(&self) -> Vec<(&'static str, OsString)> {
        let mut env = Vec::new();
        if let Some(certs) = &self.certs {
            env.push((
                "SINGLEFLIGHT_ETCD_CACERT",
                certs.ca.clone().into_os_string(),
            ));
            if self.options.client_cert_auth {
                env.push((
                    "SINGLEFLIGHT_ETCD_CERT",
                    certs.client.clone().into_os_string(),
                ));
                env.push((
                    "SINGLEFLIGHT_ETCD_KEY",
                    certs.client_key.clone().into_os_string(),
                ));
            }
        }
        if self.options.auth {
            env.push(("SINGLEFLIGHT_ETCD_USER", "root".into()));
            env.push(("SINGLEFLIGHT_ETCD_PASSWORD", PASSWORD.into()));
        }
        env
    }

    /// The value of a metric (a gauge or counter without labels) of member `i`.
    pub fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let text = get(&self.metrics_addr(i), "/metrics").ok()?;
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| {
                let (key, value) = line.split_once(' ')?;
                (key == name).then(|| value.trim().parse().ok())?
            })
    }

    /// How many logins the members have taken (checked the password of): the lines
    /// etcd logs for them at `--log-level debug` ([`Options::debug_log`]).
    pub fn logins(&self) -> usize {
        assert!(
            self.options.debug_log,
            "etcd logs logins at debug level only"
        );
        self.log_text().matches("authenticated a user").count()
    }

    /// [`Etcd::logins`] where etcd logs them ([`Options::debug_log`]), else `None`:
    /// for a message that says how many there were, whatever the etcd.
    pub fn logins_if_logged(&self) -> Option<usize> {
        self.options.debug_log.then(|| self.logins())
    }

    /// The whole log of every member, for a test that waits for a line in it.
    pub fn log_text(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                    .unwrap_or_default()
            })
            .collect()
    }

    fn spawn(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let member = &self.members[i];
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        let client = format!("{scheme}://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let metrics = format!("http://127.0.0.1:{}", member.metrics_port);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", member.name)))
            .expect("etcd log file");
        let mut command = Command::new(&self.binary);
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(self.dir.path().join(&member.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--listen-metrics-urls", &metrics])
            .args(["--logger", "zap"])
            // Info is where etcd says it deleted an expired token.
            .args([
                "--log-level",
                if self.options.debug_log {
                    "debug"
                } else if self.options.token_ttl.is_some() {
                    "info"
                } else {
                    "warn"
                },
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log);
        // etcd reads every flag from ETCD_* variables too: none of the caller's apply.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(key);
            }
        }
        if let Some(certs) = &self.certs {
            command
                .arg("--cert-file")
                .arg(&certs.server)
                .arg("--key-file")
                .arg(&certs.server_key);
            if self.options.client_cert_auth {
                command
                    .arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(&certs.ca);
            }
        }
        if let Some(ttl) = self.options.token_ttl {
            command
                .args(["--auth-token", "simple"])
                .args(["--auth-token-ttl", &ttl.to_string()]);
        }
        die_with_test(&mut command);
        let child = command.spawn().expect("etcd starts");
        self.members[i].child = Some(child);
    }

    /// `etcd://` URL of every member, in member order (`etcd+https://` with TLS).
    pub fn url(&self) -> String {
        let members: Vec<String> = (0..self.members.len()).map(|i| self.addr(i)).collect();
        let scheme = if self.certs.is_some() {
            "etcd+https"
        } else {
            "etcd"
        };
        format!("{scheme}://{}", members.join(","))
    }

    /// `host:port` of member `i`'s client port.
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// `host:port` of member `i`'s plain HTTP metrics and health port.
    pub fn metrics_addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].metrics_port)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// The pid of member `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Kills member `i` at once (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            signal(&child, libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes member `i` (SIGSTOP): its port still accepts connections, it answers
    /// nothing, as a hung or partitioned member would.
    pub fn pause(&self, i: usize) {
        let child = self.members[i].child.as_ref().expect("member runs");
        signal(child, libc::SIGSTOP);
        // kill(2) returns before every thread has stopped; on a loaded machine a thread
        // of etcd may still answer a call made right after. Wait until all have.
        super::wait_until("the etcd member stops", || all_stopped(child.id()));
    }

    /// Lets a paused member `i` go on (SIGCONT).
    pub fn resume(&self, i: usize) {
        let child = self.members[i].child.as_ref().expect("member runs");
        signal(child, libc::SIGCONT);
    }

    /// Starts a killed member `i` again on its data dir and ports.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} still runs");
        self.spawn(i);
        if let Err(e) = self.wait_healthy(i) {
            panic!("etcd member {i} did not come back: {e}");
        }
    }

    /// The index of the member that leads the cluster now, as the live members see it.
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len()).find(|&i| {
            self.members[i].child.is_some() && self.metric(i, "etcd_server_is_leader") == Some(1.0)
        })
    }

    /// Waits until a member elected leader answers as leader, and returns its index.
    pub fn wait_leader(&self) -> usize {
        let start = Instant::now();
        loop {
            if let Some(i) = self.leader() {
                return i;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "no etcd leader: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_healthy_all(&mut self) -> Result<(), String> {
        for i in 0..self.members.len() {
            self.wait_healthy(i)?;
        }
        Ok(())
    }

    /// Waits until member `i` says it is healthy (it has a leader), or has died.
    pub fn wait_healthy(&mut self, i: usize) -> Result<(), String> {
        let start = Instant::now();
        let addr = self.metrics_addr(i);
        loop {
            if let Ok(answer) = get(&addr, "/health")
                && answer.contains(r#""health":"true""#)
            {
                return Ok(());
            }
            let child = self.members[i].child.as_mut().expect("member started");
            if let Ok(Some(status)) = child.try_wait() {
                self.members[i].child = None;
                return Err(format!("member {i} exited ({status}): {}", self.logs()));
            }
            if start.elapsed() > PATIENCE {
                return Err(format!("member {i} not healthy: {}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of every member's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for member in &self.members {
            let log = fs::read_to_string(self.dir.path().join(format!("{}.log", member.name)))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            text.push_str(&format!("\n--- {} ---\n", member.name));
            for line in tail.iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Whether every thread of `pid` is stopped (state `T` in `/proc/PID/task/*/stat`).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
    })
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on the pid of our own unreaped child, which cannot be reused.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

/// etcd gets SIGKILL if the test thread that started it dies without dropping it
/// (Linux; elsewhere there is no death signal and `Drop` alone stops it).
#[cfg(not(target_os = "linux"))]
fn die_with_test(_command: &mut Command) {}

/// etcd gets SIGKILL if the test thread that started it dies without dropping it.
#[cfg(target_os = "linux")]
fn die_with_test(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `count` distinct free loopback ports: all bound at once, then released for etcd.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("bound address").port())
        .collect()
}

/// A plain HTTP/1.0 request with a short timeout; the body of the answer.
fn request(addr: &str, head: &str, body: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "{head} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer
        .split_once("\r\n\r\n")
        .map_or(answer.clone(), |(_, body)| body.to_owned()))
}

pub fn get(addr: &str, path: &str) -> std::io::Result<String> {
    request(addr, &format!("GET {path}"), "")
}

pub fn post(addr: &str, path: &str, body: &str) -> std::io::Result<String> {
    request(addr, &format!("POST {path}"), body)
}
