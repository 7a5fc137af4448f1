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
use crate::render::{Paths, Rendered};

/// The oldest HAProxy apilb renders for (Debian 12 ships 2.6; 2.4 is the
/// oldest whose directives the template uses).
pub const MIN_VERSION: (u32, u32) = (2, 4);

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
        Command::new(&self.path)
            .args(args)
            .stdin(Stdio::null())
            .env_remove("NOTIFY_SOCKET")
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| BinaryError::Spawn { binary: self.path.clone(), source })
    }

    /// `haproxy -v`, checked against [`MIN_VERSION`].
    pub async fn version(&self) -> Result<Version, BinaryError> {
        let out = self.output(&["-v".as_ref()]).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or_default().to_owned();
        let version = parse_version(&first)
            .ok_or_else(|| BinaryError::Version { binary: self.path.clone(), output: first })?;
        if (version.parts.0, version.parts.1) < MIN_VERSION {
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
    write(config_file, rendered.text.as_bytes())
}

/// Parses the first line of `haproxy -v`:
/// `HAProxy version 2.6.12-1+deb12u3 2025/10/03 - https://haproxy.org/`.
pub fn parse_version(line: &str) -> Option<Version> {
    let full = line.split_whitespace().skip_while(|w| *w != "version").nth(1)?;
    let mut nums =
        full.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse::<u32>().ok());
    let major = nums.next()??;
    let minor = nums.next()??;
    let patch = nums.next().flatten().unwrap_or(0);
    Some(Version { parts: (major, minor, patch), full: full.to_owned() })
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
}
