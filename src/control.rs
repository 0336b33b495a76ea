//! The local control socket: the `cli` origin. JSON lines over a Unix socket; a request is one
//! line, the answer one line per progress step (commands) or one line (queries).
//!
//! ```text
//! {"op":"locks"}                                        → [LockView, …]
//! {"op":"gateway"}                                      → {id, version, sessions, tedee, …}
//! {"op":"state","lock":"front"}                         → LockView
//! {"op":"watch"}                                        → a LockView line per change, until closed
//! {"op":"command","lock":"front","action":"unlock",
//!  "mode":"normal","id":"abc","ttl_s":30}               → Report lines until "step":"done"
//! {"op":"tedee_fetch","locks":["front"]}                → {"locks":[{lock, fetched, error…}]}
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::command::{Action, Mode, Report};
use crate::supervisor::{Request as CommandRequest, Supervisor};

#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Locks,
    /// The gateway's own status.
    Gateway,
    /// Stream every lock's view as it changes.
    Watch,
    State {
        lock: String,
    },
    Command {
        lock: String,
        action: Action,
        #[serde(default)]
        mode: Mode,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_s: Option<u64>,
    },
    /// Fetch certificates from Tedee now (`lockbridge tedee fetch`): these locks, by id or
    /// serial, or every lock when empty.
    TedeeFetch {
        #[serde(default)]
        locks: Vec<String>,
    },
}

/// How long `tedee_fetch` waits for the provider's answer (each call is bounded by
/// `request_timeout_s`; a few locks in a row fit).
const FETCH_ANSWER_LIMIT: Duration = Duration::from_secs(600);

pub const ORIGIN: &str = "cli";

/// Longest request line; a longer one is answered with an error and skipped.
pub const MAX_LINE: usize = 4096;

/// Bind the socket (replacing a stale one), mode 0660. Anything at the path that is not a
/// socket is refused, never deleted.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; move it away or set control.socket to another path",
                    path.display()
                ),
            ));
        }
        // A live daemon answers; a stale socket file from a crash does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use: is another lockbridge running?",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

pub async fn serve(listener: Arc<UnixListener>, supervisor: Arc<Supervisor>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let sup = supervisor.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, sup).await {
                        log::debug!("control connection: {e}");
                    }
                });
            }
            Err(e) => {
                log::warn!("control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Read one line of at most [`MAX_LINE`] bytes: `Ok(None)` at the end, `Err(n)` for a longer
/// line (its `n` bytes are skipped up to the next newline).
async fn read_line<R: AsyncBufReadExt + Unpin>(
    rd: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<Option<Result<(), usize>>> {
    line.clear();
    let mut skipped = 0usize;
    loop {
        let buf = rd.fill_buf().await?;
        if buf.is_empty() {
            return Ok((!line.is_empty() || skipped > 0).then_some(if skipped > 0 {
                Err(skipped)
            } else {
                Ok(())
            }));
        }
        let (chunk, newline) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i)),
            None => (buf, None),
        };
        if skipped == 0 && line.len() + chunk.len() <= MAX_LINE {
            line.extend_from_slice(chunk);
        } else {
            skipped += line.len() + chunk.len();
            line.clear();
        }
        let used = newline.map_or(chunk.len(), |i| i + 1);
        rd.consume(used);
        if newline.is_some() {
            return Ok(Some(if skipped > 0 { Err(skipped) } else { Ok(()) }));
        }
    }
}

