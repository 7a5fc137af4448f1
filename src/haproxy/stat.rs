//! Parsers for the runtime API's answers: `show proc` (master CLI) and
//! `show stat` (stats socket, CSV).

use std::collections::HashMap;

/// A parse failure: the answer did not have the expected shape.
#[derive(Debug, thiserror::Error)]
#[error("unexpected answer to `{command}`: {problem}")]
pub struct ParseError {
    /// The command whose answer was parsed.
    pub command: &'static str,
    /// What was wrong.
    pub problem: String,
}

/// One process listed by `show proc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    /// Its pid.
    pub pid: u32,
    /// Reloads it has survived (workers) or performed (master).
    pub reloads: u64,
}

/// The master's view of its processes (`show proc`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcInfo {
    /// The master's pid.
    pub master_pid: u32,
    /// Reload attempts since the master started, failed ones included.
    pub reloads: u64,
    /// Reloads that failed (the previous worker kept serving).
    pub failed_reloads: u64,
    /// Current workers (normally one).
    pub workers: Vec<Proc>,
    /// Workers from before a reload, still finishing connections (and,
    /// on 3.1+ after a failed reload, the worker that still serves: see
    /// [`ProcInfo::recovery`]).
    pub old_workers: Vec<Proc>,
    /// The master's version as it runs (the binary on disk may be newer:
    /// a master re-executes it only on reload).
    pub version: Option<super::Version>,
}

impl ProcInfo {
    /// True when the master reports that its last reload failed: the
    /// previous worker serves on. Every version resets the counter at the
    /// next successful reload.
    pub fn last_reload_failed(&self) -> bool {
        self.failed_reloads > 0
    }

    /// HAProxy 3.1+'s "recovery mode": the last reload failed and the
    /// worker that still serves is listed under `# old workers`, with no
    /// current worker. (2.6 to 3.0 keep it under `# workers`.)
    pub fn recovery(&self) -> bool {
        self.workers.is_empty() && self.last_reload_failed() && !self.old_workers.is_empty()
    }

    /// The workers that accept new connections: the current ones or, in
    /// recovery mode, the newest old worker (it survived the fewest
    /// reloads; the others are draining).
    pub fn serving(&self) -> Vec<Proc> {
        if !self.recovery() {
            return self.workers.clone();
        }
        self.old_workers.iter().min_by_key(|w| w.reloads).cloned().into_iter().collect()
    }

    /// Old workers only finishing their connections.
    pub fn draining(&self) -> Vec<Proc> {
        let serving = self.serving();
        self.old_workers.iter().filter(|w| !serving.contains(w)).cloned().collect()
    }
}

/// Parses `show proc` as printed by HAProxy 2.6 to 3.3 (3.1+ omits
/// `# programs` when there are none, and may list `# old workers` empty):
///
/// ```text
/// #<PID>          <type>          <reloads>       <uptime>        <version>
/// 24050           master          5 [failed: 1]   0d00h00m57s     2.6.12-1+deb12u3
/// # workers
/// 24484           worker          1               0d00h00m16s     2.6.12-1+deb12u3
/// # old workers
/// 24305           worker          1               0d00h00m20s     2.6.12-1+deb12u3
/// # programs
/// ```
pub fn parse_show_proc(text: &str) -> Result<ProcInfo, ParseError> {
    let err = |problem: String| ParseError { command: "show proc", problem };
    let mut master: Option<(u32, u64, u64)> = None;
    let mut workers = Vec::new();
    let mut old_workers = Vec::new();
    let mut section = "";
    let mut version = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(header) = line.strip_prefix('#') {
            section = match header.trim() {
                "workers" => "workers",
                "old workers" => "old",
                "programs" => "programs",
                _ => section,
            };
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let pid = fields
            .first()
            .and_then(|p| p.parse::<u32>().ok())
            .ok_or_else(|| err(format!("bad line {line:?}")))?;
        let reloads = fields.get(2).and_then(|r| r.parse::<u64>().ok()).unwrap_or(0);
        match fields.get(1).copied() {
            Some("master") => {
                let failed = line
                    .split_once("[failed:")
                    .and_then(|(_, rest)| rest.split(']').next())
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                master = Some((pid, reloads, failed));
                version = fields.last().and_then(|v| super::Version::parse(v));
            }
            Some("worker") if section == "workers" => workers.push(Proc { pid, reloads }),
            Some("worker") if section == "old" => old_workers.push(Proc { pid, reloads }),
            _ => {}
        }
    }
    let (master_pid, reloads, failed_reloads) =
        master.ok_or_else(|| err(format!("no master line in {text:?}")))?;
    Ok(ProcInfo { master_pid, reloads, failed_reloads, workers, old_workers, version })
}

