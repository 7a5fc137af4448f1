//! Everything that talks to HAProxy: the binary (`-v`, `-c`), the master
//! and stats sockets, and the supervisor that runs the master process.

pub mod cli;
pub mod output;
pub mod runtime;
pub mod stat;
pub mod supervisor;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::fsutil;
use crate::layout::Paths;
use crate::render::{Features, Rendered};

/// The oldest HAProxy apilb runs on: the oldest it is tested on (Debian
/// 12's 2.6; the README's support table). 2.4 (RHEL 8 and 9's AppStream)
/// was never run, and lacks `add server` with checks, which discovery
/// uses.
pub const MIN_VERSION: (u32, u32) = (2, 6);

/// Failures of the HAProxy binary itself.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    /// The binary does not exist or cannot be executed.
    #[error("cannot run HAProxy binary \"{}\": {source} (install it, e.g. `apt-get install haproxy`, or set haproxy.binary)", binary.display())]
    Spawn {
        /// The configured binary.
        binary: PathBuf,
        /// Why exec failed.
        #[source]
        source: std::io::Error,
    },
    /// `haproxy -v` printed something we cannot read.
    #[error("cannot parse the version printed by \"{}\": {output:?}", binary.display())]
    Version {
        /// The configured binary.
        binary: PathBuf,
        /// Its first line of output.
        output: String,
    },
    /// The binary is older than [`MIN_VERSION`].
    #[error("HAProxy {version} is too old; apilb needs {}.{} or later", MIN_VERSION.0, MIN_VERSION.1)]
    TooOld {
        /// The version found.
        version: String,
    },
    /// `haproxy -c` refused the configuration.
    #[error("HAProxy refused the configuration:\n{messages}")]
    Rejected {
        /// HAProxy's own ALERT lines, secrets redacted.
        messages: String,
    },
    /// Writing the files to validate failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// An HAProxy version, e.g. 2.6.12.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major, minor, patch.
    pub parts: (u32, u32, u32),
    /// As printed, e.g. `2.6.12-1+deb12u3`.
    pub full: String,
}

impl Version {
    /// True from [`MIN_VERSION`] on.
    pub fn supported(&self) -> bool {
        self.at_least(MIN_VERSION.0, MIN_VERSION.1)
    }

    /// True for `major.minor` or any later version.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.parts.0, self.parts.1) >= (major, minor)
    }

    /// 2.7+: the master CLI's `reload` answers `Success=1` or `Success=0`,
    /// followed by the startup log; 2.6 answers nothing and the outcome is
    /// read from `show proc`'s counters.
    pub fn reload_reports_status(&self) -> bool {
        self.at_least(2, 7)
    }

    /// 3.1+ ("mworker V3"): the master no longer parses the configuration,
    /// the worker does. A new worker is listed by `show proc` before it is
    /// ready, and after a failed reload the worker that keeps serving is
    /// listed under `# old workers` ("recovery mode").
    pub fn worker_loads_config(&self) -> bool {
        self.at_least(3, 1)
    }

    /// 3.1+: `add server … init-state down` adds a server that stays out
    /// of rotation until a check passes.
    pub fn add_server_init_state(&self) -> bool {
        self.at_least(3, 1)
    }

    /// 3.0's forced shutdown of a stream (what `on-marked-down
    /// shutdown-sessions` does at mark-down) can freeze a stream that is
    /// still connecting to that server: its client is never answered nor
    /// closed, and no timeout applies. Measured on Debian 13's 3.0.11
    /// (`tests/failover.rs`, crash under load; the blackhole benchmark);
    /// 2.6 and 3.2 close such a stream. In HAProxy's history: 3.0.10
    /// backported 51611a5b7 ("Fix a possible freeze during a forced shut
    /// on a stream") but not 6365eb85e, which makes process_stream() see
    /// the state that fix sets. The agent closes a failed master's
    /// established sessions itself on 3.0 instead (see [`Features`]).
    pub fn forced_shutdown_may_freeze(&self) -> bool {
        (self.parts.0, self.parts.1) == (3, 0)
    }

    /// What a config rendered for this version may rely on.
    pub fn features(&self) -> Features {
        Features { shutdown_sessions_on_mark_down: !self.forced_shutdown_may_freeze() }
    }

    /// 3.0+: the runtime API's `wait <ms> srv-removable` waits until a
    /// server can be deleted (3.3's `del server` no longer closes idle
    /// connections itself, so a bare `del` may fail).
    pub fn wait_srv_removable(&self) -> bool {
        self.at_least(3, 0)
    }
}