async fn handle(stream: UnixStream, supervisor: Arc<Supervisor>) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::new();
    while let Some(read) = read_line(&mut rd, &mut line).await? {
        if let Err(n) = read {
            let msg = serde_json::json!({
                "error": format!("bad request: a line of {n} bytes; requests are at most {MAX_LINE} bytes")
            });
            wr.write_all(format!("{msg}\n").as_bytes()).await?;
            continue;
        }
        let request: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                let msg = serde_json::json!({"error": format!("bad request: {e}")});
                wr.write_all(format!("{msg}\n").as_bytes()).await?;
                continue;
            }
        };
        match request {
            Request::Locks => {
                let all = supervisor.registry().all();
                write_json(&mut wr, &all).await?;
            }
            Request::Gateway => write_json(&mut wr, &supervisor.status()).await?,
            Request::Watch => {
                let mut events = supervisor.registry().subscribe();
                loop {
                    match events.recv().await {
                        Ok(crate::registry::GatewayEvent::LockChanged { lock }) => {
                            write_json(&mut wr, &lock).await?
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            // A slow reader is told, not blocked on: state is current again
                            // with the next change.
                            write_json(&mut wr, &serde_json::json!({"lagged": n})).await?;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                    }
                }
            }
            Request::State { lock } => match supervisor.registry().get(&lock) {
                Some(v) => write_json(&mut wr, &v).await?,
                None => {
                    write_json(
                        &mut wr,
                        &serde_json::json!({"error": format!("unknown lock {lock:?}")}),
                    )
                    .await?
                }
            },
            Request::TedeeFetch { locks } => {
                let answer = tedee_fetch(&supervisor, locks).await;
                write_json(&mut wr, &answer).await?;
            }
            Request::Command {
                lock,
                action,
                mode,
                id,
                ttl_s,
            } => {
                let ttl = match ttl_s.map(crate::command::ttl_from_secs).transpose() {
                    Ok(ttl) => ttl,
                    Err(e) => {
                        let report = Report {
                            id: id.unwrap_or_else(|| "-".into()),
                            lock,
                            action,
                            step: crate::command::Step::Done {
                                outcome: crate::command::Outcome::bad_request(e),
                            },
                            repeated: false,
                        };
                        write_json(&mut wr, &report).await?;
                        continue;
                    }
                };
                let mut rx = supervisor.submit(CommandRequest {
                    id,
                    lock,
                    action,
                    mode,
                    ttl,
                    origin: ORIGIN.into(),
                    source: None,
                });
                while let Some(report) = rx.recv().await {
                    let done = report.outcome().is_some();
                    write_json(&mut wr, &report).await?;
                    if done {
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}

/// `tedee_fetch`: the names resolved against the config, then the provider's answer.
async fn tedee_fetch(supervisor: &Supervisor, names: Vec<String>) -> serde_json::Value {
    let config = supervisor.config();
    if config.credentials.provider != crate::config::Provider::Tedee {
        return serde_json::json!({"error":
            "credentials.provider is not \"tedee\": only the tedee provider fetches certificates"
        });
    }
    let mut serials = Vec::new();
    for name in &names {
        match config
            .locks
            .iter()
            .find(|l| &l.id == name || &l.serial == name)
        {
            Some(l) => serials.push(l.serial.clone()),
            None => {
                return serde_json::json!({"error": format!(
                    "unknown lock {:?}; configured: {}",
                    name.chars().take(64).collect::<String>(),
                    config.locks.iter().map(|l| l.id.as_str()).collect::<Vec<_>>().join(", ")
                )});
            }
        }
    }
    let Some(rx) = supervisor.credentials().fetch_now(serials) else {
        return serde_json::json!({"error": "the Tedee provider is not running"});
    };
    match tokio::time::timeout(FETCH_ANSWER_LIMIT, rx).await {
        Ok(Ok(locks)) => serde_json::json!({ "locks": locks }),
        Ok(Err(_)) => serde_json::json!({"error": "the Tedee provider stopped"}),
        Err(_) => serde_json::json!({"error": "no answer from the Tedee provider in 10 minutes"}),
    }
}

async fn write_json<W: AsyncWriteExt + Unpin, T: Serialize>(
    w: &mut W,
    v: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// The client side, for `lockbridge local …` and tests.
pub struct ControlClient {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl ControlClient {
    pub async fn connect(path: &Path) -> std::io::Result<ControlClient> {
        let stream = UnixStream::connect(path).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "{}: {e} (is `lockbridge run` up? see control.socket in its config)",
                    path.display()
                ),
            )
        })?;
        let (rd, wr) = stream.into_split();
        Ok(ControlClient {
            lines: BufReader::new(rd).lines(),
            wr,
        })
    }

    pub async fn request(&mut self, req: &Request) -> std::io::Result<()> {
        write_json(&mut self.wr, req).await
    }

    pub async fn line(&mut self) -> std::io::Result<serde_json::Value> {
        let line = self.lines.next_line().await?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "daemon closed the connection",
            )
        })?;
        serde_json::from_str(&line).map_err(std::io::Error::other)
    }

    /// Send a command and collect its reports up to the terminal one.
    pub async fn command(&mut self, req: &Request) -> std::io::Result<Vec<Report>> {
        self.request(req).await?;
        let mut out = Vec::new();
        loop {
            let v = self.line().await?;
            let r: Report = serde_json::from_value(v).map_err(std::io::Error::other)?;
            let done = r.outcome().is_some();
            out.push(r);
            if done {
                return Ok(out);
            }
        }
    }
}