/// The streams of `backend/server` whose server side is established, from
/// `show sess` (3.0's short form: `0x…: proto=tcpv4 src=… fe=… be=B srv=S
/// … scf=[8,…] scb=[8,…] …`, where 8 is the established state). Streams
/// still connecting are left out: they fail over by themselves.
pub fn established_sessions(text: &str, backend: &str, server: &str) -> Vec<String> {
    let (be, srv) = (format!(" be={backend} "), format!(" srv={server} "));
    text.lines()
        .filter(|l| l.contains(&be) && l.contains(&srv) && l.contains(" scb=[8,"))
        .filter_map(|l| l.split_once(':').map(|(id, _)| id.trim()))
        .filter(|id| id.starts_with("0x") && id.len() > 2 && id[2..].bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .collect()
}

/// A server's administrative and health state, simplified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ServerState {
    /// Checks pass (or the server has no check); in rotation.
    Up,
    /// Checks fail; out of rotation.
    Down,
    /// Administratively disabled (or waiting for DNS resolution).
    Maint,
    /// Draining: keeps its connections, gets no new ones.
    Drain,
}

impl ServerState {
    /// Every state, for one-hot metrics.
    pub const ALL: [ServerState; 4] =
        [ServerState::Up, ServerState::Down, ServerState::Maint, ServerState::Drain];

    /// As exported in metrics and status.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Up => "UP",
            ServerState::Down => "DOWN",
            ServerState::Maint => "MAINT",
            ServerState::Drain => "DRAIN",
        }
    }

    /// Maps `show stat`'s status column ("UP", "UP 1/2", "DOWN 1/2",
    /// "MAINT (resolution)", "no check", "NOLB", …).
    pub fn from_status(status: &str) -> ServerState {
        let s = status.trim();
        if s.starts_with("MAINT") {
            ServerState::Maint
        } else if s.starts_with("DRAIN") || s.starts_with("NOLB") {
            ServerState::Drain
        } else if s.starts_with("DOWN") {
            ServerState::Down
        } else {
            ServerState::Up
        }
    }
}

/// One server row of `show stat`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerStat {
    /// Backend name.
    pub backend: String,
    /// Server name.
    pub name: String,
    /// The raw status column, e.g. "UP 1/2".
    pub status: String,
    /// Check status code without the in-progress marker, e.g. "L7OK".
    pub check_status: String,
    /// HTTP status of the last check, when it got one. `None` while a
    /// check runs ("* L7OK" with code 0): see `check_in_progress`.
    pub check_code: Option<u16>,
    /// A check is running: HAProxy marks the status with "* ", and then
    /// reports code 0 although the last check got an HTTP answer (measured
    /// on 2.6.12 and 3.2.26: 1 to 2 in 100 polls at a 200 ms interval).
    pub check_in_progress: bool,
    /// Duration of the last check, milliseconds.
    pub check_duration_ms: Option<u64>,
    /// HAProxy's description of the check status, e.g. "Layer7 wrong status".
    pub check_desc: String,
    /// Extra information of the last check, e.g. "Connection refused".
    pub last_check: String,
    /// Seconds since the last state change.
    pub last_change_s: Option<u64>,
    /// Current sessions.
    pub sessions: u64,
    /// Sessions since start.
    pub sessions_total: u64,
    /// Connection errors to this server.
    pub connect_errors: u64,
    /// Connections retried.
    pub retries: u64,
    /// Connections redispatched to another server.
    pub redispatches: u64,
    /// The address in use (`ip:port`), empty when unresolved.
    pub addr: String,
    /// True for `backup` servers.
    pub backup: bool,
}

impl ServerStat {
    /// The simplified state.
    pub fn state(&self) -> ServerState {
        ServerState::from_status(&self.status)
    }
}

