//! The docs against the code: every configuration key, metric name, CLI
//! flag, file path and alert runbook link that the documentation mentions
//! must exist in the code, and the lists the docs keep (restart-only
//! settings, metrics, files) must be complete.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use apilb::config::Config;
use apilb::config::restart_only::{Apply, RESTART_ONLY};
use apilb::layout::Paths;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The documentation an operator reads, by path.
fn documents() -> Vec<(String, String)> {
    let mut files = vec![
        "README.md".to_owned(),
        "ARCHITECTURE.md".to_owned(),
        "packaging/apilb.yaml".to_owned(),
        "ansible/roles/apilb/README.md".to_owned(),
        "contrib/prometheus/alerts.yaml".to_owned(),
    ];
    let mut docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    docs.sort();
    files.extend(docs);
    files.into_iter().map(|f| (read(&f), f)).map(|(text, f)| (f, text)).collect()
}

/// The text inside backticks (inline code) and in fenced code blocks.
fn code_spans(text: &str) -> Vec<String> {
    let mut spans = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            spans.push(line.trim().to_owned());
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let (Some(code), _) = (parts.next(), parts.next()) {
            spans.push(code.to_owned());
        }
    }
    spans
}

/// Every key path the schema accepts, and each of its prefixes (sections).
fn config_keys() -> BTreeSet<String> {
    let mut known = BTreeSet::new();
    for key in apilb::manual::keys() {
        let mut prefix = String::new();
        for part in key.path.split('.') {
            if !prefix.is_empty() {
                prefix.push('.');
            }
            prefix.push_str(part);
            known.insert(prefix.clone());
            known.insert(prefix.trim_end_matches("[]").to_owned());
        }
    }
    known
}