/// Runs the HAProxy executable for one-shot jobs.
#[derive(Clone, Debug)]
pub struct Binary {
    /// Path or bare name (looked up on PATH).
    pub path: PathBuf,
}

impl Binary {
    /// Wraps the configured binary.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Binary { path: path.into() }
    }

    async fn output(&self, args: &[&std::ffi::OsStr]) -> Result<std::process::Output, BinaryError> {
        let mut cmd = Command::new(&self.path);
        cmd.args(args)
            // HAProxy resolves relative paths against its working directory,
            // and fails when that directory was deleted: never inherit one.
            .current_dir("/")
            .stdin(Stdio::null())
            .env_remove("NOTIFY_SOCKET")
            .kill_on_drop(true);
        // SAFETY: between fork and exec; see clear_ambient_capabilities.
        unsafe {
            cmd.pre_exec(|| clear_ambient_capabilities());
        }
        cmd.output().await.map_err(|source| BinaryError::Spawn { binary: self.path.clone(), source })
    }

    /// `haproxy -v`, checked against [`MIN_VERSION`].
    pub async fn version(&self) -> Result<Version, BinaryError> {
        let out = self.output(&["-v".as_ref()]).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or_default().to_owned();
        let version = parse_version(&first)
            .ok_or_else(|| BinaryError::Version { binary: self.path.clone(), output: first })?;
        if !version.supported() {
            return Err(BinaryError::TooOld { version: version.full });
        }
        Ok(version)
    }

    /// `haproxy -c -f FILE`. On refusal returns HAProxy's ALERT lines with
    /// `redact` applied; on success returns its WARNING lines.
    pub async fn check(
        &self,
        file: &Path,
        redact: impl Fn(&str) -> String,
    ) -> Result<Vec<String>, BinaryError> {
        let out = self.output(&["-c".as_ref(), "-f".as_ref(), file.as_os_str()]).await?;
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        let lines = |tag: &str| -> Vec<String> {
            text.lines().filter(|l| l.contains(tag)).map(|l| redact(l.trim())).collect()
        };
        // Exit 0: valid; 2: valid but nothing listens (not our case, but
        // still a config HAProxy would run). Anything else: refused.
        match out.status.code() {
            Some(0) | Some(2) => Ok(lines("[WARNING]")),
            _ => {
                let mut alerts = lines("[ALERT]");
                if alerts.is_empty() {
                    alerts = text.lines().map(|l| redact(l.trim())).filter(|l| !l.is_empty()).collect();
                }
                if alerts.is_empty() {
                    alerts.push(format!("haproxy -c exited with {}", out.status));
                }
                Err(BinaryError::Rejected { messages: alerts.join("\n") })
            }
        }
    }

    /// Writes `rendered` and its auxiliary files under `paths` (which must
    /// be scratch paths or the staging names of the agent) and validates
    /// it with `haproxy -c`, without touching anything that runs.
    pub async fn validate_at(
        &self,
        rendered: &Rendered,
        paths: &Paths,
        config_file: &Path,
    ) -> Result<Vec<String>, BinaryError> {
        write_rendered(rendered, paths, config_file)?;
        self.check(config_file, |l| rendered.redact(l)).await
    }
}

