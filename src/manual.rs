//! The manual page of the configuration file, apilb.yaml(5), generated from
//! the same two sources as everything else about the file: the annotated
//! example (packaging/apilb.yaml, shipped as the conffile) for the words,
//! and the schema ([`Config`]) for the list of keys and their defaults, so
//! the page names every key the code accepts and no other.

use std::fmt::Write as _;

use crate::config::Config;
use crate::config::restart_only::{Apply, RESTART_ONLY};

/// The annotated example configuration, as shipped.
pub const EXAMPLE: &str = include_str!("../packaging/apilb.yaml");

/// A config with every optional section present, to list their keys.
const EVERY_SECTION: &str = "masters: [10.0.0.1:6443]\n\
    stats: {listen: 127.0.0.1:8404, auth: {user: admin, password_file: /etc/apilb/stats-password}}\n\
    discovery: {kubernetes: {kubeconfig: /etc/apilb/discovery.kubeconfig, allowed_cidrs: [10.0.0.0/24]}}\n\
    health: {tls: {ca_file: /etc/apilb/ca.crt}, auth: {token_file: /etc/apilb/token, cert_file: /etc/apilb/check.crt, key_file: /etc/apilb/check.key}}\n";

/// The smallest config: the defaults of everything else.
const DEFAULTS: &str = "masters: [10.0.0.1:6443]\n";

/// One key of apilb.yaml.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// Dotted path; `[]` marks the entries of a list (`masters[].name`).
    pub path: String,
    /// Its default as YAML, when it has one.
    pub default: Option<String>,
}

/// Every key the schema accepts, in the schema's order.
pub fn keys() -> Vec<Key> {
    let value = |yaml: &str| {
        let config = Config::parse(yaml, "schema").unwrap_or_else(|e| panic!("built-in example: {e}"));
        serde_yaml::to_value(&config).unwrap_or_else(|e| panic!("built-in example: {e}"))
    };
    let (every, defaults) = (value(EVERY_SECTION), value(DEFAULTS));
    let mut out = Vec::new();
    walk(&every, "", &mut out);
    for key in &mut out {
        key.default = lookup(&defaults, &key.path)
            .filter(|v| !v.is_null() && key.path != "masters" && !key.path.contains("[]"))
            .map(inline);
    }
    out
}

/// A default on one line: scalars as YAML, lists in flow style, a list of
/// maps by its length.
fn inline(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::Sequence(s) if s.iter().any(|e| e.is_mapping()) => {
            format!("{} entries (see EXAMPLE)", s.len())
        }
        serde_yaml::Value::Sequence(s) => {
            format!("[{}]", s.iter().map(inline).collect::<Vec<_>>().join(", "))
        }
        other => serde_yaml::to_string(other).unwrap_or_default().trim().to_owned(),
    }
}

fn walk(v: &serde_yaml::Value, prefix: &str, out: &mut Vec<Key>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, child) in m {
                let name = k.as_str().unwrap_or_default();
                let path = if prefix.is_empty() { name.to_owned() } else { format!("{prefix}.{name}") };
                match child {
                    serde_yaml::Value::Mapping(_) => walk(child, &path, out),
                    serde_yaml::Value::Sequence(s) if s.iter().any(|e| e.is_mapping()) => {
                        out.push(Key { path: path.clone(), default: None });
                        if let Some(first) = s.iter().find(|e| e.is_mapping()) {
                            walk(first, &format!("{path}[]"), out);
                        }
                    }
                    _ => out.push(Key { path, default: None }),
                }
            }
        }
        _ => out.push(Key { path: prefix.to_owned(), default: None }),
    }
}

fn lookup<'a>(v: &'a serde_yaml::Value, path: &str) -> Option<&'a serde_yaml::Value> {
    path.split('.').try_fold(v, |v, part| match part.strip_suffix("[]") {
        Some(list) => v.get(list)?.as_sequence()?.first(),
        None => v.get(part),
    })
}

/// Escapes text for roff: backslashes, and a leading `.` or `'`.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') { format!("\\&{t}") } else { t }
}