/// The dotted fields of `apilb status --json`.
fn status_fields() -> BTreeSet<String> {
    fn walk(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
        if let serde_json::Value::Object(m) = v {
            for (k, child) in m {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                out.insert(path.clone());
                walk(child, &path, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&serde_json::to_value(apilb::status::Status::default()).unwrap(), "", &mut out);
    out
}

const SECTIONS: [&str; 9] =
    ["listen", "masters", "balance", "health", "timeouts", "stats", "metrics", "haproxy", "discovery"];

/// `masters[2].name` → `masters[].name`.
fn normalize_key(word: &str) -> String {
    let mut out = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '[' {
            while chars.peek().is_some_and(|c| c.is_ascii_digit()) {
                chars.next();
            }
        }
    }
    out
}

#[test]
fn every_config_key_the_docs_name_exists() {
    let mut known = config_keys();
    // `apilb status --json` fields share some names (`haproxy.version`).
    known.extend(status_fields());
    let mut unknown = Vec::new();
    for (file, text) in documents() {
        for span in code_spans(&text) {
            // Paths and URLs are not keys (`/etc/apilb/discovery.kubeconfig`).
            for token in span.split(|c: char| c.is_whitespace() || "\"'(),=:{}".contains(c)) {
                if token.contains('/') {
                    continue;
                }
                let word = token.trim_end_matches(['.', '`']);
                let Some((section, _)) = word.split_once('.') else { continue };
                if !SECTIONS.contains(&section.trim_end_matches("[]")) || word.contains("..") {
                    continue;
                }
                // File names (`metrics.rs`, `haproxy.cfg.next`) and API
                // groups (`discovery.k8s.io`) are not keys.
                let file_like = [
                    ".rs", ".cfg", ".next", ".md", ".yaml", ".yml", ".service", ".json", ".io", ".sock",
                    ".pid", ".state",
                ];
                if file_like.iter().any(|ext| word.ends_with(ext)) {
                    continue;
                }
                let key = normalize_key(word);
                if !known.contains(&key) {
                    unknown.push(format!("{file}: `{word}`"));
                }
            }
        }
    }
    assert!(unknown.is_empty(), "the docs name keys the schema does not have:\n{}", unknown.join("\n"));
}

#[test]
fn the_example_config_and_the_man_page_document_every_key() {
    let example = read("packaging/apilb.yaml");
    // The example parses as it is shipped.
    Config::parse(&example, "packaging/apilb.yaml").unwrap();
    let page = apilb::manual::config_page("test");
    for key in apilb::manual::keys() {
        let leaf = key.path.rsplit('.').next().unwrap().trim_end_matches("[]");
        assert!(
            example.lines().any(|l| l.trim_start_matches(['#', ' ', '-']).starts_with(&format!("{leaf}:"))),
            "packaging/apilb.yaml does not show {}",
            key.path
        );
        assert!(page.contains(&key.path.replace('-', "\\-")), "apilb.yaml(5) lacks {}", key.path);
    }
}

/// Metric names registered in src/metrics.rs.
fn registered_metrics() -> BTreeSet<String> {
    let source = read("src/metrics.rs");
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("apilb_")
                && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

fn metric_words(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("apilb_") {
        let start = i + at;
        let before = start.checked_sub(1).map(|b| bytes[b]);
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase() || bytes[end].is_ascii_digit() || bytes[end] == b'_')
        {
            end += 1;
        }
        if !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'/') {
            out.insert(text[start..end].trim_end_matches('_').to_owned());
        }
        i = end.max(start + 1);
    }
    out
}

/// The Ansible role's variables, which share the `apilb_` prefix.
fn role_variables() -> BTreeSet<String> {
    read("ansible/roles/apilb/meta/argument_specs.yml")
        .lines()
        .filter_map(|l| l.trim().strip_suffix(':'))
        .filter(|w| w.starts_with("apilb_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_metric_the_docs_alerts_and_dashboard_use_exists() {
    let registered = registered_metrics();
    let variables = role_variables();
    assert!(variables.contains("apilb_masters_group"), "{variables:?}");
    assert!(registered.len() > 20, "{registered:?}");
    let mut sources = documents();
    sources.push(("contrib/grafana/apilb.json".into(), read("contrib/grafana/apilb.json")));
    sources.push(("contrib/prometheus/alerts_test.yaml".into(), read("contrib/prometheus/alerts_test.yaml")));
    let mut unknown = Vec::new();
    for (file, text) in sources {
        for m in metric_words(&text) {
            if !registered.contains(&m) && !variables.contains(&m) && m != "apilb" {
                unknown.push(format!("{file}: {m}"));
            }
        }
    }
    assert!(unknown.is_empty(), "metrics that do not exist:\n{}", unknown.join("\n"));
}

#[test]
fn the_operations_guide_lists_every_metric() {
    let ops = read("docs/operations.md");
    let listed = metric_words(&ops);
    let missing: Vec<_> = registered_metrics().into_iter().filter(|m| !listed.contains(m)).collect();
    assert!(missing.is_empty(), "docs/operations.md does not list: {missing:?}");
}

/// The flags `apilb SUBCOMMAND --help` lists, global ones included.
fn flags_of(subcommand: &str) -> BTreeSet<String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_apilb"));
    if !subcommand.is_empty() {
        cmd.arg(subcommand);
    }
    let out = cmd.arg("--help").output().unwrap();
    assert!(out.status.success(), "apilb {subcommand} --help");
    String::from_utf8_lossy(&out.stdout)
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == '<')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_apilb_flag_the_docs_use_exists() {
    let subcommands = ["run", "status", "probe", "reload", "check", "render", "completions", "man"];
    let mut bad = Vec::new();
    for (file, text) in documents() {
        for span in code_spans(&text) {
            let words: Vec<&str> = span.split_whitespace().collect();
            for (i, w) in words.iter().enumerate() {
                if *w != "apilb" {
                    continue;
                }
                // `apilb SUB …` up to the end of that command.
                let rest = &words[i + 1..];
                let sub = rest.iter().find(|w| !w.starts_with('-')).copied().unwrap_or_default();
                let sub = if subcommands.contains(&sub) { sub } else { "" };
                let known = flags_of(sub);
                for flag in rest.iter().take_while(|w| !["|", "&&", ";", "#", "apilb"].contains(w)) {
                    let flag = flag.split('=').next().unwrap_or_default().trim_end_matches([',', ')', '`']);
                    if flag.starts_with("--") && !known.contains(flag) && !flags_of("").contains(flag) {
                        bad.push(format!("{file}: `{span}`: apilb {sub} has no {flag}"));
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The files apilb keeps, with the default directories.
fn known_files() -> BTreeSet<String> {
    let config = Config::parse("masters: [10.0.0.1:6443]\n", "t").unwrap();
    let p = Paths::from_config(&config);
    [
        p.config_file(),
        p.staging_config(),
        p.applied_marker(),
        p.agent_pidfile(),
        p.master_socket(),
        p.stats_socket(),
        p.pidfile(),
        p.output_fifo(),
        p.server_state_file(),
        p.masters_file(),
        p.client_bundle_glob(),
    ]
    .iter()
    .map(|f| f.display().to_string())
    .collect()
}

#[test]
fn every_file_path_the_docs_name_exists_and_the_files_table_is_complete() {
    let known = known_files();
    let mut unknown = Vec::new();
    for (file, text) in documents() {
        for dir in ["/run/apilb/", "/var/lib/apilb/"] {
            for (at, _) in text.match_indices(dir) {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || "/._-*".contains(*c))
                    .collect();
                let name = name.trim_end_matches(['.', '/']);
                if name.len() > dir.len() - 1 && !known.contains(name) {
                    unknown.push(format!("{file}: {name}"));
                }
            }
        }
    }
    assert!(unknown.is_empty(), "paths apilb does not use:\n{}", unknown.join("\n"));
    let ops = read("docs/operations.md");
    let table = ops.split("## Files").nth(1).unwrap().split("\n## ").next().unwrap();
    for f in known {
        let name = Path::new(&f).file_name().unwrap().to_string_lossy().into_owned();
        assert!(table.contains(&name), "docs/operations.md's files table lacks {f}");
    }
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces
/// to dashes.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(doc: &str) -> BTreeSet<String> {
    read(doc).lines().filter(|l| l.starts_with('#')).map(|l| anchor(l.trim_start_matches('#'))).collect()
}

#[test]
fn every_runbook_and_doc_link_resolves() {
    let mut broken = Vec::new();
    let mut check = |from: &str, target: &str| {
        let (doc, frag) = target.split_once('#').unwrap_or((target, ""));
        let path = if doc.is_empty() {
            from.to_owned()
        } else if doc.starts_with("docs/") || !from.contains('/') {
            doc.to_owned()
        } else {
            Path::new(from).parent().unwrap().join(doc).display().to_string()
        };
        if doc.starts_with("http") || !path.ends_with(".md") {
            return;
        }
        if !root().join(&path).exists() {
            broken.push(format!("{from}: {target}: no {path}"));
        } else if !frag.is_empty() && !anchors(&path).contains(frag) {
            broken.push(format!("{from}: {target}: no heading #{frag} in {path}"));
        }
    };
    for line in read("contrib/prometheus/alerts.yaml").lines() {
        if let Some(v) =
            line.trim().strip_prefix("runbook:").or_else(|| line.trim().strip_prefix("runbook_url:"))
        {
            let target = v.trim().trim_matches('"').split_whitespace().next().unwrap_or_default().to_owned();
            check("contrib/prometheus/alerts.yaml", &target);
        }
    }
    for (file, text) in documents().into_iter().filter(|(f, _)| f.ends_with(".md")) {
        for (at, _) in text.match_indices("](") {
            let target: String =
                text[at + 2..].chars().take_while(|c| *c != ')' && !c.is_whitespace()).collect();
            check(&file, &target);
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_restart_only_table_is_the_code_s_list() {
    let ops = read("docs/operations.md");
    let marker = "<!-- restart-only:";
    let table = ops.split(marker).nth(1).expect("the restart-only table in docs/operations.md");
    let rows: Vec<&str> = table.lines().skip(3).take_while(|l| l.starts_with('|')).collect();
    assert_eq!(rows.len(), RESTART_ONLY.len(), "{rows:?}");
    for (row, r) in rows.iter().zip(RESTART_ONLY) {
        assert!(row.starts_with(&format!("| `{}` |", r.key)), "{row} is not {}", r.key);
        assert!(row.contains(r.why), "{row}: the why differs from the code's: {}", r.why);
        let how = match r.apply {
            Apply::Handover => "handover",
            Apply::Restart => "systemctl restart apilb",
        };
        let last = row.rsplit('|').nth(1).unwrap();
        assert!(
            last.contains(how) || (r.apply == Apply::Restart && last.trim_start().starts_with("restart")),
            "{row}"
        );
    }
}
