//! The runtime layout: every file apilb and its HAProxy keep in the runtime
//! and state directories, named here once.
//!
//! Nothing else spells these names: the agent, the supervisor, the renderer,
//! the CLI, the tests and the benchmarks all ask [`Paths`].

use std::path::{Path, PathBuf};

use crate::config::Config;

/// The haproxy.cfg HAProxy runs ([`Paths::config_file`]).
const CONFIG_FILE: &str = "haproxy.cfg";
/// A rendered config being validated ([`Paths::staging_config`]).
const STAGING_CONFIG: &str = "haproxy.cfg.next";
/// The master CLI socket ([`Paths::master_socket`]).
const MASTER_SOCKET: &str = "master.sock";
/// The worker's admin socket ([`Paths::stats_socket`]).
const STATS_SOCKET: &str = "haproxy.sock";
/// The HAProxy master's pidfile ([`Paths::pidfile`]).
const PIDFILE: &str = "haproxy.pid";
/// HAProxy's stdout and stderr ([`Paths::output_fifo`]).
const OUTPUT_FIFO: &str = "haproxy.out";
/// The hash of the applied config ([`Paths::applied_marker`]).
const APPLIED_MARKER: &str = "applied.sha256";
/// The agent's own pid ([`Paths::agent_pidfile`]).
const AGENT_PIDFILE: &str = "apilb.pid";
/// The last applied master set ([`Paths::masters_file`]).
const MASTERS_FILE: &str = "masters.json";
/// HAProxy's server state across reloads ([`Paths::server_state_file`]).
const SERVER_STATE_FILE: &str = "servers.state";
/// The name prefix of [`Paths::check_ca`]'s files.
const CHECK_CA_PREFIX: &str = "check-ca-";
/// The name prefix of [`Paths::client_bundle`]'s files.
const CLIENT_BUNDLE_PREFIX: &str = "check-client-";
/// The name suffix of both kinds of check file.
const CHECK_FILE_SUFFIX: &str = ".pem";

/// Files apilb keeps in the runtime and state directories.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    /// Runtime directory (sockets, pidfile, rendered config).
    pub runtime_dir: PathBuf,
    /// State directory (server state across reloads).
    pub state_dir: PathBuf,
}

