//! The access log: one line per HTTP request and per TCP connection, in nginx's
//! `combined` format followed by allot's fields (`key=value`), or as JSON. Lines are
//! formatted on the request's path only when the log is on, and written by one task of
//! their own through a bounded channel: a slow disk never slows a request (lines that find
//! the channel full are dropped and counted). The file is reopened on request (SIGUSR1),
//! for logrotate.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use crate::config::{AccessFormat, AccessLogConfig};

/// Lines waiting to be written before new ones are dropped.
const CHANNEL_LINES: usize = 65_536;

/// One request or connection, as its line says it.
#[derive(Debug, Default)]
pub struct Entry {
    /// When it arrived.
    pub at: Option<SystemTime>,
    /// The client.
    pub client: Option<IpAddr>,
    /// HTTP: the method; TCP: `None`.
    pub method: Option<String>,
    /// HTTP: the target; TCP: the listener's name.
    pub target: String,
    /// HTTP: the status sent; TCP: `None`.
    pub status: Option<u16>,
    /// Bytes sent to the client (response body, or everything from the server).
    pub bytes_out: u64,
    /// Bytes received from the client (request body, or everything from the client).
    pub bytes_in: u64,
    /// `Referer`, `User-Agent` (HTTP).
    pub referer: Option<String>,
    /// `User-Agent` (HTTP).
    pub user_agent: Option<String>,
    /// Its class, once classified.
    pub class: Option<String>,
    /// Its back end, once one was chosen.
    pub backend: Option<String>,
    /// The back-end address it went to.
    pub address: Option<SocketAddr>,
    /// Time from arrival to service.
    pub queue: Duration,
    /// Time in service.
    pub service: Duration,
    /// Why it was refused or cut off (`queue_full`, `client_gone`, …), or how a
    /// connection closed.
    pub reason: Option<&'static str>,
}

enum Message {
    Line(String),
    Reopen,
}

/// An access log in force: its channel to the writer.
#[derive(Debug)]
pub struct AccessLog {
    config: AccessLogConfig,
    tx: mpsc::Sender<Message>,
    /// Lines dropped because the writer fell behind.
    pub dropped: AtomicU64,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Message::Line(_) => "Line",
            Message::Reopen => "Reopen",
        })
    }
}

impl AccessLog {
    /// Opens the log `config` describes and starts its writer (inside a tokio runtime;
    /// outside one, as in a configuration check, lines are dropped).
    pub fn open(config: &AccessLogConfig) -> std::io::Result<Arc<AccessLog>> {
        let (tx, rx) = mpsc::channel(CHANNEL_LINES);
        let sink = Sink::open(&config.path)?;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(write_lines(sink, rx));
        }
        Ok(Arc::new(AccessLog {
            config: config.clone(),
            tx,
            dropped: AtomicU64::new(0),
        }))
    }

    /// Whether this log is the one `config` describes.
    pub fn is(&self, config: &AccessLogConfig) -> bool {
        self.config == *config
    }

    /// Logs one entry (never waits).
    pub fn log(&self, e: &Entry) {
        let line = match self.config.format {
            AccessFormat::Combined => combined(e),
            AccessFormat::Json => json(e),
        };
        if self.tx.try_send(Message::Line(line)).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Asks the writer to reopen the file (after logrotate moved it).
    pub fn reopen(&self) {
        let _ = self.tx.try_send(Message::Reopen);
    }
}

enum Sink {
    Stdout,
    File(PathBuf, std::io::BufWriter<std::fs::File>),
}

impl Sink {
    fn open(path: &str) -> std::io::Result<Sink> {
        if path == "-" {
            return Ok(Sink::Stdout);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Sink::File(
            PathBuf::from(path),
            std::io::BufWriter::new(file),
        ))
    }

    fn write(&mut self, line: &str) {
        let _ = match self {
            Sink::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
            Sink::File(_, w) => w.write_all(line.as_bytes()),
        };
    }

    fn flush(&mut self) {
        let _ = match self {
            Sink::Stdout => std::io::stdout().lock().flush(),
            Sink::File(_, w) => w.flush(),
        };
    }
}

/// The writer: lines as they come, flushed whenever the channel is drained; reopens the
/// file on request. Ends when the log is replaced (every sender is gone).
async fn write_lines(mut sink: Sink, mut rx: mpsc::Receiver<Message>) {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(m) = next.take().or_else(|| rx.try_recv().ok()) {
            match m {
                Message::Line(l) => sink.write(&l),
                Message::Reopen => {
                    sink.flush();
                    if let Sink::File(path, _) = &sink {
                        match Sink::open(&path.to_string_lossy()) {
                            Ok(s) => sink = s,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot reopen the access log; writing to the old file")
                            }
                        }
                    }
                }
            }
        }
        sink.flush();
    }
    sink.flush();
}