/// What `lockbridge local` asks the daemon.
pub enum LocalAsk {
    Locks,
    Gateway,
    Watch,
    State {
        lock: String,
    },
    /// A [`Request::Command`].
    Command(Request),
}

/// `lockbridge local`: ask the running daemon over its control socket, print the answer
/// (`--json`: as it came). `Err` when a command did not succeed.
pub async fn local(
    socket: &Path,
    json: bool,
    what: LocalAsk,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let mut client = ControlClient::connect(socket).await?;
    let request = match what {
        LocalAsk::Watch => {
            client.request(&Request::Watch).await?;
            loop {
                let v = client.line().await?;
                if json {
                    writeln!(out, "{v}")?;
                } else {
                    writeln!(
                        out,
                        "{:<16} {:<15} {}",
                        v["id"].as_str().unwrap_or("?"),
                        v["status"].as_str().unwrap_or("?"),
                        v["state"].as_str().unwrap_or("unknown")
                    )?;
                }
                out.flush()?;
            }
        }
        LocalAsk::Gateway => {
            client.request(&Request::Gateway).await?;
            let v = client.line().await?;
            if json {
                writeln!(out, "{v}")?;
            } else {
                writeln!(
                    out,
                    "gateway {} (lockbridge {}): {} of {} locks connected",
                    v["id"].as_str().unwrap_or("?"),
                    v["version"].as_str().unwrap_or("?"),
                    v["sessions"],
                    v["locks"]
                )?;
                let t = &v["tedee"];
                if !t.is_null() {
                    writeln!(
                        out,
                        "tedee: mobile {}, {} request(s) in the last hour{}{}",
                        t["mobile_id"].as_str().unwrap_or("not registered"),
                        t["requests_last_hour"],
                        t["paused_until"]
                            .as_u64()
                            .map(|ms| format!(", paused until {}", crate::clock::rfc3339(ms)))
                            .unwrap_or_default(),
                        t["last_error"]
                            .as_str()
                            .map(|e| format!("\n  last error: {e}"))
                            .unwrap_or_default()
                    )?;
                }
            }
            return Ok(());
        }
        LocalAsk::Locks | LocalAsk::State { .. } => {
            let req = match what {
                LocalAsk::State { lock } => Request::State { lock },
                LocalAsk::Locks | LocalAsk::Watch | LocalAsk::Gateway | LocalAsk::Command(_) => {
                    Request::Locks
                }
            };
            client.request(&req).await?;
            let v = client.line().await?;
            if let Some(e) = v.get("error") {
                anyhow::bail!("{}", e.as_str().unwrap_or("error"));
            }
            if json {
                writeln!(out, "{v}")?;
            } else {
                let list = v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]);
                for l in list {
                    writeln!(
                        out,
                        "{}  {}",
                        lock_line(&l),
                        l["last_error"].as_str().unwrap_or("")
                    )?;
                }
            }
            return Ok(());
        }
        LocalAsk::Command(request) => request,
    };
    let reports = client.command(&request).await?;
    let mut success = false;
    for r in &reports {
        if json {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        } else {
            match r.outcome() {
                None => writeln!(out, "{} {} {}: {:?}", r.action, r.lock, r.id, r.step)?,
                Some(o) => writeln!(
                    out,
                    "{} {} {}: {}{}",
                    r.action,
                    r.lock,
                    r.id,
                    serde_json::to_string(o)?,
                    if r.repeated { " (remembered)" } else { "" }
                )?,
            }
        }
        success |= matches!(r.outcome(), Some(crate::command::Outcome::Success { .. }));
    }
    if !success {
        anyhow::bail!("the command did not succeed");
    }
    Ok(())
}

/// One lock's view on one line: id, status, state, battery (and the door, when it has a sensor).
pub fn lock_line(v: &serde_json::Value) -> String {
    let mut line = format!(
        "{:<16} {:<15} {:<18} battery {:>4}",
        v["id"].as_str().unwrap_or("?"),
        v["status"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("unknown"),
        v["battery"]
            .as_u64()
            .map(|b| format!("{b}%"))
            .unwrap_or_else(|| "?".into())
    );
    // Only locks with a door sensor say where the door is.
    if let Some(door) = v["door"].as_str().filter(|d| *d != "unknown") {
        line.push_str(&format!("  door {door}"));
    }
    line
}
