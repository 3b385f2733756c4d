//! A real PostgreSQL for a test: Debian's `postgresql` (`/usr/lib/postgresql/*/bin`),
//! `initdb` into a temp dir and `pg_ctl start` on a free loopback port, run as the
//! `postgres` user when the tests run as root (root cannot run it); stopped when
//! dropped. The `postgres` role's password is [`PASSWORD`] over TCP (scram-sha-256);
//! the unix socket trusts, for the test's own `psql`.
//!
//! Without the server installed a test prints `SKIPPED` and returns, except in CI
//! (`CI` set), where it fails: `.ci/run` installs it.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::certs::Certs;

pub const PASSWORD: &str = "sf-pg-test";

pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    /// Whether the tests run as root (the server then runs as `postgres`).
    as_postgres: bool,
}

/// The newest installed server's bin dir.
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop()
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("bound address").port()
}

impl Postgres {
    /// A fresh server, or `None` after saying the test is skipped.
    pub fn start() -> Option<Postgres> {
        Postgres::with_tls(None)
    }

    /// A fresh server that also speaks TLS with these certificates (the server's, and
    /// the CA it trusts for client certificates): `hostssl` with a password, and the
    /// role `certuser` logs in by its client certificate alone.
    pub fn with_tls(certs: Option<&Certs>) -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            super::skip("PostgreSQL is not installed; apt-get install postgresql to run this test");
            return None;
        };
        let as_postgres = rustix::process::geteuid().is_root();
        let dir = tempfile::Builder::new()
            .prefix("sf-pg")
            .tempdir_in("/tmp")
            .expect("temp dir");
        fs::write(dir.path().join("pw"), PASSWORD).expect("password file");
        if as_postgres {
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(chown.success());
        }
        let pg = Postgres {
            bin,
            port: free_port(),
            dir,
            as_postgres,
        };
        let data = pg.data();
        let out = pg.as_server(&pg.bin.join("initdb"), |c| {
            c.arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                ])
                .arg(format!("--pwfile={}", pg.dir.path().join("pw").display()));
        });
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            pg.port,
            pg.dir.path().display()
        );
        if let Some(certs) = certs {
            let copy = |from: &Path, name: &str| {
                let to = pg.dir.path().join(name);
                fs::copy(from, &to).expect("copy a PEM file");
                fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .expect("chmod");
                if pg.as_postgres {
                    let chown = Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(&to)
                        .status();
                    assert!(chown.expect("chown").success());
                }
                to
            };
            let (cert, key, ca) = (
                copy(&certs.server, "server.pem"),
                copy(&certs.server_key, "server-key.pem"),
                copy(&certs.ca, "ca.pem"),
            );
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c ssl_ca_file={}",
                cert.display(),
                key.display(),
                ca.display()
            ));
            let hba = data.join("pg_hba.conf");
            let rules = "local all all trust\n\
                         hostssl all certuser 127.0.0.1/32 cert\n\
                         hostssl all all 127.0.0.1/32 scram-sha-256\n";
            fs::write(&hba, rules).expect("pg_hba.conf");
        }
        let log = pg.dir.path().join("log");
        let out = pg.as_server(&pg.bin.join("pg_ctl"), |c| {
            c.args(["-w", "-D"])
                .arg(&data)
                .args(["-o", &options, "-l"])
                .arg(&log)
                .arg("start");
        });
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(&log).unwrap_or_default()
        );
        if certs.is_some() {
            pg.psql("CREATE ROLE certuser LOGIN SUPERUSER");
        }
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn as_server(&self, program: &Path, args: impl FnOnce(&mut Command)) -> Output {
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        args(&mut command);
        command
            .current_dir("/tmp")
            .output()
            .expect("run a PostgreSQL tool")
    }

    /// The backend URL (plain TCP, the password from PGPASSWORD).
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Runs SQL through `psql` on the socket; its output, unaligned, tuples only.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
                sql,
            ])
            .env("PGPASSFILE", "/dev/null")
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The postmaster and its backends.
    fn pids(&self) -> Vec<i32> {
        let pidfile =
            fs::read_to_string(self.data().join("postmaster.pid")).expect("postmaster.pid");
        let main: i32 = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("pid");
        let mut pids = vec![main];
        for entry in fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(main) {
                pids.push(pid);
            }
        }
        pids
    }

    fn signal(&self, signal: i32) {
        for pid in self.pids() {
            // SAFETY: kill(2) on a pid of this test's server.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Freezes the server (SIGSTOP to the postmaster and every backend).
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }
}

/// PgBouncer in transaction mode in front of a test server (Debian's `pgbouncer`),
/// stopped when dropped.
pub struct Bouncer {
    pub port: u16,
    pidfile: PathBuf,
}

impl Postgres {
    /// PgBouncer with `pool_mode = transaction` on a free port, or `None` after saying
    /// the test is skipped.
    pub fn bouncer(&self) -> Option<Bouncer> {
        let binary = Path::new("/usr/sbin/pgbouncer");
        if !binary.is_file() {
            super::skip("pgbouncer is not installed; apt-get install pgbouncer to run this test");
            return None;
        }
        let port = free_port();
        let dir = self.dir.path();
        let ini = dir.join("pgbouncer.ini");
        let pidfile = dir.join("pgbouncer.pid");
        fs::write(
            dir.join("userlist.txt"),
            format!("\"postgres\" \"{PASSWORD}\"\n"),
        )
        .expect("userlist");
        fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {}\n\
                 pool_mode = transaction\nmax_client_conn = 200\ndefault_pool_size = 5\n\
                 logfile = {}\npidfile = {}\n",
                self.port,
                dir.join("userlist.txt").display(),
                dir.join("pgbouncer.log").display(),
                pidfile.display()
            ),
        )
        .expect("pgbouncer.ini");
        if self.as_postgres {
            for file in ["pgbouncer.ini", "userlist.txt"] {
                let chown = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(dir.join(file))
                    .status();
                assert!(chown.expect("chown").success());
            }
        }
        let out = self.as_server(binary, |c| {
            c.arg("-d").arg(&ini);
        });
        assert!(
            out.status.success(),
            "pgbouncer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        super::wait_until("pgbouncer listens", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(Bouncer { port, pidfile })
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let pid = fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            // SAFETY: kill(2) on the pgbouncer this test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.thaw();
        let data = self.data();
        let _ = self.as_server(&self.bin.join("pg_ctl"), |c| {
            c.args(["-D"]).arg(&data).args(["-m", "immediate", "stop"]);
        });
    }
}