/// Days since 1970-01-01 as (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// UTC parts of `at`: (year, month, day, hour, minute, second, millisecond).
fn parts(at: SystemTime) -> (i64, u32, u32, u64, u64, u64, u32) {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, mo, d) = civil((secs / 86_400) as i64);
    let s = secs % 86_400;
    (
        y,
        mo,
        d,
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_millis(),
    )
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `01/Dec/2026:21:00:00 +0000`, as the common log format writes time.
fn clf_time(at: SystemTime) -> String {
    let (y, mo, d, h, mi, s, _) = parts(at);
    format!(
        "{d:02}/{}/{y}:{h:02}:{mi:02}:{s:02} +0000",
        MONTHS[(mo - 1) as usize]
    )
}

/// `2026-12-01T21:00:00.123Z`.
fn rfc3339(at: SystemTime) -> String {
    let (y, mo, d, h, mi, s, ms) = parts(at);
    format!("{y}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
}

/// A field of the combined format: `-` when absent, quotes and backslashes escaped.
fn quoted(v: Option<&str>) -> String {
    match v {
        None | Some("") => "\"-\"".into(),
        Some(v) => {
            let mut out = String::with_capacity(v.len() + 2);
            out.push('"');
            for c in v.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if c.is_control() => {
                        let _ = write!(out, "\\x{:02x}", c as u32);
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn combined(e: &Entry) -> String {
    let at = e.at.unwrap_or_else(SystemTime::now);
    let request = match &e.method {
        Some(m) => format!("{m} {} HTTP/1.1", e.target),
        None => format!("TCP {}", e.target),
    };
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    format!(
        "{} - - [{}] {} {} {} {} {} class={} backend={} address={} queue_ms={} service_ms={} bytes_in={} reason={}\n",
        e.client.map_or("-".into(), |c| c.to_canonical().to_string()),
        clf_time(at),
        quoted(Some(&request)),
        e.status.map_or("-".into(), |s| s.to_string()),
        e.bytes_out,
        quoted(e.referer.as_deref()),
        quoted(e.user_agent.as_deref()),
        dash(e.class.clone()),
        dash(e.backend.clone()),
        dash(e.address.map(|a| a.to_string())),
        ms(e.queue),
        ms(e.service),
        e.bytes_in,
        e.reason.unwrap_or("-"),
    )
}

fn json(e: &Entry) -> String {
    let at = e.at.unwrap_or_else(SystemTime::now);
    let v = serde_json::json!({
        "time": rfc3339(at),
        "client": e.client.map(|c| c.to_canonical().to_string()),
        "kind": if e.method.is_some() { "http" } else { "tcp" },
        "method": e.method,
        "target": e.target,
        "status": e.status,
        "bytes_out": e.bytes_out,
        "bytes_in": e.bytes_in,
        "referer": e.referer,
        "user_agent": e.user_agent,
        "class": e.class,
        "backend": e.backend,
        "address": e.address.map(|a| a.to_string()),
        "queue_ms": e.queue.as_secs_f64() * 1e3,
        "service_ms": e.service.as_secs_f64() * 1e3,
        "reason": e.reason,
    });
    let mut line = v.to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_agree_with_the_http_date_of_the_same_instant() {
        for secs in [
            0u64,
            951_782_400,
            1_798_000_000,
            4_102_444_800,
            1_709_164_800,
        ] {
            let at = UNIX_EPOCH + Duration::from_secs(secs);
            let http = httpdate::fmt_http_date(at); // "Tue, 01 Dec 2026 21:00:00 GMT"
            let (y, mo, d, h, mi, s, _) = parts(at);
            let want = format!(
                "{d:02} {} {y} {h:02}:{mi:02}:{s:02} GMT",
                MONTHS[(mo - 1) as usize]
            );
            assert!(http.ends_with(&want), "{http} vs {want}");
        }
        let at = UNIX_EPOCH + Duration::from_millis(1_796_158_800_123);
        assert_eq!(rfc3339(at), "2026-12-01T21:00:00.123Z");
        assert_eq!(clf_time(at), "01/Dec/2026:21:00:00 +0000");
    }

    #[test]
    fn lines_name_every_field_and_escape_what_they_quote() {
        let e = Entry {
            at: Some(UNIX_EPOCH + Duration::from_millis(1_796_158_800_123)),
            client: Some("192.0.2.7".parse().unwrap()),
            method: Some("GET".into()),
            target: "/a\"b".into(),
            status: Some(503),
            bytes_out: 42,
            user_agent: Some("curl/8".into()),
            class: Some("basic".into()),
            queue: Duration::from_micros(1500),
            reason: Some("queue_full"),
            ..Entry::default()
        };
        assert_eq!(
            combined(&e),
            "192.0.2.7 - - [01/Dec/2026:21:00:00 +0000] \"GET /a\\\"b HTTP/1.1\" 503 42 \"-\" \"curl/8\" \
             class=basic backend=- address=- queue_ms=1.500 service_ms=0.000 bytes_in=0 reason=queue_full\n"
        );
        let j: serde_json::Value = serde_json::from_str(&json(&e)).unwrap();
        assert_eq!(j["status"], 503);
        assert_eq!(j["reason"], "queue_full");
        assert_eq!(j["kind"], "http");
        assert_eq!(j["time"], "2026-12-01T21:00:00.123Z");
    }
}
