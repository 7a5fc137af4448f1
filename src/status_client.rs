//! `apilb status`: fetches `/status` from the running agent and prints it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::status::{DiscoveryStatus, HaproxyStatus, MasterStatus, Status};

/// Why the status could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Nothing listens: no agent runs with this config.
    #[error(
        "no apilb agent is answering on {addr} ({source}). Is it running? Try `systemctl status apilb` \
         or `journalctl -u apilb`"
    )]
    NotRunning {
        /// The address tried.
        addr: SocketAddr,
        /// The connection error.
        #[source]
        source: std::io::Error,
    },
    /// Something answered, but not like an apilb agent.
    #[error("{addr} did not answer like an apilb agent: {message}")]
    BadAnswer {
        /// The address tried.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
}

/// Where to reach an agent whose metrics listen on `listen`: a wildcard
/// address is reached through loopback.
pub fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Fetches the agent's status.
pub async fn fetch(addr: SocketAddr) -> Result<Status, StatusError> {
    let bad = |message: String| StatusError::BadAnswer { addr, message };
    let exchange = async {
        let tcp =
            TcpStream::connect(addr).await.map_err(|source| StatusError::NotRunning { addr, source })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| bad(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::get("/status")
            .header("host", addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| bad(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| bad(e.to_string()))?;
        let code = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| bad(e.to_string()))?.to_bytes();
        if !code.is_success() {
            return Err(bad(format!("HTTP {code}")));
        }
        serde_json::from_slice::<Status>(&body).map_err(|e| bad(e.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| Err(bad("no answer within 5s".into())))
}

fn ago(seconds: Option<f64>) -> String {
    let Some(at) = seconds else {
        return "never".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(at);
    duration((now - at).max(0.0) as u64) + " ago"
}

fn duration(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// The human-readable report printed by `apilb status`.
pub fn render_table(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "apilb {} — local endpoint {} — {}", s.version, s.listen, s.summary());
    let ready = match s.readiness() {
        Ok(()) => "ready".to_owned(),
        Err(why) => format!("NOT READY: {why}"),
    };
    let _ = writeln!(out, "{ready}\n");
    masters_table(&mut out, s);
    haproxy_lines(&mut out, &s.haproxy);
    config_lines(&mut out, s);
    if let Some(d) = &s.discovery {
        discovery_lines(&mut out, d);
    }
    if let Some(e) = &s.config.pending_error {
        let _ = writeln!(out, "NOT APPLIED: {e}");
    }
    out
}

/// The masters, one aligned row each.
fn masters_table(out: &mut String, s: &Status) {
    use std::fmt::Write;
    let header = ["MASTER", "ADDRESS", "SOURCE", "STATE", "SINCE", "LAST CHECK", "SESSIONS"];
    let rows: Vec<[String; 7]> = s.masters.iter().map(master_row).collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(l, "{c:<w$}  ", w = widths[i]);
        }
        l.trim_end().to_owned()
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for r in &rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
}

/// One master's cells: name, address, source, state, since, last check,
/// sessions.
fn master_row(m: &MasterStatus) -> [String; 7] {
    let mut check = m.check_status.clone();
    if let Some(code) = m.check_code {
        check.push_str(&format!(" {code}"));
    }
    if !m.check_desc.is_empty() {
        check.push_str(&format!(" ({})", m.check_desc));
    }
    if !m.check_info.is_empty() && m.check_code.is_none() {
        check.push_str(&format!(": {}", m.check_info));
    }
    if let Some(ms) = m.check_duration_ms {
        check.push_str(&format!(" {ms}ms"));
    }
    let mut sessions = m.sessions.to_string();
    if m.fallback_sessions > 0 {
        sessions.push_str(&format!(" (+{} fail-open)", m.fallback_sessions));
    }
    [
        m.name.clone(),
        m.address.clone(),
        m.source.to_string(),
        m.state.to_string(),
        m.since_change_s.map(duration).unwrap_or_default(),
        check,
        sessions,
    ]
}

/// HAProxy's processes, and a failed last reload.
fn haproxy_lines(out: &mut String, h: &HaproxyStatus) {
    use std::fmt::Write;
    let pid = h.master_pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    let join = |v: &[u32]| {
        if v.is_empty() { "-".to_owned() } else { v.iter().map(u32::to_string).collect::<Vec<_>>().join(",") }
    };
    let _ = writeln!(
        out,
        "\nHAProxy {}: {} — master {pid}, workers {}, old workers {}{}, restarts {}",
        h.version,
        if h.running { "running" } else { "NOT RUNNING" },
        join(&h.workers),
        join(&h.old_workers),
        if h.adopted { " (adopted)" } else { "" },
        h.restarts
    );
    if h.last_reload_failed {
        let _ = writeln!(
            out,
            "HAProxy's last reload failed: worker {} from before it serves on (HAProxy 3.1+: recovery mode)",
            join(&h.workers)
        );
    }
}

/// The check's credential, the config in effect and the last reload.
fn config_lines(out: &mut String, s: &Status) {
    use std::fmt::Write;
    let c = &s.config;
    let _ = writeln!(
        out,
        "Check: {} credential ({}), certificates {}",
        s.check.auth,
        s.check.source,
        if s.check.verified { "verified" } else { "NOT verified" }
    );
    let _ = writeln!(
        out,
        "Config: {} sha256:{} applied {}",
        c.path,
        c.hash.get(..12).unwrap_or(&c.hash),
        ago(c.applied_at)
    );
    if let Some(r) = &c.last_reload {
        let _ = writeln!(
            out,
            "Last reload: {} {}{}",
            r.result,
            ago(Some(r.at)),
            r.message.as_ref().map(|m| format!(": {m}")).unwrap_or_default()
        );
    }
}

/// Discovery's state and what it refused.
fn discovery_lines(out: &mut String, d: &DiscoveryStatus) {
    use std::fmt::Write;
    let when = match d.last_success {
        Some(t) => format!("last success {}", ago(Some(t))),
        None => "not succeeded yet (using the static seeds and the saved set)".to_owned(),
    };
    let api = if d.api.is_empty() { String::new() } else { format!(" ({})", d.api) };
    let _ = writeln!(out, "Discovery{api}: {when}, {} watch restarts", d.watch_restarts);
    // Text from the API: escaped again, whatever agent served it.
    let safe = |t: &str| crate::sanitize::untrusted(t, 400);
    if let Some(r) = &d.rejected {
        let _ = writeln!(out, "  REJECTED: {}", safe(r));
    }
    if let Some(e) = &d.last_error {
        let _ = writeln!(out, "  last problem: {}", safe(e));
    }
    for r in &d.refused {
        let _ = writeln!(out, "  refused: {}", safe(r));
    }
}
