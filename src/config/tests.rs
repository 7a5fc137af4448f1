use super::*;

fn parse(yaml: &str) -> Config {
    Config::parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts that the error for `yaml` contains `needle`, showing it if not.
#[track_caller]
fn err_has(yaml: &str, needle: &str) {
    let e = err(yaml);
    assert!(e.contains(needle), "error {e:?}\n does not contain {needle:?}");
}

fn err(yaml: &str) -> String {
    match Config::parse(yaml, "test.yaml") {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// A config with a CA, so the verification rule is satisfied.
fn with_ca(rest: &str) -> String {
    format!("masters: [10.0.0.1:6443]\nhealth:\n  tls: {{ca_file: /ca.crt}}\n{rest}")
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = parse("masters: [10.0.0.1:6443]\n");
    assert_eq!(c.listen.to_string(), "127.0.0.1:16443");
    assert_eq!(c.balance, Balance::Leastconn);
    assert_eq!(c.health.path.0, "/readyz");
    assert_eq!(c.health.interval.to_string(), "1s");
    assert_eq!(c.health.timeout.to_string(), "1s");
    assert_eq!((c.health.rise, c.health.fall), (2, 2));
    assert_eq!(c.health.expect_status, vec![200]);
    assert_eq!(c.health.auth.mode, AuthMode::Auto);
    assert_eq!(c.health.auth.well_known.len(), 3);
    assert_eq!(c.health.tls.server_name(), "kubernetes");
    assert!(!c.health.tls.insecure_skip_verify);
    assert_eq!(c.timeouts.connect.to_string(), "3s");
    assert_eq!(c.timeouts.client.to_string(), "30m");
    assert_eq!(c.timeouts.server.to_string(), "30m");
    assert!(c.stats.is_none());
    assert_eq!(c.metrics.listen.to_string(), "127.0.0.1:9716");
    assert_eq!(c.haproxy.binary, PathBuf::from("haproxy"));
    assert_eq!(c.haproxy.runtime_dir, PathBuf::from("/run/apilb"));
    assert_eq!(c.haproxy.state_dir, PathBuf::from("/var/lib/apilb"));
    assert_eq!(c.haproxy.hard_stop_after.to_string(), "5m");
}

#[test]
fn masters_accept_strings_maps_ipv6_and_dns_names() {
    let c = parse(
        "masters:\n\
         - 10.0.0.1:6443\n\
         - \"[fd00::2]:6443\"\n\
         - master-3.example.com:6443\n\
         - {name: m4, address: 10.0.0.4:443}\n\
         - {address: \"[::1]:6443\"}\n",
    );
    let names: Vec<_> = c.masters.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["10.0.0.1", "fd00--2", "master-3.example.com", "m4", "--1"]);
    assert_eq!(c.masters[1].address.to_string(), "[fd00::2]:6443");
    assert!(c.masters[2].address.is_dns());
    assert_eq!(c.masters[3].address.port, 443);
}

#[test]
fn masters_sharing_a_host_are_named_by_port() {
    let c = parse("masters: [127.0.0.1:7001, 127.0.0.1:7002]\n");
    let names: Vec<_> = c.masters.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["127.0.0.1-7001", "127.0.0.1-7002"]);
}

#[test]
fn empty_file() {
    assert_eq!(err("  \n"), "test.yaml: masters: the file is empty; at least one master is required");
}

#[test]
fn masters_missing_or_empty() {
    assert_eq!(err("listen: 127.0.0.1:1\n"), "test.yaml: missing field `masters`");
    assert_eq!(
        err("masters: []\n"),
        "test.yaml: masters: at least one master is required, e.g. `- 10.0.0.1:6443`"
    );
}

#[test]
fn master_without_port_names_index_and_line() {
    assert_eq!(
        err("masters:\n  - 10.0.0.1:6443\n  - 10.0.0.2:6443\n  - 10.0.0.3\n"),
        "test.yaml: masters[2]: \"10.0.0.3\" has no port (expected host:port, e.g. 10.0.0.3:6443) \
         at line 4 column 5"
    );
    assert_eq!(
        err("masters:\n  - {name: a, address: 10.0.0.3}\n"),
        "test.yaml: masters[0].address: \"10.0.0.3\" has no port (expected host:port, e.g. \
         10.0.0.3:6443) at line 2 column 24"
    );
}

#[test]
fn bad_ports() {
    for (port, shown) in [("0", "0"), ("70000", "70000"), ("https", "https"), ("", "")] {
        assert_eq!(
            err(&format!("masters: [\"10.0.0.1:{port}\"]\n")),
            format!(
                "test.yaml: masters[0]: \"10.0.0.1:{port}\" has an invalid port \"{shown}\" \
                 (expected 1-65535) at line 1 column 11"
            )
        );
    }
}

#[test]
fn bad_hosts() {
    err_has(
        "masters: [\"fd00::1:6443\"]\n",
        "masters[0]: \"fd00::1:6443\" looks like an IPv6 address; write it in brackets with a port",
    );
    err_has("masters: [\"[fd00::1:6443\"]\n", "has an unclosed '['");
    err_has("masters: [\"[fd00::zz]:6443\"]\n", "\"fd00::zz\" is not a valid IPv6 address");
    err_has("masters: [\"[fd00::1]\"]\n", "\"[fd00::1]\" has no port");
    err_has("masters: [\"[fd00::1]x\"]\n", "has junk after ']'");
    err_has(
        "masters: [\"my_host:6443\"]\n",
        "\"my_host\" is not an IPv4 address, a bracketed IPv6 address or a valid DNS name",
    );
    err_has("masters: [\"10.0.0.300:6443\"]\n", "\"10.0.0.300\" is not a valid IPv4 address");
    err_has("masters: [\":6443\"]\n", "\":6443\" has no host");
    let long = "a".repeat(254);
    err_has(&format!("masters: [\"{long}:6443\"]\n"), "longer than 253");
}

#[test]
fn duplicate_masters() {
    assert_eq!(
        err("masters: [10.0.0.1:6443, 10.0.0.2:6443, 10.0.0.1:6443]\n"),
        "test.yaml: masters[2]: 10.0.0.1:6443 is listed twice (also masters[0])"
    );
    assert_eq!(
        err("masters: [Master-1.example.com:6443, master-1.EXAMPLE.com:6443]\n"),
        "test.yaml: masters[1]: master-1.EXAMPLE.com:6443 is listed twice (also masters[0])"
    );
    assert_eq!(
        err("masters:\n  - {name: a, address: 10.0.0.1:6443}\n  - {name: a, address: 10.0.0.2:6443}\n"),
        "test.yaml: masters[1].name: \"a\" is used twice (also masters[0]); give each master its own name"
    );
}

#[test]
fn bad_names() {
    err_has(
        "masters:\n  - {name: \"a:b\", address: 10.0.0.1:6443}\n",
        "masters[0].name: name \"a:b\" may only contain letters, digits, '-', '_' and '.' at line 2",
    );
    err_has(
        &format!("masters:\n  - {{name: {}, address: 10.0.0.1:6443}}\n", "n".repeat(64)),
        "must be 1 to 63 characters",
    );
}

#[test]
fn unknown_fields_are_refused_with_their_path() {
    err_has("masters: [10.0.0.1:6443]\nlisten_addr: x\n", "unknown field `listen_addr`");
    err_has(
        "masters:\n  - {address: 10.0.0.1:6443, weight: 3}\n",
        "masters[0]: unknown field `weight`, expected `name` or `address` at line 2",
    );
    err_has("masters: [10.0.0.1:6443]\nhealth:\n  intervall: 2s\n", "health: unknown field `intervall`");
    err_has("masters: [10.0.0.1:6443]\nhealth:\n  tls: {cafile: x}\n", "health.tls: unknown field `cafile`");
}

#[test]
fn masters_of_the_wrong_type() {
    err_has("masters: 10.0.0.1:6443\n", "masters: invalid type: string");
    err_has("masters: [42]\n", "masters[0]: invalid type: integer `42`, expected \"host:port\"");
}

#[test]
fn balance_values() {
    for b in ["leastconn", "roundrobin", "random", "source"] {
        assert_eq!(parse(&format!("masters: [10.0.0.1:6443]\nbalance: {b}\n")).balance.as_str(), b);
    }
    err_has(
        "masters: [10.0.0.1:6443]\nbalance: first\n",
        "balance: unknown variant `first`, expected one of `leastconn`, `roundrobin`, `random`, `source` at line 2",
    );
}

#[test]
fn durations_parse_and_print() {
    for (s, ms, shown) in [
        ("500ms", 500, "500ms"),
        ("2s", 2000, "2s"),
        ("30m", 1_800_000, "30m"),
        ("1h", 3_600_000, "1h"),
        ("1m30s", 90_000, "90s"),
        ("1500ms", 1500, "1500ms"),
        ("120s", 120_000, "2m"),
    ] {
        let d: Duration = s.parse().unwrap();
        assert_eq!(d.as_millis(), ms, "{s}");
        assert_eq!(d.to_string(), shown, "{s}");
    }
}

#[test]
fn bad_durations() {
    let e = |v: &str| err(&format!("masters: [10.0.0.1:6443]\ntimeouts:\n  connect: {v}\n"));
    let e_has = |v: &str, needle: &str| {
        let got = e(v);
        assert!(got.contains(needle), "error {got:?}\n does not contain {needle:?}");
    };
    assert_eq!(e("5"), "test.yaml: timeouts.connect: 5 needs a unit, e.g. 5s or 5ms at line 3 column 12");
    e_has("1.5", "timeouts.connect: 1.5 is not a duration; write e.g. 1500ms instead of 1.5s");
    e_has("5 s", "\"5 s\" is not a duration");
    e_has("5d", "\"5d\" is not a duration");
    e_has("s", "\"s\" is not a duration");
    e_has("\"\"", "\"\" is not a duration");
    e_has("-1", "-1 is not a duration");
    e_has("10000h", "is too long (the maximum is 24 days)");
    e_has("99999999999999999999s", "is not a duration");
}

#[test]
fn durations_below_minimums() {
    let c = with_ca("  interval: 50ms\n");
    assert_eq!(err(&c), "test.yaml: health.interval: 50ms is too short; the minimum is 100ms");
    err_has(
        "masters: [10.0.0.1:6443]\ntimeouts: {client: 500ms}\n",
        "timeouts.client: 500ms is too short; the minimum is 1000ms",
    );
    err_has(
        "masters: [10.0.0.1:6443]\nhaproxy: {hard_stop_after: 10ms}\n",
        "haproxy.hard_stop_after: 10ms is too short",
    );
}

#[test]
fn rise_fall_and_status_ranges() {
    assert_eq!(err(&with_ca("  rise: 0\n")), "test.yaml: health.rise: 0 is out of range 1..=100");
    assert_eq!(err(&with_ca("  fall: 101\n")), "test.yaml: health.fall: 101 is out of range 1..=100");
    err_has(
        &with_ca("  expect_status: [200, 700]\n"),
        "health.expect_status[1]: 700 is not an HTTP status code (100-599) at line 4 column 24",
    );
    assert_eq!(
        err(&with_ca("  expect_status: []\n")),
        "test.yaml: health.expect_status: needs at least one status code, e.g. [200]"
    );
}

#[test]
fn check_path_rules() {
    err_has(&with_ca("  path: readyz\n"), "health.path: \"readyz\" must start with '/'");
    err_has(&with_ca("  path: \"/ready z\"\n"), "may only contain letters, digits");
    // Syntax of haproxy.cfg or of HAProxy's runtime API.
    err_has(&with_ca("  path: \"/readyz';x\"\n"), "no spaces, quotes, '\\', '#' or ';'");
    err_has(&with_ca("  path: \"/readyz;show\"\n"), "may only contain letters, digits");
    assert_eq!(parse(&with_ca("  path: /readyz?verbose\n")).health.path.0, "/readyz?verbose");
}

#[test]
fn a_semicolon_cannot_reach_the_runtime_api_through_a_path() {
    err_has(
        "masters: [10.0.0.1:6443]\nhealth: {tls: {ca_file: \"/etc/ca.crt;show sess\"}}\n",
        "health.tls.ca_file: \"/etc/ca.crt;show sess\" contains ';'",
    );
    err_has(
        "masters: [10.0.0.1:6443]\nhealth: {tls: {insecure_skip_verify: true}}\nhaproxy: {runtime_dir: \"/run/a;b\"}\n",
        "haproxy.runtime_dir: \"/run/a;b\" contains ';'",
    );
}

#[test]
fn endpoints_off_loopback_need_an_explicit_expose() {
    let base = "masters: [10.0.0.1:6443]\nhealth: {tls: {insecure_skip_verify: true}}\n";
    err_has(
        &format!("{base}listen: 10.0.0.5:16443\n"),
        "listen: 10.0.0.5:16443 is not a loopback address: other hosts could reach the API servers through \
         this node",
    );
    err_has(&format!("{base}listen: \"0.0.0.0:16443\"\n"), "say so with `expose: [listen]`");
    err_has(&format!("{base}metrics: {{listen: \"10.0.0.5:9716\"}}\n"), "say so with `expose: [metrics]`");
    // `expose: [listen]` does not cover metrics.
    err_has(
        &format!("{base}expose: [listen]\nmetrics: {{listen: \"10.0.0.5:9716\"}}\n"),
        "metrics.listen: 10.0.0.5:9716 is not a loopback address",
    );
    let c = parse(&format!(
        "{base}expose: [listen, metrics]\nlisten: 10.0.0.5:16443\nmetrics: {{listen: \"[::]:9716\"}}\n"
    ));
    assert_eq!(c.expose, vec![Exposed::Listen, Exposed::Metrics]);
    err_has(&format!("{base}expose: [stats]\n"), "expose[0]: unknown variant `stats`");
}

#[test]
fn server_name_must_be_a_dns_name() {
    err_has(
        "masters: [10.0.0.1:6443]\nhealth:\n  tls: {server_name: 10.0.0.1}\n",
        "health.tls.server_name: \"10.0.0.1\" must be a DNS name",
    );
    let c = parse("masters: [10.0.0.1:6443]\nhealth:\n  tls: {server_name: api.example.com}\n");
    assert_eq!(c.health.tls.server_name(), "api.example.com");
}

#[test]
fn verification_needs_a_ca_or_an_explicit_opt_out() {
    let e = err("masters: [10.0.0.1:6443]\nhealth:\n  auth: {mode: none}\n");
    assert_eq!(
        e,
        "test.yaml: health.tls.ca_file: is required to verify the API servers' certificate; set it, \
         or set health.tls.insecure_skip_verify: true to check without verification"
    );
    parse("masters: [10.0.0.1:6443]\nhealth:\n  auth: {mode: none}\n  tls: {insecure_skip_verify: true}\n");
    // auto may find the CA next to the node's credential.
    parse("masters: [10.0.0.1:6443]\nhealth:\n  auth: {mode: auto}\n");
    err_has(
        "masters: [10.0.0.1:6443]\nhealth:\n  tls: {ca_file: /x, insecure_skip_verify: true}\n",
        "health.tls.insecure_skip_verify: is true but ca_file is set",
    );
}

#[test]
fn auth_mode_requirements() {
    assert_eq!(
        err(&with_ca("  auth: {mode: bearer}\n")),
        "test.yaml: health.auth.token_file: is required when health.auth.mode is bearer"
    );
    assert_eq!(
        err(&with_ca("  auth: {mode: client_cert}\n")),
        "test.yaml: health.auth.cert_file: is required when health.auth.mode is client_cert"
    );
    err_has(
        &with_ca("  auth: {mode: none, token_file: /t}\n"),
        "health.auth.mode: is none, but token_file or cert_file is set",
    );
    err_has(
        &with_ca("  auth: {mode: auto, key_file: /k}\n"),
        "health.auth.key_file: is set without health.auth.cert_file",
    );
    err_has(
        &with_ca("  auth: {mode: kerberos}\n"),
        "health.auth.mode: unknown variant `kerberos`, expected one of `none`, `bearer`, `client_cert`, `auto`",
    );
}

#[test]
fn listeners() {
    err_has(
        "masters: [10.0.0.1:6443]\nlisten: localhost:16443\n",
        "listen: \"localhost:16443\" is not an IP:port to listen on",
    );
    err_has(
        "masters: [10.0.0.1:6443]\nstats: {listen: 0.0.0.0:8404}\n",
        "stats.listen: 0.0.0.0:8404 is not a loopback address; exposing HAProxy's stats and /metrics \
         off the node requires stats.auth",
    );
    let c = parse(
        "masters: [10.0.0.1:6443]\nstats:\n  listen: 0.0.0.0:8404\n  auth: {user: admin, password_file: /pw}\n",
    );
    assert_eq!(c.stats.unwrap().auth.unwrap().user, "admin");
    assert_eq!(
        parse("masters: [10.0.0.1:6443]\nstats: {}\n").stats.unwrap().listen.to_string(),
        "127.0.0.1:8404"
    );
    err_has(
        "masters: [10.0.0.1:6443]\nstats: {listen: 127.0.0.1:16443}\n",
        "stats.listen: is the same address as listen",
    );
    err_has(
        "masters: [10.0.0.1:6443]\nmetrics: {listen: 127.0.0.1:16443}\n",
        "metrics.listen: is the same address as listen",
    );
    err_has(
        "masters: [10.0.0.1:6443]\nstats:\n  auth: {user: \"a b\", password_file: /pw}\n",
        "stats.auth.user: \"a b\" may only contain",
    );
    err_has(
        "masters: [10.0.0.1:6443]\nstats:\n  auth: {user: admin}\n",
        "stats.auth: missing field `password_file`",
    );
}

#[test]
fn haproxy_settings() {
    err_has(
        "masters: [10.0.0.1:6443]\nhaproxy: {runtime_dir: run}\n",
        "haproxy.runtime_dir: run must be an absolute path",
    );
    err_has(
        "masters: [10.0.0.1:6443]\nhaproxy: {state_dir: state}\n",
        "haproxy.state_dir: state must be an absolute path",
    );
    let long = format!("/{}", "d".repeat(100));
    err_has(
        &format!("masters: [10.0.0.1:6443]\nhaproxy: {{runtime_dir: {long}}}\n"),
        "is too long: unix socket paths inside it would exceed 107 bytes",
    );
    // The longest socket is haproxy.sock: a directory that leaves room for
    // master.sock but not for it is refused.
    let edge = format!("/{}", "d".repeat(107 - "/haproxy.sock".len()));
    err_has(
        &format!("masters: [10.0.0.1:6443]\nhaproxy: {{runtime_dir: {edge}}}\n"),
        "is too long: unix socket paths inside it would exceed 107 bytes",
    );
    let fits = format!("/{}", "d".repeat(106 - "/haproxy.sock".len()));
    assert!(
        Config::parse(&format!("masters: [10.0.0.1:6443]\nhaproxy: {{runtime_dir: {fits}}}\n"), "t").is_ok()
    );
    err_has("masters: [10.0.0.1:6443]\nhaproxy: {maxconn: 0}\n", "haproxy.maxconn: 0 is out of range");
}

/// Found by fuzzing (fuzz/regressions/config): these paths are words of
/// haproxy.cfg and these names and paths go into its comments. A line break
/// added a line; an unquoted '#' starts a comment, so HAProxy 2.6 accepted
/// `stats socket /run/a#b/haproxy.sock mode 600 level admin` and created a
/// socket at /run/a without `mode 600`, where apilb never looks.
#[test]
fn paths_written_into_haproxy_cfg_cannot_break_it() {
    for (yaml, needle) in [
        (with_ca("haproxy: {runtime_dir: /run/a#b}\n"), "haproxy.runtime_dir: \"/run/a#b\" contains '#'"),
        (with_ca("haproxy: {state_dir: \"/var/lib/a b\"}\n"), "haproxy.state_dir: \"/var/lib/a b\" contains ' '"),
        (with_ca("haproxy: {runtime_dir: \"/run/a'b\"}\n"), "haproxy.runtime_dir: \"/run/a'b\" contains '\\''"),
        (with_ca("haproxy: {runtime_dir: \"/run/a\\\\b\"}\n"), "contains '\\\\'"),
        (
            "masters: [10.0.0.1:6443]\nhealth:\n  tls:\n    ca_file: \"@\\rXTURES@/ca.crt\"\n  auth:\n    mode: none\n"
                .to_owned(),
            "health.tls.ca_file: \"@\\rXTURES@/ca.crt\" contains '\\r'",
        ),
        (
            "masters: [10.0.0.1:6443]\nhealth:\n  auth:\n    well_known: [{name: x, cert_file: /c, ca_file: \"/a\\tb\"}]\n"
                .to_owned(),
            "health.auth.well_known[0].ca_file: \"/a\\tb\" contains '\\t'",
        ),
        (
            "masters: [10.0.0.1:6443]\nhealth:\n  auth:\n    well_known: [{name: \"a\\nb\", cert_file: /c}]\n".to_owned(),
            "health.auth.well_known[0].name: \"a\\nb\" contains the control character '\\n'",
        ),
        (
            with_ca("  auth: {mode: bearer, token_file: \"/t\\n\"}\n"),
            "health.auth.token_file: \"/t\\n\" contains the control character '\\n'",
        ),
    ] {
        err_has(&yaml, needle);
    }
    // Blanks and '#' stay allowed where apilb only reads the file itself.
    let c = parse(&with_ca(
        "  auth: {mode: bearer, token_file: \"/etc/apilb/my token#1\"}\nhaproxy: {binary: \"/opt/ha proxy\"}\n",
    ));
    assert_eq!(c.health.auth.token_file, Some(PathBuf::from("/etc/apilb/my token#1")));
}

#[test]
fn malformed_yaml_reports_the_line() {
    let e = err("masters:\n  - 10.0.0.1:6443\n bad indentation: [\n");
    assert!(e.starts_with("test.yaml: "), "{e}");
    assert!(e.contains("line 3"), "{e}");
}

#[test]
fn unreadable_file() {
    let e = Config::load(Path::new("/nonexistent/apilb.yaml")).unwrap_err().to_string();
    assert_eq!(e, "cannot read config /nonexistent/apilb.yaml: No such file or directory (os error 2)");
}

#[test]
fn settings_hash_ignores_metrics_and_follows_everything_else() {
    let a = parse("masters: [10.0.0.1:6443]\nexpose: [metrics]\nmetrics: {listen: \"10.1.1.1:9716\"}\n");
    let b = parse("masters: [10.0.0.1:6443]\nexpose: [metrics]\nmetrics: {listen: \"10.1.1.2:9716\"}\n");
    let c = parse("masters: [10.0.0.1:6443, 10.0.0.2:6443]\n");
    assert_eq!(a.settings_hash(), b.settings_hash());
    assert_ne!(a.settings_hash(), c.settings_hash());
    assert_eq!(a.settings_hash().len(), 64);
}

#[test]
fn discovery_settings() {
    let c = parse(
        "masters: [10.0.0.1:6443]\ndiscovery:\n  kubernetes:\n    allowed_cidrs: [10.0.0.0/8, \"fd00::/64\"]\n",
    );
    let k = c.discovery.kubernetes.unwrap();
    assert_eq!(k.via, Via::Local);
    assert!(k.kubeconfig.is_none());
    assert!(k.allowed_cidrs[0].contains("10.1.2.3".parse().unwrap()));
    assert!(!k.allowed_cidrs[0].contains("192.168.1.1".parse().unwrap()));
    assert!(k.allowed_cidrs[1].contains("fd00::5".parse().unwrap()));
    assert!(!k.allowed_cidrs[1].contains("10.1.2.3".parse().unwrap()));
    assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("8.8.8.8".parse().unwrap()));
    assert!(parse("masters: [10.0.0.1:6443]\n").discovery.kubernetes.is_none());
    err_has(
        "masters: [10.0.0.1:6443]\ndiscovery:\n  kubernetes:\n    allowed_cidrs: [10.0.0.0/33]\n",
        "discovery.kubernetes.allowed_cidrs[0]: \"10.0.0.0/33\": the prefix length is at most 32 at line 4",
    );
    err_has(
        "masters: [10.0.0.1:6443]\ndiscovery:\n  kubernetes:\n    allowed_cidrs: [10.0.0.0]\n",
        "is not a network like 10.0.0.0/8",
    );
    err_has(
        "masters: [10.0.0.1:6443]\ndiscovery:\n  kubernetes:\n    via: dns\n",
        "discovery.kubernetes.via: unknown variant `dns`",
    );
    err_has("masters: [10.0.0.1:6443]\ndiscovery:\n  consul: {}\n", "discovery: unknown field `consul`");
}

