//! Atomic, permission-safe file writes.
//!
//! Every file apilb writes goes through [`write_atomic`]: the content lands
//! in a temporary file in the same directory, is flushed to disk, and is
//! renamed over the target. A reader (HAProxy re-reading its config on
//! reload, or a restarting apilb) sees the old file or the new one, never a
//! torn one; a full disk fails the write and leaves the old file in place.
//!
//! The temporary file has an unpredictable name and is created exclusively
//! (`O_CREAT|O_EXCL`, which never follows a symlink), with the final mode
//! from the start: another local user can neither plant a symlink that
//! redirects the write nor pre-create the file to read what is written
//! (`apilb render -o` may write into a shared directory).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Writes `contents` to `path` atomically with the given mode (e.g. 0o600).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(mode & 0o600))
        .tempfile_in(dir)?;
    // The mode given at creation is filtered by the umask; set it exactly.
    tmp.as_file().set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    // On failure the temporary file is removed when `tmp` drops.
    tmp.persist(path).map_err(|e| e.error)?;
    // Make the rename itself durable.
    fs::File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) if missing and makes it private (0700).
/// Refuses a symlink, something other than a directory, or a directory
/// owned by another user: apilb keeps the config HAProxy loads (as root)
/// and the check's credential there, so whoever controls the directory
/// could swap them.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    let meta = fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is a symbolic link; apilb keeps its private files only in a real directory",
        ));
    }
    if !meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "exists and is not a directory"));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "is owned by uid {}, not by apilb's user (uid {me}): that user could replace the files HAProxy \
                 loads; remove it or give it to uid {me}",
                meta.uid()
            ),
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_with_exact_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// `apilb render -o` as root into a directory another user can write:
    /// a symlink or a file planted under the temporary name of the old
    /// scheme (`.NAME.tmp.<pid>`) must neither redirect the write nor see
    /// its content.
    #[test]
    fn planted_temporary_files_are_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("haproxy.cfg");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        let predictable = dir.path().join(format!(".haproxy.cfg.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &predictable).unwrap();
        write_atomic(&target, b"secret", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::metadata(&victim).unwrap().permissions().mode() & 0o777, 0o644);
        fs::remove_file(&predictable).unwrap();
        // A file pre-created (readable by its owner, e.g. another user).
        fs::write(&predictable, b"").unwrap();
        fs::set_permissions(&predictable, fs::Permissions::from_mode(0o666)).unwrap();
        write_atomic(&target, b"secret 2", 0o600).unwrap();
        assert_eq!(fs::read(&predictable).unwrap(), b"");
        assert_eq!(fs::read(&target).unwrap(), b"secret 2");
        assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_private_dir_must_be_a_real_directory_of_ours() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        ensure_private_dir(&real).unwrap();
        assert_eq!(fs::metadata(&real).unwrap().permissions().mode() & 0o777, 0o700);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = ensure_private_dir(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(ensure_private_dir(&file).unwrap_err().to_string().contains("not a directory"));
        if nix::unistd::geteuid().is_root() {
            // Another user's directory (as root, give it away).
            let theirs = dir.path().join("theirs");
            fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let e = ensure_private_dir(&theirs).unwrap_err();
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        }
    }

    #[test]
    fn failed_write_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"old", 0o600).unwrap();
        // Renaming a file over a non-empty directory fails.
        let target = dir.path().join("d");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"").unwrap();
        assert!(write_atomic(&target, b"new", 0o600).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