/// Writes the config text and its auxiliary files (0600, atomically), and
/// seeds an empty server-state file so HAProxy has one to load.
/// Clears the ambient capabilities a child would inherit, in the child
/// between fork and exec. Under the unit, apilb runs as the `apilb` user
/// with the ambient `CAP_DAC_READ_SEARCH` it needs to read the node's
/// kubelet credential (root-owned, 0600); HAProxy reads only the copies
/// apilb writes to its runtime directory, so it starts with no capability
/// at all, and a compromised worker cannot read other users' files.
///
/// # Safety
///
/// Call only between fork and exec (`pre_exec`): `prctl` is
/// async-signal-safe.
pub unsafe fn clear_ambient_capabilities() -> std::io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    // EINVAL: a kernel without ambient capabilities (before 4.3) has none to clear.
    if rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn write_rendered(rendered: &Rendered, paths: &Paths, config_file: &Path) -> Result<(), BinaryError> {
    let write = |path: &Path, data: &[u8]| {
        if let Some(dir) = path.parent() {
            fsutil::ensure_private_dir(dir)
                .map_err(|source| BinaryError::Write { path: dir.to_owned(), source })?;
        }
        fsutil::write_atomic(path, data, 0o600)
            .map_err(|source| BinaryError::Write { path: path.to_owned(), source })
    };
    for aux in &rendered.aux_files {
        write(&aux.path, aux.contents.expose().as_bytes())?;
    }
    let state = paths.server_state_file();
    if !state.exists() {
        // Version line only: "no server state yet", without a warning.
        write(&state, b"1\n")?;
    }
    write(config_file, rendered.text.expose().as_bytes())
}

/// What is wrong with a saved server-state file (`show servers state`,
/// format 1: a version line, then one line of 20 to 25 fields per server),
/// or `None` when HAProxy can load it.
pub fn server_state_problem(content: &[u8]) -> Option<String> {
    let Ok(text) = std::str::from_utf8(content) else {
        return Some("it is not text".into());
    };
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
    match lines.next() {
        None => return Some("it is empty".into()),
        Some((_, "1")) => {}
        Some(_) => return Some("its first line is not the format version \"1\"".into()),
    }
    for (n, line) in lines.filter(|(_, l)| !l.is_empty() && !l.starts_with('#')) {
        let fields = line.split_whitespace().count();
        if !(20..=25).contains(&fields) {
            return Some(format!("line {n} is damaged ({fields} fields where HAProxy expects 20 to 25)"));
        }
    }
    None
}

/// Checks the saved server state before HAProxy loads it. HAProxy ignores a
/// damaged file anyway, but each version says so differently (2.6 warns,
/// 3.0+ reports some damage as a mere notice that the file is "empty"):
/// apilb warns in one way on every version, naming the file and the
/// damage, and replaces it with an empty state so HAProxy reads no garbage.
pub fn repair_server_state(path: &Path) {
    let content = match std::fs::read(path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the saved server state; HAProxy starts without it");
            return;
        }
    };
    if let Some(problem) = server_state_problem(&content) {
        tracing::warn!(
            path = %path.display(),
            "ignoring the saved server state: {problem}; HAProxy starts with every master UP until its first check"
        );
        if let Err(e) = fsutil::write_atomic(path, b"1\n", 0o600) {
            tracing::warn!(path = %path.display(), error = %e, "cannot replace the damaged server state");
        }
    }
}

/// File descriptors HAProxy asks for: two per connection (client and
/// server side) plus its listeners, sockets and one per checked server. A
/// slight overestimate of HAProxy's own sum (8,233 for `maxconn 4096` and
/// three masters, as 2.6 reported it).
pub fn fds_needed(maxconn: u32, masters: usize) -> u64 {
    2 * u64::from(maxconn) + 64 + 4 * masters as u64
}

/// Makes room for `needed` file descriptors in this process's limits, which
/// HAProxy inherits: HAProxy raises its soft limit by itself but cannot go
/// past the hard one, and then refuses to start ("Cannot raise FD limit").
/// Raises the hard limit when allowed (root with CAP_SYS_RESOURCE);
/// otherwise says what to change, naming `haproxy.maxconn`.
pub fn ensure_fd_limit(needed: u64, maxconn: u32) -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("cannot read RLIMIT_NOFILE: {e}"))?;
    if hard >= needed {
        return Ok(());
    }
    if setrlimit(Resource::RLIMIT_NOFILE, soft.max(needed), needed).is_ok() {
        tracing::info!(from = hard, to = needed, "raised the hard file descriptor limit for HAProxy");
        return Ok(());
    }
    let fits = hard.saturating_sub(needed - 2 * u64::from(maxconn)) / 2;
    Err(format!(
        "haproxy.maxconn {maxconn} needs about {needed} file descriptors, but the hard limit here is {hard} \
         (ulimit -Hn) and cannot be raised: HAProxy would refuse to start. Raise the limit (LimitNOFILE= \
         under systemd; the packaged unit sets 65536) or set haproxy.maxconn to {fits} or less"
    ))
}

