//! Replays the fuzz corpus and the crash reproducers on the stable
//! toolchain, through the same `apilb_testkit::fuzzing` functions the
//! cargo-fuzz targets call (fuzz/fuzz_targets). A panic in any of them
//! fails the test.
//! See docs/fuzzing.md.

use std::path::{Path, PathBuf};

/// What a fuzz target runs on one input.
type Target = fn(&[u8]);

/// Every fuzz target and the function it runs.
const TARGETS: [(&str, Target); 6] = [
    ("config", apilb_testkit::fuzzing::config),
    ("haproxy_reply", apilb_testkit::fuzzing::haproxy_reply),
    ("discovery", apilb_testkit::fuzzing::discovery),
    ("persisted", apilb_testkit::fuzzing::persisted),
    ("kubeconfig", apilb_testkit::fuzzing::kubeconfig),
    ("discovery_stream", apilb_testkit::fuzzing::discovery_stream),
];

/// The files of `fuzz/<kind>/<target>`, sorted; fails when the directory is
/// missing or empty, so a lost corpus cannot pass silently.
fn files(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(kind).join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap_or_else(|e| panic!("{}: {e}", dir.display())).path())
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no input", dir.display());
    files
}

fn replay(target: &str, files: Vec<PathBuf>) {
    let run = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, run)| *run)
        .unwrap_or_else(|| panic!("{target} is not a fuzz target"));
    for file in files {
        let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "fuzz target {target} panics on {}", file.display());
    }
}

/// Every target has a corpus.
#[test]
fn corpus_replays_without_panics() {
    for (target, _) in TARGETS {
        replay(target, files("corpus", target));
    }
}

/// `fuzz/regressions/<target>/` holds the inputs that once crashed a
/// target (only targets with findings have a directory).
#[test]
fn regressions_replay_without_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut targets: Vec<String> = entries
        .map(|e| e.unwrap_or_else(|e| panic!("{}: {e}", dir.display())))
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    targets.sort();
    assert!(!targets.is_empty(), "{} holds no target directory", dir.display());
    for target in targets {
        replay(&target, files("regressions", &target));
    }
}
