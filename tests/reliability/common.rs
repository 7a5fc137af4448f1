//! Shared pieces of the reliability suite: the size, resource limits,
//! HAProxy's processes, a paced load, tmpfs mounts and reporting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use apilb::haproxy::stat::ProcInfo;
use apilb::status::Status;
use apilb_testkit::lab::Lab;
use apilb_testkit::testapi::Session;
use apilb_testkit::testapi::pool::{Pool, PoolOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::support::layout;

/// How big the suite runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// What CI runs: the same scenarios, fewer connections.
    Reduced,
    /// `APILB_RELIABILITY=full`.
    Full,
}

pub fn size() -> Size {
    match std::env::var("APILB_RELIABILITY").as_deref() {
        Ok("full") => Size::Full,
        _ => Size::Reduced,
    }
}

/// `reduced` or `full`, by the suite's size.
pub fn pick<T>(reduced: T, full: T) -> T {
    match size() {
        Size::Reduced => reduced,
        Size::Full => full,
    }
}

/// Prints one measurement line, e.g. `reliability[reduced] reloads: …`.
pub fn measured(case: &str, text: &str) {
    let size = match size() {
        Size::Reduced => "reduced",
        Size::Full => "full",
    };
    eprintln!("reliability[{size}] {case}: {text}");
}