impl Paths {
    /// The directories named in the config.
    pub fn from_config(config: &Config) -> Self {
        Paths { runtime_dir: config.haproxy.runtime_dir.clone(), state_dir: config.haproxy.state_dir.clone() }
    }
    /// `run` and `state` under `dir`: for validation in a scratch directory
    /// (every file HAProxy would read or bind lives there instead of the real
    /// directories), and the layout of a lab.
    pub fn under(dir: &Path) -> Self {
        Paths { runtime_dir: dir.join("run"), state_dir: dir.join("state") }
    }
    /// The haproxy.cfg HAProxy runs.
    pub fn config_file(&self) -> PathBuf {
        self.runtime_dir.join(CONFIG_FILE)
    }
    /// The master CLI socket (`-S`).
    pub fn master_socket(&self) -> PathBuf {
        self.runtime_dir.join(MASTER_SOCKET)
    }
    /// The worker's admin stats socket (runtime API).
    pub fn stats_socket(&self) -> PathBuf {
        self.runtime_dir.join(STATS_SOCKET)
    }
    /// The length of the longest `/<socket>` name in the runtime
    /// directory (the stats socket's), which the config's check adds to
    /// the runtime directory to keep every socket path within `sun_path`.
    pub fn longest_socket_name_len() -> usize {
        MASTER_SOCKET.len().max(STATS_SOCKET.len()) + 1
    }
    /// The master's pidfile (`-p`).
    pub fn pidfile(&self) -> PathBuf {
        self.runtime_dir.join(PIDFILE)
    }
    /// The FIFO that carries HAProxy's stdout and stderr to apilb. A FIFO,
    /// not a pipe: a restarted apilb reopens it and keeps reading.
    pub fn output_fifo(&self) -> PathBuf {
        self.runtime_dir.join(OUTPUT_FIFO)
    }
    /// The last applied master set (with discovery), for the next start.
    pub fn masters_file(&self) -> PathBuf {
        self.state_dir.join(MASTERS_FILE)
    }
    /// The server state HAProxy reloads with (`server-state-file`).
    pub fn server_state_file(&self) -> PathBuf {
        self.state_dir.join(SERVER_STATE_FILE)
    }
    /// Where the copy of the check's CA with this digest is written.
    pub fn check_ca(&self, digest: &str) -> PathBuf {
        self.check_file(CHECK_CA_PREFIX, digest)
    }
    /// Where a client-certificate bundle with this digest is written.
    pub fn client_bundle(&self, digest: &str) -> PathBuf {
        self.check_file(CLIENT_BUNDLE_PREFIX, digest)
    }
    /// The glob that matches every [`Paths::client_bundle`], as the docs
    /// name them.
    pub fn client_bundle_glob(&self) -> PathBuf {
        self.runtime_dir.join(format!("{CLIENT_BUNDLE_PREFIX}*{CHECK_FILE_SUFFIX}"))
    }
    fn check_file(&self, prefix: &str, digest: &str) -> PathBuf {
        self.runtime_dir.join(format!("{prefix}{}{CHECK_FILE_SUFFIX}", &digest[..16]))
    }
    /// Whether a file name in the runtime directory is one of
    /// [`Paths::check_ca`] or [`Paths::client_bundle`].
    pub fn is_check_file(name: &str) -> bool {
        [CHECK_CA_PREFIX, CLIENT_BUNDLE_PREFIX].iter().any(|p| name.starts_with(p))
            && name.ends_with(CHECK_FILE_SUFFIX)
    }
    /// Whether a file name in the runtime directory is a
    /// [`Paths::client_bundle`].
    pub fn is_client_bundle(name: &str) -> bool {
        name.starts_with(CLIENT_BUNDLE_PREFIX) && name.ends_with(CHECK_FILE_SUFFIX)
    }
    /// A rendered config being validated, before it is renamed over
    /// [`Paths::config_file`].
    pub fn staging_config(&self) -> PathBuf {
        self.runtime_dir.join(STAGING_CONFIG)
    }
    /// The hash of the config HAProxy runs, so the next agent knows what
    /// it adopts.
    pub fn applied_marker(&self) -> PathBuf {
        self.runtime_dir.join(APPLIED_MARKER)
    }
    /// The agent's own pid, for `apilb reload` and operators.
    pub fn agent_pidfile(&self) -> PathBuf {
        self.runtime_dir.join(AGENT_PIDFILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values are part of the interface (docs, the unit, operators'
    /// scripts): they never change by accident.
    #[test]
    fn the_layout_is_stable() {
        let p = Paths { runtime_dir: "/run/apilb".into(), state_dir: "/var/lib/apilb".into() };
        let all = [
            p.config_file(),
            p.staging_config(),
            p.master_socket(),
            p.stats_socket(),
            p.pidfile(),
            p.output_fifo(),
            p.applied_marker(),
            p.agent_pidfile(),
            p.masters_file(),
            p.server_state_file(),
            p.check_ca("0123456789abcdef0123"),
            p.client_bundle("0123456789abcdef0123"),
            p.client_bundle_glob(),
        ];
        let all: Vec<String> = all.iter().map(|f| f.display().to_string()).collect();
        assert_eq!(
            all,
            [
                "/run/apilb/haproxy.cfg",
                "/run/apilb/haproxy.cfg.next",
                "/run/apilb/master.sock",
                "/run/apilb/haproxy.sock",
                "/run/apilb/haproxy.pid",
                "/run/apilb/haproxy.out",
                "/run/apilb/applied.sha256",
                "/run/apilb/apilb.pid",
                "/var/lib/apilb/masters.json",
                "/var/lib/apilb/servers.state",
                "/run/apilb/check-ca-0123456789abcdef.pem",
                "/run/apilb/check-client-0123456789abcdef.pem",
                "/run/apilb/check-client-*.pem",
            ]
        );
        assert_eq!(Paths::longest_socket_name_len(), "/haproxy.sock".len());
        assert!(Paths::is_check_file("check-ca-0123456789abcdef.pem"));
        assert!(Paths::is_client_bundle("check-client-0123456789abcdef.pem"));
        assert!(!Paths::is_client_bundle("check-ca-0123456789abcdef.pem"));
        assert!(!Paths::is_check_file("haproxy.cfg"));
        assert_eq!(Paths::under(Path::new("/tmp/x")).state_dir, Path::new("/tmp/x/state"));
    }
}