/// Parses the first line of `haproxy -v`:
/// `HAProxy version 2.6.12-1+deb12u3 2025/10/03 - https://haproxy.org/`.
pub fn parse_version(line: &str) -> Option<Version> {
    Version::parse(line.split_whitespace().skip_while(|w| *w != "version").nth(1)?)
}

impl Version {
    /// Parses a bare version as HAProxy prints it, e.g. `2.6.12-1+deb12u3`
    /// (`haproxy -v`, `show proc`'s version column).
    pub fn parse(full: &str) -> Option<Version> {
        let mut nums = full
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u32>().ok());
        let major = nums.next()??;
        let minor = nums.next()??;
        let patch = nums.next().flatten().unwrap_or(0);
        Some(Version { parts: (major, minor, patch), full: full.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debian_version_line() {
        let v = parse_version("HAProxy version 2.6.12-1+deb12u3 2025/10/03 - https://haproxy.org/").unwrap();
        assert_eq!(v.parts, (2, 6, 12));
        assert_eq!(v.full, "2.6.12-1+deb12u3");
        assert_eq!(parse_version("HA-Proxy version 2.4.22 2023/02/14").unwrap().parts, (2, 4, 22));
        assert!(parse_version("garbage").is_none());
    }

    #[test]
    fn finds_damage_in_a_server_state_file() {
        let good = "1\n# be_id be_name srv_id srv_name srv_addr …\n\
            3 masters 1 master-1 127.0.0.1 2 0 1 1 5 6 3 4 6 0 0 0 - 36513 - 0 0 - - 0\n";
        assert_eq!(server_state_problem(good.as_bytes()), None);
        assert_eq!(server_state_problem(b"1\n"), None);
        assert_eq!(server_state_problem(b"").as_deref(), Some("it is empty"));
        assert!(server_state_problem(b"\x00\xff garbage").unwrap().contains("not text"));
        assert!(server_state_problem(b"garbage\n").unwrap().contains("format version"));
        let truncated = &good[..good.len() - 30];
        assert!(server_state_problem(truncated.as_bytes()).unwrap().starts_with("line 3 is damaged"));
    }

    #[test]
    fn sizes_file_descriptors_like_haproxy() {
        // HAProxy 2.6 asked for 8,233 with maxconn 4096 and three masters.
        let needed = fds_needed(4096, 3);
        assert!((8233..8233 + 64).contains(&needed), "{needed}");
        // This process's limit is enough for a tiny maxconn.
        assert_eq!(ensure_fd_limit(fds_needed(8, 1), 8), Ok(()));
    }

    #[test]
    fn features_follow_the_version() {
        let v = |line: &str| parse_version(&format!("HAProxy version {line} 2026/10/14")).unwrap();
        let (v26, v28, v30, v31, v32) =
            (v("2.6.12-1+deb12u4"), v("2.8.5"), v("3.0.11"), v("3.1.0"), v("3.2.26-1"));
        assert!(!v26.reload_reports_status() && v28.reload_reports_status() && v30.reload_reports_status());
        assert!(!v30.worker_loads_config() && v31.worker_loads_config() && v32.worker_loads_config());
        assert!(!v30.add_server_init_state() && v31.add_server_init_state());
        assert!(!v28.wait_srv_removable() && v30.wait_srv_removable());
        assert!(v("10.0").at_least(3, 1) && !v("2.10").at_least(3, 0));
        assert!(v26.supported() && !v("2.4.22").supported() && !v("1.8.27").supported());
        assert!(
            v26.features().shutdown_sessions_on_mark_down && v32.features().shutdown_sessions_on_mark_down
        );
        assert!(
            !v30.features().shutdown_sessions_on_mark_down && v31.features().shutdown_sessions_on_mark_down
        );
        assert_eq!(v26.features(), Features::default());
    }
}