/// Every broken cross-field rule is reported at once, one line each, in the
/// order the fields are checked; a field is named once.
#[test]
fn every_cross_field_error_is_reported_at_once() {
    let yaml = "masters: [10.0.0.1:6443, 10.0.0.1:6443]\n\
                health: {tls: {ca_file: /ca.crt}, rise: 0, interval: 10ms}\n\
                haproxy: {state_dir: state, maxconn: 0}\n";
    let e = Config::parse(yaml, "test.yaml").unwrap_err();
    let ConfigError::InvalidMany { problems, .. } = &e else { panic!("not several: {e:?}") };
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        ["masters[1]", "health.interval", "health.rise", "haproxy.maxconn", "haproxy.state_dir"]
    );
    assert_eq!(
        e.to_string(),
        "test.yaml: masters[1]: 10.0.0.1:6443 is listed twice (also masters[0])\n\
         test.yaml: health.interval: 10ms is too short; the minimum is 100ms\n\
         test.yaml: health.rise: 0 is out of range 1..=100\n\
         test.yaml: haproxy.maxconn: 0 is out of range 1..=1000000\n\
         test.yaml: haproxy.state_dir: state must be an absolute path"
    );
}

/// A single broken rule keeps the one-line form (`ConfigError::Invalid`).
#[test]
fn a_single_cross_field_error_is_one_line() {
    let yaml = "masters: [10.0.0.1:6443]\nhealth: {tls: {ca_file: /ca.crt}, rise: 0}\n";
    let e = Config::parse(yaml, "t.yaml").unwrap_err();
    assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
    assert_eq!(e.to_string(), "t.yaml: health.rise: 0 is out of range 1..=100");
}

/// A field breaking two rules is named once, with the first.
#[test]
fn a_field_is_reported_once() {
    let dir = format!("run/{}", "x".repeat(120));
    let e = err(&with_ca(&format!("haproxy: {{runtime_dir: {dir}}}\n")));
    assert_eq!(e, format!("test.yaml: haproxy.runtime_dir: {dir} must be an absolute path"));
}