/// One frontend row of `show stat`.
#[derive(Clone, Debug, PartialEq)]
pub struct FrontendStat {
    /// Frontend name.
    pub name: String,
    /// "OPEN" while it accepts connections.
    pub status: String,
    /// Current sessions.
    pub sessions: u64,
}

/// The parts of `show stat` apilb uses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Server rows.
    pub servers: Vec<ServerStat>,
    /// Frontend rows.
    pub frontends: Vec<FrontendStat>,
    /// The pid of the worker that answered (`show info`'s `Pid:`), when
    /// asked: HAProxy counts per worker, from zero in each new one, so
    /// the counters are only comparable between answers of one worker.
    pub worker_pid: Option<u32>,
}

/// The command whose answer [`parse_info_and_stat`] reads: both answers
/// come from the same worker, on one connection.
pub const INFO_AND_STAT: &str = "show info;show stat";

/// Parses the answer to [`INFO_AND_STAT`]: `show info`'s `Name: value`
/// lines, an empty line, then `show stat`'s CSV. The result carries the
/// answering worker's pid.
pub fn parse_info_and_stat(text: &str) -> Result<Stats, ParseError> {
    let (info, csv) = match text.find("# pxname,") {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let mut stats = parse_show_stat(csv)?;
    stats.worker_pid =
        info.lines().find_map(|l| l.trim().strip_prefix("Pid:")).and_then(|p| p.trim().parse::<u32>().ok());
    Ok(stats)
}

/// Parses `show stat` CSV (header line `# pxname,svname,…`).
pub fn parse_show_stat(text: &str) -> Result<Stats, ParseError> {
    let err = |problem: String| ParseError { command: "show stat", problem };
    let mut lines = text.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| err(format!("no CSV header in {:?}", text.lines().next())))?;
    let index: HashMap<&str, usize> = header.split(',').enumerate().map(|(i, n)| (n, i)).collect();
    let col = |name: &'static str| index.get(name).copied().ok_or_else(|| err(format!("no column {name}")));
    let (px, sv, status, ty) = (col("pxname")?, col("svname")?, col("status")?, col("type")?);
    let opt = |name: &str| index.get(name).copied();
    let mut stats = Stats::default();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let get = |i: Option<usize>| i.and_then(|i| f.get(i)).copied().unwrap_or("");
        let num = |name: &str| get(opt(name)).parse::<u64>().ok();
        match get(Some(ty)) {
            // 0 = frontend, 2 = server.
            "0" => stats.frontends.push(FrontendStat {
                name: get(Some(px)).to_owned(),
                status: get(Some(status)).to_owned(),
                sessions: num("scur").unwrap_or(0),
            }),
            "2" => stats.servers.push({
                let raw_status = get(opt("check_status"));
                let in_progress = raw_status.starts_with("* ");
                let code = num("check_code").and_then(|c| u16::try_from(c).ok());
                ServerStat {
                    backend: get(Some(px)).to_owned(),
                    name: get(Some(sv)).to_owned(),
                    status: get(Some(status)).to_owned(),
                    check_status: raw_status.trim_start_matches("* ").to_owned(),
                    check_code: code.filter(|c| !(in_progress && *c == 0)),
                    check_in_progress: in_progress,
                    check_duration_ms: num("check_duration"),
                    check_desc: get(opt("check_desc")).to_owned(),
                    last_check: get(opt("last_chk")).to_owned(),
                    last_change_s: num("lastchg"),
                    sessions: num("scur").unwrap_or(0),
                    sessions_total: num("stot").unwrap_or(0),
                    connect_errors: num("econ").unwrap_or(0),
                    retries: num("wretr").unwrap_or(0),
                    redispatches: num("wredis").unwrap_or(0),
                    addr: get(opt("addr")).to_owned(),
                    backup: num("bck") == Some(1),
                }
            }),
            _ => {}
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_proc_with_old_workers_and_failures() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>\n\
            24050           master          5 [failed: 1]   0d00h00m57s     2.6.12-1+deb12u3\n\
            # workers\n\
            24484           worker          1               0d00h00m16s     2.6.12-1+deb12u3\n\
            # old workers\n\
            24305           worker          1               0d00h00m20s     2.6.12-1+deb12u3\n\
            # programs\n\n";
        let p = parse_show_proc(text).unwrap();
        assert_eq!(p.master_pid, 24050);
        assert_eq!((p.reloads, p.failed_reloads), (5, 1));
        assert_eq!(p.workers, vec![Proc { pid: 24484, reloads: 1 }]);
        assert_eq!(p.old_workers, vec![Proc { pid: 24305, reloads: 1 }]);
        assert_eq!(p.version.as_ref().map(|v| v.parts), Some((2, 6, 12)));
        // 2.6 to 3.0 keep the serving worker under `# workers` after a
        // failed reload.
        assert!(p.last_reload_failed() && !p.recovery());
        assert_eq!(p.serving(), p.workers);
        assert_eq!(p.draining(), p.old_workers);
        assert!(parse_show_proc("Unknown command.\n").is_err());
    }

    /// As HAProxy 3.2.26 printed it after a refused reload, with a worker
    /// still draining from an earlier reload.
    #[test]
    fn recovery_mode_names_the_worker_that_still_serves() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
            22388           master          3 [failed: 1]   0d00h00m02s     3.2.26-1       \n\
            # workers\n\
            # old workers\n\
            22301           worker          3               0d00h00m09s     3.2.26-1       \n\
            22395           worker          2               0d00h00m01s     3.2.26-1       \n";
        let p = parse_show_proc(text).unwrap();
        assert!(p.workers.is_empty() && p.recovery());
        assert_eq!(p.version.as_ref().map(|v| v.parts), Some((3, 2, 26)));
        assert_eq!(p.serving(), vec![Proc { pid: 22395, reloads: 2 }]);
        assert_eq!(p.draining(), vec![Proc { pid: 22301, reloads: 3 }]);
        // The next good reload: the new worker is current again.
        let text = "#<PID> <type> <reloads> <uptime> <version>\n\
            22388 master 4 [failed: 0] 0d00h00m03s 3.2.26-1\n# workers\n\
            22404 worker 0 0d00h00m01s 3.2.26-1\n# old workers\n";
        let p = parse_show_proc(text).unwrap();
        assert!(!p.recovery() && !p.last_reload_failed());
        assert_eq!(p.serving(), vec![Proc { pid: 22404, reloads: 0 }]);
    }

    /// As HAProxy 3.0.11 printed it.
    #[test]
    fn finds_the_established_sessions_of_a_server() {
        let text = "0x7fea4dd09c00: proto=tcpv4 src=127.0.0.1:56958 fe=apiserver be=masters srv=master-2 ts=00 \
            epoch=0xb age=3s calls=2 rate=0 cpu=0 lat=0 rq[f=808000h,i=0,an=00h,ax=] rp[f=80000000h,i=0,an=00h,ax=] \
            scf=[8,14200h,fd=21,rex=,wex=] scb=[10,30005h,fd=19,rex=,wex=] exp=0s rc=0 c_exp=\n\
            0x7fea4e081c00: proto=tcpv4 src=127.0.0.1:56966 fe=apiserver be=masters srv=master-2 ts=00 \
            epoch=0xb age=9s calls=5 rate=0 cpu=0 lat=0 rq[f=8c8000h,i=0,an=00h,ax=] rp[f=80048000h,i=0,an=00h,ax=] \
            scf=[8,200h,fd=23,rex=,wex=] scb=[8,1h,fd=26,rex=,wex=] exp=29m rc=0 c_exp=\n\
            0x7fea4e081d00: proto=tcpv4 src=127.0.0.1:56970 fe=apiserver be=masters srv=master-21 ts=00 \
            scf=[8,200h,fd=24,rex=,wex=] scb=[8,1h,fd=27,rex=,wex=] exp=29m rc=0 c_exp=\n\
            0x7fea4e29a400: proto=unix_stream source=unix:1 fe=GLOBAL be=<NONE> srv=<none> ts=00 \
            scf=[8,0h,fd=16,rex=30s,wex=] scb=[8,1h,fd=-1,rex=,wex=] exp=30s rc=0 c_exp=\n";
        assert_eq!(established_sessions(text, "masters", "master-2"), vec!["0x7fea4e081c00".to_owned()]);
        assert!(established_sessions(text, "masters", "master-3").is_empty());
        assert!(established_sessions("Unknown command.\n", "masters", "master-2").is_empty());
    }

    #[test]
    fn maps_statuses() {
        for (s, want) in [
            ("UP", ServerState::Up),
            ("UP 1/2", ServerState::Up),
            ("no check", ServerState::Up),
            ("DOWN", ServerState::Down),
            ("DOWN 1/2", ServerState::Down),
            ("MAINT", ServerState::Maint),
            ("MAINT (resolution)", ServerState::Maint),
            ("DRAIN", ServerState::Drain),
            ("NOLB", ServerState::Drain),
        ] {
            assert_eq!(ServerState::from_status(s), want, "{s}");
        }
    }

    /// HAProxy while a check runs: "* L7OK" with code 0 (measured on 2.6.12
    /// and 3.2.26). The code is unknown then, not 0.
    #[test]
    fn a_running_check_has_no_code() {
        let text = "# pxname,svname,status,type,check_status,check_code,\n\
            masters,m1,UP,2,* L7OK,0,\n\
            masters,m2,UP,2,L7OK,200,\n\
            masters,m3,DOWN,2,* L7STS,503,\n";
        let s = parse_show_stat(text).unwrap();
        let codes: Vec<_> = s.servers.iter().map(|r| (r.check_in_progress, r.check_code)).collect();
        assert_eq!(codes, [(true, None), (false, Some(200)), (true, Some(503))]);
        assert_eq!(s.servers[0].check_status, "L7OK");
    }

    #[test]
    fn parses_show_stat_rows_by_header_name() {
        let text = "# pxname,svname,scur,stot,econ,wretr,wredis,status,bck,lastchg,type,check_status,check_code,check_duration,last_chk,check_desc,addr,\n\
            apiserver,FRONTEND,3,10,,,,OPEN,,,0,,,,,,,\n\
            masters,m1,2,7,1,0,0,UP,0,42,2,L7OK,200,3,OK,Layer7 check passed,10.0.0.1:6443,\n\
            masters,m2,0,0,5,2,1,DOWN,0,7,2,* L4CON,,0,Connection refused,Layer4 connection problem,10.0.0.2:6443,\n\
            masters,m1:fallback,0,0,0,0,0,no check,1,99,2,,,,,,10.0.0.1:6443,\n\
            masters,BACKEND,2,7,,,,UP,1,42,1,,,,,,,\n";
        let s = parse_show_stat(text).unwrap();
        assert_eq!(s.frontends.len(), 1);
        assert_eq!(s.frontends[0].status, "OPEN");
        assert_eq!(s.servers.len(), 3);
        let m2 = &s.servers[1];
        assert_eq!(m2.state(), ServerState::Down);
        assert_eq!(m2.check_status, "L4CON");
        assert_eq!(m2.check_code, None);
        assert_eq!(m2.last_check, "Connection refused");
        assert_eq!(m2.check_desc, "Layer4 connection problem");
        assert_eq!((m2.connect_errors, m2.retries, m2.redispatches), (5, 2, 1));
        let m1 = &s.servers[0];
        assert_eq!((m1.check_code, m1.check_duration_ms, m1.last_change_s), (Some(200), Some(3), Some(42)));
        assert!(s.servers[2].backup);
        assert!(parse_show_stat("").is_err());
        assert_eq!(s.worker_pid, None);
    }

    /// As HAProxy 2.6.12 answered `show info;show stat` (shortened).
    #[test]
    fn parses_show_info_and_stat_of_one_worker() {
        let text = "Name: HAProxy\nVersion: 2.6.12-1+deb12u4\nRelease_date: 2026/10/17\nNbthread: 2\n\
            Nbproc: 1\nProcess_num: 1\nPid: 29154\nUptime: 0d 0h00m00s\n\n\
            # pxname,svname,scur,stot,econ,wretr,wredis,status,bck,type,\n\
            masters,m1,0,0,4,2,1,UP,0,2,\n\
            masters,m1:fallback,0,0,3,1,1,no check,1,2,\n\n";
        let s = parse_info_and_stat(text).unwrap();
        assert_eq!(s.worker_pid, Some(29154));
        assert_eq!(s.servers.len(), 2);
        assert_eq!((s.servers[1].connect_errors, s.servers[1].retries), (3, 1));
        assert!(parse_info_and_stat("Name: HAProxy\nPid: 1\n\n").is_err());
        assert!(parse_info_and_stat("Unknown command.\n").is_err());
    }
}
