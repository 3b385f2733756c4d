//! A real etcd for a test: Debian's `etcd-server` binary on loopback ports picked at
//! run time, in a temp data dir, killed when dropped; one member or a cluster.
//!
//! No mocks: the tests talk to the etcd users run. Without `/usr/bin/etcd` a test
//! prints `SKIPPED: etcd not installed` and returns, except in CI (`CI` set), where a
//! missing etcd is a failure: `.ci/run` installs it.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::PATIENCE;

/// Where Debian's `etcd-server` installs etcd; `SINGLEFLIGHT_TEST_ETCD` overrides it.
const DEFAULT_BINARY: &str = "/usr/bin/etcd";
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

/// A running etcd cluster of one or more members on 127.0.0.1.
pub struct Etcd {
    binary: PathBuf,
    dir: tempfile::TempDir,
    token: String,
    members: Vec<Member>,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Etcd {
    /// One member; `None` if etcd is not installed (the skip has been said).
    pub fn start() -> Option<Etcd> {
        Etcd::cluster(1)
    }

    /// `size` members that form one cluster; `None` if etcd is not installed.
    pub fn cluster(size: usize) -> Option<Etcd> {
        let binary = binary()?;
        let mut last_error = String::new();
        for attempt in 0..START_TRIES {
            let dir = tempfile::tempdir().expect("temp dir for etcd");
            let ports = free_ports(2 * size);
            let members = (0..size)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client_port: ports[2 * i],
                    peer_port: ports[2 * i + 1],
                    child: None,
                })
                .collect();
            let mut etcd = Etcd {
                binary: binary.clone(),
                dir,
                token: format!("sf-test-{}-{attempt}", std::process::id()),
                members,
            };
            for i in 0..size {
                etcd.spawn(i);
            }
            match etcd.wait_healthy_all() {
                Ok(()) => return Some(etcd),
                Err(e) => last_error = e,
            }
        }
        panic!("etcd did not start in {START_TRIES} tries: {last_error}");
    }

    fn spawn(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let member = &self.members[i];
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
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
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log);
        // etcd reads every flag from ETCD_* variables too: none of the caller's apply.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(key);
            }
        }
        die_with_test(&mut command);
        let child = command.spawn().expect("etcd starts");
        self.members[i].child = Some(child);
    }

    /// `etcd://` URL of every member, in member order.
    pub fn url(&self) -> String {
        let members: Vec<String> = (0..self.members.len()).map(|i| self.addr(i)).collect();
        format!("etcd://{}", members.join(","))
    }

    /// `host:port` of member `i`'s client port.
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
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
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            let Ok(status) = post(&self.addr(i), "/v3/maintenance/status", "{}") else {
                continue;
            };
            let Ok(status) = serde_json::from_str::<serde_json::Value>(&status) else {
                continue;
            };
            let id = |v: &serde_json::Value| v.as_str().map(str::to_owned);
            let (Some(leader), Some(me)) =
                (id(&status["leader"]), id(&status["header"]["member_id"]))
            else {
                continue;
            };
            if leader == me {
                return Some(i);
            }
        }
        None
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
        let addr = self.addr(i);
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
