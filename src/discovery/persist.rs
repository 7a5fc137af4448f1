//! The last applied master set, kept in the state directory so a node whose
//! static seeds are all gone still reaches the cluster after a restart.
//!
//! A missing file is normal; a corrupt or unreadable one is reported and
//! ignored, never fatal: the static seeds still work.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Address, Master};
use crate::fsutil;

/// The file's format.
#[derive(Serialize, Deserialize)]
struct File {
    /// Format version, 1.
    version: u32,
    /// When it was written (Unix seconds).
    saved_at: u64,
    /// The masters.
    masters: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    name: String,
    address: String,
}

/// Why the saved set cannot be used: a warning for the log, never fatal.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The file exists but cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The saved set's file.
        path: PathBuf,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not the saved set's JSON.
    #[error("{} is corrupt: {source}", path.display())]
    Corrupt {
        /// The saved set's file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// An entry's address does not parse.
    #[error("{} is corrupt: {problem}", path.display())]
    BadAddress {
        /// The saved set's file.
        path: PathBuf,
        /// What is wrong with the address (the config's own message).
        problem: String,
    },
    /// A format version this apilb does not know (written by a newer one).
    #[error("{} has unknown format version {version}", path.display())]
    Version {
        /// The saved set's file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
}

/// Errors compare by their message: the fuzz target compares parse results,
/// and the JSON error inside has no equality of its own.
impl PartialEq for PersistError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

/// Reads the saved set. `Err` carries a warning for the log; the caller
/// goes on without it.
pub fn load(path: &Path) -> Result<Vec<Master>, PersistError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(PersistError::Read { path: path.to_owned(), source }),
    };
    parse(&text, path)
}

/// Parses the saved set's JSON; `path` names the file in the warnings.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Master>, PersistError> {
    let file: File = serde_json::from_str(text)
        .map_err(|source| PersistError::Corrupt { path: path.to_owned(), source })?;
    if file.version != 1 {
        return Err(PersistError::Version { path: path.to_owned(), version: file.version });
    }
    let mut masters = Vec::with_capacity(file.masters.len());
    for e in file.masters {
        let address: Address = e
            .address
            .parse()
            .map_err(|problem| PersistError::BadAddress { path: path.to_owned(), problem })?;
        masters.push(Master { name: e.name, address });
    }
    Ok(masters)
}

/// Saves the set atomically (0600).
pub fn save(path: &Path, masters: &[Master]) -> std::io::Result<()> {
    let saved_at =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let json = to_json(masters, saved_at).map_err(std::io::Error::other)?;
    fsutil::write_atomic(path, &json, 0o600)
}

/// The file's content for `masters`, written at `saved_at` (Unix seconds).
pub fn to_json(masters: &[Master], saved_at: u64) -> Result<Vec<u8>, serde_json::Error> {
    let file = File {
        version: 1,
        saved_at,
        masters: masters
            .iter()
            .map(|m| Entry { name: m.name.clone(), address: m.address.to_string() })
            .collect(),
    };
    serde_json::to_vec_pretty(&file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_missing_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let dir_path = dir.path().to_path_buf();
        let p = crate::layout::Paths { runtime_dir: dir_path.clone(), state_dir: dir_path }.masters_file();
        assert_eq!(load(&p).unwrap(), vec![]);
        let m = vec![Master { name: "10.0.0.1".into(), address: "10.0.0.1:6443".parse().unwrap() }];
        save(&p, &m).unwrap();
        assert_eq!(load(&p).unwrap(), m);
        std::fs::write(&p, "{not json").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("is corrupt"));
        std::fs::write(&p, r#"{"version":1,"saved_at":0,"masters":[{"name":"x","address":"nope"}]}"#)
            .unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("has no port"));
        std::fs::write(&p, r#"{"version":9,"saved_at":0,"masters":[]}"#).unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("unknown format version 9"));
    }
}
