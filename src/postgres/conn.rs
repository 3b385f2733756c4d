//! One session with PostgreSQL: tokio-postgres on a current-thread runtime of its own,
//! made when the backend is first used (never at startup, never on a local hit).
//! Every request is bounded by `--backend-timeout`; the notifications the session
//! receives (`LISTEN`) are kept for [`Conn::next_notification`]; its end (the server
//! closed it, or it broke) is seen by [`Conn::closed`].

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Config, Notification, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::url::{Host, PgUrl, SslMode};
use crate::values::format_duration;

/// Everything needed to open a session; cheap to clone.
#[derive(Clone)]
pub struct Settings {
    pub url: PgUrl,
    pub user: String,
    pub password: Option<String>,
    pub timeout: Duration,
    pub tls: Arc<rustls::ClientConfig>,
}

/// Why a request failed, as one line.
#[derive(Debug, Clone)]
pub struct PgError {
    pub message: String,
    /// The schema or a table is missing: created on first use, then tried again.
    pub missing_schema: bool,
    /// The session is over (closed by the server, or broken).
    pub closed: bool,
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl PgError {
    pub fn new(message: impl Into<String>) -> PgError {
        PgError {
            message: message.into(),
            missing_schema: false,
            closed: false,
        }
    }

    pub fn of_client(e: &tokio_postgres::Error) -> PgError {
        let missing_schema = matches!(
            e.code(),
            Some(&SqlState::INVALID_SCHEMA_NAME | &SqlState::UNDEFINED_TABLE)
        );
        let message = match e.as_db_error() {
            Some(db) => format!("PostgreSQL said {}: {}", db.severity(), db.message()),
            None => {
                let mut message = e.to_string();
                let mut source = std::error::Error::source(e);
                while let Some(cause) = source {
                    message.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                message
            }
        };
        PgError {
            message,
            missing_schema,
            closed: e.is_closed(),
        }
    }
}

/// A parameter of a request, with its type (no round trip to prepare a statement).
pub type Param<'a> = (&'a (dyn ToSql + Sync), Type);

/// One open session.
pub struct Conn {
    rt: Runtime,
    /// `None` only while dropped: dropping it ends the session politely.
    client: Option<Client>,
    /// The task that drives the session.
    driver: Option<tokio::task::JoinHandle<()>>,
    notes: mpsc::UnboundedReceiver<Notification>,
    /// Becomes `Some(why)` when the session ends.
    ended: watch::Receiver<Option<String>>,
    timeout: Duration,
    /// The channels it listens on.
    pub listening: Vec<String>,
    /// The server process that answered the statement that listened: another one
    /// answering later means a pooler hands statements to several.
    pub listener_pid: Option<i32>,
}

impl Conn {
    /// Opens a session: connects, logs in, negotiates TLS as `sslmode` says, all within
    /// the timeout (each of TCP connect and the rest).
    pub fn open(settings: &Settings, application_name: &str) -> Result<Conn, PgError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PgError::new(format!("cannot start the PostgreSQL client: {e}")))?;
        let url = &settings.url;
        let mut config = Config::new();
        config.user(&settings.user);
        if let Some(password) = &settings.password {
            config.password(password);
        }
        config.dbname(url.dbname.as_deref().unwrap_or(&settings.user));
        match &url.host {
            Host::Tcp(host) => config.host(host),
            #[cfg(unix)]
            Host::Socket(dir) => config.host_path(dir),
            #[cfg(not(unix))]
            Host::Socket(dir) => config.host(dir.to_string_lossy()),
        };
        config.port(url.port);
        config.application_name(url.application_name.as_deref().unwrap_or(application_name));
        config.connect_timeout(settings.timeout);
        config.ssl_mode(match url.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        let tls = MakeRustlsConnect::new((*settings.tls).clone());
        let timeout = settings.timeout;
        let connected =
            rt.block_on(async { tokio::time::timeout(timeout, config.connect(tls)).await });
        let (client, mut connection) = match connected {
            Err(_) => {
                return Err(PgError::new(format!(
                    "{url} did not answer within {}",
                    format_duration(timeout)
                )));
            }
            Ok(Err(e)) => {
                let mut error = PgError::of_client(&e);
                error.message = format!("cannot connect to {url}: {}", error.message);
                return Err(error);
            }
            Ok(Ok(pair)) => pair,
        };
        let (notify, notes) = mpsc::unbounded_channel();
        let (end, ended) = watch::channel(None);
        let driver = rt.spawn(async move {
            let why = std::future::poll_fn(|cx| {
                loop {
                    match connection.poll_message(cx) {
                        Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => {
                            let _ = notify.send(n);
                        }
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => {
                            return Poll::Ready(PgError::of_client(&e).message);
                        }
                        Poll::Ready(None) => {
                            return Poll::Ready("the server closed the connection".to_owned());
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
            })
            .await;
            let _ = end.send(Some(why));
        });
        Ok(Conn {
            rt,
            client: Some(client),
            driver: Some(driver),
            notes,
            ended,
            timeout,
            listening: Vec::new(),
            listener_pid: None,
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `request` within the timeout.
    pub fn run<'a, T, F>(&'a self, request: impl FnOnce(&'a Client) -> F) -> Result<T, PgError>
    where
        F: Future<Output = Result<T, tokio_postgres::Error>> + 'a,
    {
        let deadline = Instant::now() + self.timeout;
        self.run_until(deadline, request)
    }

    /// Runs `request`, giving up at `deadline`.
    pub fn run_until<'a, T, F>(
        &'a self,
        deadline: Instant,
        request: impl FnOnce(&'a Client) -> F,
    ) -> Result<T, PgError>
    where
        F: Future<Output = Result<T, tokio_postgres::Error>> + 'a,
    {
        let future = request(self.client());
        let limit = deadline.saturating_duration_since(Instant::now());
        match self
            .rt
            .block_on(async { tokio::time::timeout_at(deadline.into(), future).await })
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(PgError::of_client(&e)),
            Err(_) => Err(PgError::new(format!(
                "PostgreSQL did not answer within {}",
                format_duration(limit.max(Duration::from_millis(1)))
            ))),
        }
    }

    /// One statement with typed parameters: one round trip.
    pub fn query(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, PgError> {
        self.run(|client| client.query_typed(sql, params))
    }

    /// Statements without parameters, in one round trip.
    pub fn batch(&self, sql: &str) -> Result<(), PgError> {
        self.run(|client| client.batch_execute(sql))
    }

    /// Drops the notifications received so far.
    pub fn drain_notifications(&mut self) {
        while self.notes.try_recv().is_ok() {}
    }

    /// The next notification, waiting until `deadline`; `Ok(None)` at the deadline, an
    /// error if the session ended.
    pub fn next_notification(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<Notification>, PgError> {
        let notes = &mut self.notes;
        let ended = &mut self.ended;
        let got = self.rt.block_on(async {
            tokio::select! {
                note = notes.recv() => Ok(note),
                _ = tokio::time::sleep_until(deadline.into()) => Ok(None),
                why = ended.wait_for(Option::is_some) => Err(why.ok().and_then(|w| w.clone())),
            }
        });
        match got {
            Ok(note) => Ok(note),
            Err(why) => Err(PgError {
                message: why.unwrap_or_else(|| "the connection was closed".to_owned()),
                missing_schema: false,
                closed: true,
            }),
        }
    }

    /// Drives `future` on this session's runtime (the keeper's loop).
    pub fn block_on<T>(&self, future: impl Future<Output = T>) -> T {
        self.rt.block_on(future)
    }

    pub fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("the client lives until the session is dropped")
    }

    /// A receiver that becomes `Some(why)` when the session ends.
    pub fn ended(&self) -> watch::Receiver<Option<String>> {
        self.ended.clone()
    }
}

impl Drop for Conn {
    /// Ends the session with a Terminate message, as libpq does, so that the server
    /// does not log every call's end as a lost connection; at most 100ms.
    fn drop(&mut self) {
        self.client.take();
        if let Some(driver) = self.driver.take() {
            let limit = Duration::from_millis(100);
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(limit, driver).await });
        }
    }
}
