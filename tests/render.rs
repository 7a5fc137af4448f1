//! Golden-file tests of the rendered haproxy.cfg, and the real `haproxy -c`
//! on every golden output.
//!
//! Each `tests/golden/<case>.yaml` renders to `tests/golden/<case>.cfg`,
//! for HAProxy 2.6, or 3.0 when the case's name starts with `haproxy-3.0`.
//! `@FIXTURES@` stands for tests/fixtures in both. After an intended change
//! to the template, regenerate with `APILB_UPDATE_GOLDEN=1 cargo test --test
//! render` and review the diff.

use std::path::{Path, PathBuf};

use apilb::config::Config;
use apilb::haproxy::Binary;
use apilb::inputs::Inputs;
use apilb::layout::Paths;
use apilb::render::{self, Rendered};

const PLACEHOLDER: &str = "@FIXTURES@";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> String {
    root().join("tests/fixtures").display().to_string()
}

struct Case {
    name: String,
    config: Config,
    rendered: Rendered,
}

fn cases() -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("tests/golden"))
        .expect("tests/golden")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "golden cases are missing");
    files
        .into_iter()
        .map(|path| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let yaml = std::fs::read_to_string(&path).unwrap().replace(PLACEHOLDER, &fixtures());
            let config = Config::parse(&yaml, &name).unwrap_or_else(|e| panic!("{e}"));
            let mut inputs = Inputs::gather(&config).unwrap_or_else(|e| panic!("{name}: {e}"));
            // As root on a host with Debian's haproxy package, whoever runs
            // the tests: the goldens must not depend on it.
            inputs.run_as = (!config.haproxy.user.is_empty())
                .then(|| apilb::inputs::RunAs { user: config.haproxy.user.clone(), group: "haproxy".into() });
            // `haproxy-3.0*` cases render for HAProxy 3.0, the others for
            // the oldest version supported.
            let features = if name.starts_with("haproxy-3.0") {
                apilb::haproxy::parse_version("HAProxy version 3.0.11-1+deb13u5").unwrap().features()
            } else {
                render::Features::default()
            };
            let rendered = render::render(&config, &inputs, &Paths::from_config(&config), features);
            Case { name, config, rendered }
        })
        .collect()
}

#[test]
fn renders_match_golden_files() {
    let update = std::env::var_os("APILB_UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for case in cases() {
        let got = case.rendered.text.expose().replace(&fixtures(), PLACEHOLDER);
        let golden = root().join(format!("tests/golden/{}.cfg", case.name));
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (run with APILB_UPDATE_GOLDEN=1)", golden.display()));
        if got != want {
            mismatches.push(format!("--- {}\n{}", case.name, first_difference(&want, &got)));
        }
    }
    assert!(mismatches.is_empty(), "rendered configs differ from goldens:\n{}", mismatches.join("\n"));
}

fn first_difference(want: &str, got: &str) -> String {
    for (i, (w, g)) in want.lines().zip(got.lines()).enumerate() {
        if w != g {
            return format!("line {}:\n  golden:   {w}\n  rendered: {g}", i + 1);
        }
    }
    format!("lengths differ: golden {} lines, rendered {}", want.lines().count(), got.lines().count())
}

#[test]
fn rendering_is_deterministic() {
    for (a, b) in cases().into_iter().zip(cases()) {
        assert_eq!(a.rendered.text, b.rendered.text, "{}", a.name);
        assert_eq!(a.rendered.hash, b.rendered.hash, "{}", a.name);
        assert_eq!(a.rendered.hash.len(), 64);
    }
}

#[test]
fn secrets_are_redacted_and_only_in_the_full_text() {
    let token = std::fs::read_to_string(root().join("tests/fixtures/token")).unwrap();
    let password = std::fs::read_to_string(root().join("tests/fixtures/stats-password")).unwrap();
    let (token, password) = (token.trim(), password.trim_end_matches('\n'));
    let by_name = |n: &str| cases().into_iter().find(|c| c.name == n).unwrap();

    let bearer = by_name("bearer");
    assert!(bearer.rendered.text.expose().contains(&format!("hdr Authorization 'Bearer {token}'")));
    assert!(!bearer.rendered.redacted().contains(token));
    assert!(bearer.rendered.redacted().contains("'Bearer <redacted>'"));

    let stats = by_name("stats-auth");
    assert!(stats.rendered.text.expose().contains(&render::quote(password)));
    assert!(!stats.rendered.redacted().contains(password));
    assert!(stats.rendered.redacted().contains("insecure-password <redacted>"));
    // HAProxy messages quoting a secret are redacted too.
    let msg = format!("[ALERT] parsing: bad header 'Bearer {token}'");
    assert!(!bearer.rendered.redact(&msg).contains(token));
}