/// The tests of this suite load both cores; they run one at a time so each
/// measures itself, not its neighbours.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (each held connection
/// costs the test a descriptor for the client and one for the test API
/// server it reaches); returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// `show proc` on the lab's HAProxy master socket.
pub async fn show_proc(lab: &Lab) -> Result<ProcInfo, String> {
    let text =
        apilb::haproxy::cli::command(&layout(lab).master_socket(), "show proc", Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
    apilb::haproxy::stat::parse_show_proc(&text).map_err(|e| e.to_string())
}

/// Live HAProxy processes (master and workers, current and old) of this
/// lab, found in /proc by their command line (which names the lab's
/// master socket).
pub fn haproxy_processes(lab: &Lab) -> Vec<u32> {
    processes_mentioning(&layout(lab).master_socket().display().to_string())
}

/// A check timeout of 5s instead of the lab's 1s. With thousands of TLS
/// clients, the test API servers share two cores with everything else and
/// a check can take longer than a second: HAProxy then (rightly) marks the
/// master DOWN and closes its sessions, which is not what these tests
/// measure. Rewrites the config.
pub fn tolerant_checks(lab: &mut Lab) {
    lab.health.timeout = "5s".into();
    lab.write_config(&lab.config_yaml("")).unwrap();
}

/// The masters' state transitions from apilb's metrics, to explain closed
/// connections (a master marked DOWN has its sessions closed).
pub fn transitions(metrics: &str) -> Vec<&str> {
    metrics.lines().filter(|l| l.starts_with("apilb_master_transitions_total")).collect()
}

/// On drop, SIGKILLs every HAProxy process still running for the labs it
/// watches (found in /proc by the lab's path in its command line): a test
/// that fails half-way, with a damaged pidfile or a tmpfs over the runtime
/// directory, must not leave HAProxy behind. Declare it before the `Env`,
/// so it runs after the Env's own cleanup (which stops the agent first).
#[derive(Default)]
pub struct Reaper {
    labs: Vec<String>,
}

impl Reaper {
    /// Also cleans up after `lab`.
    pub fn watch(&mut self, lab: &Lab) {
        self.labs.push(lab.dir.path().display().to_string());
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for lab in &self.labs {
            for pid in processes_mentioning(lab) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Live HAProxy master-worker processes with an argument starting with
/// `prefix`.
fn processes_mentioning(prefix: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> =
            cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let is_haproxy = args.first().is_some_and(|a| a.ends_with("haproxy"));
        let is_master_worker = args.iter().any(|a| a == "-W");
        if is_haproxy
            && is_master_worker
            && args.iter().any(|a| a.starts_with(prefix))
            && apilb::haproxy::supervisor::alive(pid)
        {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

/// Options for a pool of connections through the lab's frontend.
pub fn pool_options(lab: &Lab) -> PoolOptions {
    PoolOptions {
        addr: lab.listen,
        tls: lab.client_tls().expect("client TLS"),
        token: Some(lab.token.clone()),
        parallelism: 32,
        timeout: Duration::from_secs(20),
    }
}

/// Opens `n` connections through the lab's frontend; every one must open.
pub async fn open_pool(lab: &Lab, n: usize) -> Pool {
    let mut pool = Pool::new(pool_options(lab));
    let r = pool.open(n).await;
    assert_eq!(r.opened, n, "could not hold {n} connections: {r:?}");
    pool
}

/// The lab's apilb.yaml with `timeouts.connect` as a harmless knob that
/// changes haproxy.cfg (never the default, 3s), and `haproxy_extra`
/// appended to the `haproxy:` section.
pub fn config_variant(lab: &Lab, i: usize, haproxy_extra: &str) -> String {
    lab.config_yaml(&format!("{haproxy_extra}timeouts:\n  connect: {}ms\n", 3100 + i))
}

/// The line of haproxy.cfg that [`config_variant`] `i` renders.
pub fn variant_line(i: usize) -> String {
    format!("timeout connect {}ms", 3100 + i)
}

/// One connection attempt of a [`Paced`] load.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub started: Instant,
    pub ended: Instant,
    /// The serving master, or why it failed.
    pub outcome: Result<String, String>,
}

/// Clients opening a new connection (TLS, one `GET /version`) at a fixed
/// pace, so the count of failures during an outage means something
/// (clients retrying in a tight loop would count their own speed).
pub struct Paced {
    stop: watch::Sender<bool>,
    ok: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<Vec<Attempt>>>,
}

impl Paced {
    /// `clients` clients, each starting one attempt every `every`.
    pub fn start(lab: &Lab, clients: usize, every: Duration) -> Paced {
        Self::start_at(lab.listen, lab.client_tls().unwrap(), Some(lab.token.clone()), clients, every)
    }

    pub fn start_at(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        token: Option<String>,
        clients: usize,
        every: Duration,
    ) -> Paced {
        let (stop, rx) = watch::channel(false);
        let ok = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|c| {
                let (tls, token, mut rx, ok) = (tls.clone(), token.clone(), rx.clone(), ok.clone());
                // Spread the clients over the period.
                let offset = every * c as u32 / clients as u32;
                tokio::spawn(async move {
                    let mut attempts = Vec::new();
                    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = tick.tick() => {}
                            _ = rx.wait_for(|s| *s) => break,
                        }
                        let started = Instant::now();
                        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                            let mut s = Session::connect(addr, tls.clone(), token.as_deref()).await?;
                            s.served_by().await
                        })
                        .await
                        .unwrap_or_else(|_| Err("no answer within 10s".into()));
                        if outcome.is_ok() {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        attempts.push(Attempt { started, ended: Instant::now(), outcome });
                    }
                    attempts
                })
            })
            .collect();
        Paced { stop, ok, tasks }
    }

    /// Successful attempts so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `n` more attempts than now have succeeded.
    pub async fn wait_more_ok(&self, n: u64, limit: Duration, what: &str) {
        let target = self.ok() + n;
        let start = Instant::now();
        while self.ok() < target {
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {n} successful connections: {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn stop(self) -> PacedReport {
        let _ = self.stop.send(true);
        let mut attempts = Vec::new();
        for t in self.tasks {
            attempts.extend(t.await.unwrap_or_default());
        }
        attempts.sort_by_key(|a| a.started);
        PacedReport { attempts }
    }
}

/// Everything a [`Paced`] load tried.
pub struct PacedReport {
    pub attempts: Vec<Attempt>,
}

impl PacedReport {
    pub fn ok(&self) -> usize {
        self.attempts.iter().filter(|a| a.outcome.is_ok()).count()
    }
    pub fn failures(&self) -> Vec<&Attempt> {
        self.attempts.iter().filter(|a| a.outcome.is_err()).collect()
    }
    /// A few distinct errors.
    pub fn sample_errors(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for a in self.failures() {
            if let Err(e) = &a.outcome
                && !out.contains(e)
                && out.len() < 4
            {
                out.push(e.clone());
            }
        }
        out
    }
    pub fn describe(&self) -> String {
        format!("{} ok, {} failed {:?}", self.ok(), self.failures().len(), self.sample_errors())
    }
}

/// Polls the agent's /status (an apilb process) until `pred` holds.
pub async fn wait_remote_status(
    lab: &Lab,
    limit: Duration,
    what: &str,
    pred: impl Fn(&Status) -> bool,
) -> Status {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Ok(s) = apilb::status_client::fetch(lab.metrics).await {
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}\nlast status: {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Every master UP with a passed check, HAProxy running.
pub fn all_up(n: usize) -> impl Fn(&Status) -> bool {
    move |s| {
        s.haproxy.running
            && s.masters.len() == n
            && s.masters.iter().all(|m| m.state == "UP" && m.check_status == "L7OK")
    }
}

/// A tmpfs mounted over a directory; unmounted (lazily, so a process still
/// using it cannot keep it) on drop. Declare it before the `Env` whose lab
/// holds it: the Env's cleanup reads HAProxy's pidfile from the mount.
pub struct Tmpfs {
    pub dir: PathBuf,
    /// Removed, whatever is left of it, after unmounting: the lab's
    /// TempDir cannot remove a directory holding a mount point.
    lab_dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes (mode 0700) on the lab's directory
    /// `name`. `Err` when this process may not mount (not root, no
    /// CAP_SYS_ADMIN, a container).
    pub fn mount(lab: &Lab, name: &str, size: u64) -> Result<Tmpfs, String> {
        let dir = lab.path(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        mount(&dir, 0, &format!("size={size},mode=0700"))?;
        Ok(Tmpfs { dir, lab_dir: lab.dir.path().to_owned() })
    }

    /// Remounts it read-only (`ro`) or read-write.
    pub fn set_read_only(&self, ro: bool) -> Result<(), String> {
        let flags = libc::MS_REMOUNT | if ro { libc::MS_RDONLY } else { 0 };
        mount(&self.dir, flags, "")
    }

    /// Fills it: writes a file until the write fails with ENOSPC.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0x5a_u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        // Small writes may still fit in the last page: fill those too.
        while let Ok(n) = f.write(&[0x5a]) {
            if n == 0 {
                break;
            }
        }
        let _ = f.sync_all();
        path
    }
}

fn mount(dir: &Path, flags: libc::c_ulong, data: &str) -> Result<(), String> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let target = CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let fstype = CString::new("tmpfs").unwrap();
    let data = CString::new(data).map_err(|e| e.to_string())?;
    // SAFETY: every pointer is a valid NUL-terminated string for the call.
    let rc = unsafe {
        libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("mount tmpfs on {}: {}", dir.display(), std::io::Error::last_os_error()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        if let Ok(target) = CString::new(self.dir.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        // The lab's TempDir could not remove a mount point: finish its job
        // (the last mount's drop succeeds).
        let _ = std::fs::remove_dir_all(&self.lab_dir);
    }
}

/// The value of a metric line, e.g. `apilb_haproxy_reloads_total{result="failed"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}