/// The page, in roff (man(7)).
pub fn config_page(version: &str) -> String {
    let mut p = String::new();
    let _ = writeln!(p, ".TH APILB.YAML 5 \"\" \"apilb {version}\" \"File Formats\"");
    p.push_str(".SH NAME\napilb.yaml \\- configuration of the apilb agent\n");
    p.push_str(".SH SYNOPSIS\n/etc/apilb/apilb.yaml (or \\fBapilb \\-\\-config\\fR \\fIFILE\\fR, or \\fBAPILB_CONFIG\\fR)\n");
    p.push_str(".SH DESCRIPTION\n");
    // The example's opening comment, its blank comment lines as paragraph
    // breaks.
    for line in EXAMPLE.lines().take_while(|l| l.starts_with('#')).map(|l| l.trim_start_matches('#').trim()) {
        if line.is_empty() {
            p.push_str(".PP\n");
        } else if line.contains(":  ") {
            // "Validate after editing:  apilb check …": one per line.
            let _ = writeln!(p, "{}\n.br", roff(line));
        } else {
            let _ = writeln!(p, "{}", roff(line));
        }
    }
    p.push_str(
        ".PP\nUnknown keys are errors. Every error names the key and the line, and \
         \\fBapilb check\\fR exits with code 2. The agent applies a changed file by \
         itself (within about two seconds) or on \\fBsystemctl reload apilb\\fR, \
         through a validated hitless reload, except the settings under \
         RESTART\\-ONLY SETTINGS.\n",
    );
    p.push_str(".SH KEYS\nEvery key, with its default (none: required or off unless set).\n");
    for key in keys() {
        let _ = writeln!(p, ".TP\n\\fB{}\\fR", roff(&key.path));
        match key.default {
            Some(d) if !d.is_empty() => {
                let _ = writeln!(p, "default: {}", roff(&d.replace('\n', " ")));
            }
            _ => p.push_str("no default\n"),
        }
    }
    p.push_str(".SH RESTART-ONLY SETTINGS\nRead only when the agent starts:\n");
    for r in RESTART_ONLY {
        let how = match r.apply {
            Apply::Handover => "hand over to a new agent (HAProxy keeps serving)",
            Apply::Restart => "restart HAProxy (drops every connection once)",
        };
        let _ = writeln!(p, ".TP\n\\fB{}\\fR\n{}: {}.", roff(r.key), roff(how), roff(r.why));
    }
    p.push_str(".SH EXAMPLE\nThe file as shipped, with what each setting means:\n.PP\n.nf\n.ft CR\n");
    for line in EXAMPLE.lines() {
        let _ = writeln!(p, "{}", roff(line));
    }
    p.push_str(".ft\n.fi\n");
    p.push_str(
        ".SH FILES\n/etc/apilb/apilb.yaml, /usr/share/apilb/apilb.yaml (the pristine example)\n\
         .SH SEE ALSO\n\\fBapilb\\fR(1), \\fBapilb\\-check\\fR(1), \\fBhaproxy\\fR(1)\n",
    );
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_listed_once_with_its_default() {
        let keys = keys();
        let paths: Vec<&str> = keys.iter().map(|k| k.path.as_str()).collect();
        for want in [
            "listen",
            "masters",
            "masters[].name",
            "masters[].address",
            "health.auth.well_known[].cert_file",
            "stats.auth.password_file",
            "discovery.kubernetes.allowed_cidrs",
            "haproxy.maxconn",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        let mut sorted = paths.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), paths.len(), "duplicates in {paths:?}");
        let default = |p: &str| keys.iter().find(|k| k.path == p).unwrap().default.clone();
        assert_eq!(default("listen").as_deref(), Some("127.0.0.1:16443"));
        assert_eq!(default("haproxy.maxconn").as_deref(), Some("4096"));
        assert_eq!(default("stats.listen"), None);
        assert_eq!(default("health.expect_status").as_deref(), Some("[200]"));
        assert_eq!(default("health.auth.well_known").as_deref(), Some("3 entries (see EXAMPLE)"));
    }

    #[test]
    fn the_page_is_roff_with_every_key() {
        let page = config_page("1.2.3");
        assert!(page.starts_with(".TH APILB.YAML 5"));
        for key in keys() {
            assert!(page.contains(&format!("\\fB{}\\fR", roff(&key.path))), "{}", key.path);
        }
        // No line starts a roff request by accident.
        for line in page.lines().filter(|l| l.starts_with('.')) {
            let request = line[1..].split_whitespace().next().unwrap_or_default();
            assert!(["TH", "SH", "TP", "PP", "br", "nf", "fi", "ft"].contains(&request), "{line}");
        }
    }
}