#[test]
fn every_master_has_a_checked_line_and_a_fail_open_twin() {
    for case in cases() {
        let text = case.rendered.text.expose();
        for m in &case.config.masters {
            let checked = format!("    server {} {} check check-ssl ", m.name, m.address);
            let twin = format!("    server {}:fallback {} backup", m.name, m.address);
            assert!(text.contains(&checked), "{}: no checked line for {}", case.name, m.name);
            assert!(text.contains(&twin), "{}: no fallback for {}", case.name, m.name);
        }
        // On 3.0, and with the persistent checker, the agent closes a
        // failed master's sessions instead.
        assert_eq!(
            text.contains("on-marked-down shutdown-sessions"),
            apilb::render::haproxy_closes_sessions(&case.config, case.rendered.features),
            "{}",
            case.name
        );
        for needle in [
            "option allbackups",
            "option redispatch 1",
            "observe layer4 error-limit 10 on-error fastinter",
            "mode 600 level admin",
            "hard-stop-after ",
        ] {
            assert!(text.contains(needle), "{}: missing {needle:?}", case.name);
        }
        assert!(!text.contains("verify none") || !text.contains("Authorization"), "{}", case.name);
    }
}

/// Rewrites a golden's paths to a scratch directory, writes the files it
/// needs and returns the config path, so `haproxy -c` sees the golden text.
fn materialize(case: &Case, scratch: &Path) -> PathBuf {
    let paths = Paths::from_config(&case.config);
    let local = Paths::under(scratch);
    let (run, state) = (&local.runtime_dir, &local.state_dir);
    let relocate = |s: &str| {
        s.replace(&paths.runtime_dir.display().to_string(), &run.display().to_string())
            .replace(&paths.state_dir.display().to_string(), &state.display().to_string())
    };
    std::fs::create_dir_all(run).unwrap();
    std::fs::create_dir_all(state).unwrap();
    for aux in &case.rendered.aux_files {
        let path = relocate(&aux.path.display().to_string());
        std::fs::write(path, aux.contents.expose()).unwrap();
    }
    let file = local.config_file();
    std::fs::write(&file, relocate(case.rendered.text.expose())).unwrap();
    file
}

#[tokio::test]
async fn haproxy_accepts_every_golden_output() {
    let binary = Binary::new("haproxy");
    let version = binary.version().await.unwrap_or_else(|e| {
        panic!("the real HAProxy is required for this test ({e}); run scripts/test, which installs it")
    });
    eprintln!("validating goldens with HAProxy {}", version.full);
    for case in cases() {
        let scratch = tempfile::tempdir().unwrap();
        let file = materialize(&case, scratch.path());
        let warnings = binary
            .check(&file, |l| case.rendered.redact(l))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        // The only acceptable warnings: no server state yet, and the
        // deliberately unresolvable name of the dns case.
        for w in warnings {
            assert!(
                w.contains("server state file") || (case.name == "dns" && w.contains("could not resolve")),
                "{}: unexpected warning {w}",
                case.name
            );
        }
    }
}

#[tokio::test]
async fn haproxy_refusal_is_reported_with_its_reason_and_redacted() {
    let case = cases().into_iter().find(|c| c.name == "bearer").unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let file = materialize(&case, scratch.path());
    // Break the config in a way that makes HAProxy quote the secret line.
    let text =
        std::fs::read_to_string(&file).unwrap().replace("http-check send meth", "http-check send bogus meth");
    std::fs::write(&file, text).unwrap();
    let err = Binary::new("haproxy").check(&file, |l| case.rendered.redact(l)).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("HAProxy refused the configuration:"), "{msg}");
    assert!(msg.contains("[ALERT]"), "{msg}");
    assert!(msg.contains("http-check send"), "{msg}");
    assert!(!msg.contains("fixture-token-not-a-secret"), "{msg}");
}
