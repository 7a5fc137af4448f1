//! The health check end to end: every credential mode against API servers
//! with anonymous auth off, bootstrap and the switch to a real credential,
//! and `apilb probe`'s diagnoses.

mod support;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use apilb::layout::Paths;
use apilb_testkit::lab::{LabAuth, LabOptions};
use apilb_testkit::testapi::{ApiServer, ApiServerOptions, Auth};
use support::*;

fn apilb() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_apilb"));
    c.env("PATH", format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()));
    c
}

async fn probe(config: &std::path::Path, args: &[&str]) -> (i32, String) {
    let config = config.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        apilb().arg("probe").arg("--config").arg(config).args(args).output().unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_checks_authenticate_with_the_token() {
    let mut env = Env::new(LabOptions { auth: LabAuth::Bearer, ..LabOptions::default() }).await;
    env.start_agent().await;
    let s = env.wait_all_up().await;
    assert_eq!(s.check.auth, "bearer");
    assert!(env.lab.servers.iter().all(|srv| srv.stats().by_token.load(Ordering::SeqCst) > 0));
    assert!(env.lab.servers.iter().all(|srv| srv.stats().unauthorized.load(Ordering::SeqCst) == 0));
    let (code, out) = probe(&env.lab.config_path(), &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("auth    bearer"), "{out}");
    assert!(!out.contains(&env.lab.token), "the token is never printed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_checks_authenticate_with_the_certificate() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    let s = env.wait_all_up().await;
    assert_eq!(s.check.auth, "client_cert");
    assert!(env.lab.servers.iter().all(|srv| srv.stats().by_cert.load(Ordering::SeqCst) > 0));
    // HAProxy reads the combined certificate+key bundle from the runtime dir.
    let bundles: Vec<_> = std::fs::read_dir(env.lab.path("run"))
        .unwrap()
        .flatten()
        .filter(|e| Paths::is_client_bundle(&e.file_name().to_string_lossy()))
        .collect();
    assert_eq!(bundles.len(), 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(bundles[0].metadata().unwrap().permissions().mode() & 0o777, 0o600);
    let (code, out) = probe(&env.lab.config_path(), &["master-2"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("master-2") && !out.contains("master-1 ("), "{out}");
    assert!(out.contains("names    DNS:kubernetes"), "{out}");
    assert!(out.contains("verified against"), "{out}");
    assert!(out.contains("GET /readyz → 200"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_none_is_strict() {
    // Servers that allow anonymous requests: UP.
    let mut env = Env::new(LabOptions { auth: LabAuth::Anonymous, ..LabOptions::default() }).await;
    env.start_agent().await;
    let s = env.wait_all_up().await;
    assert_eq!(s.check.auth, "none");
    drop(env);

    // Servers with anonymous auth off: a 401 is a failure, not "alive".
    let mut env = Env::new(LabOptions::default()).await;
    let yaml = env.lab.config_yaml("").replace(
        &format!(
            "{{mode: client_cert, cert_file: {d}/node.crt, key_file: {d}/node.key}}",
            d = env.lab.dir.path().display()
        ),
        "{mode: none}",
    );
    env.lab.write_config(&yaml).unwrap();
    env.start_agent().await;
    let s = env
        .wait_status(Duration::from_secs(10), "all DOWN on 401", |s| {
            s.masters.iter().all(|m| m.state == "DOWN" && m.check_code == Some(401))
        })
        .await;
    assert_eq!(s.masters[0].check_status, "L7STS");
    let (code, out) = probe(&env.lab.config_path(), &["master-1"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("401 Unauthorized: the API server has anonymous auth off"), "{out}");
    assert!(out.contains("health.auth.mode: client_cert"), "{out}");
    assert!(out.contains("kind: AuthenticationConfiguration"), "{out}");
    assert!(out.contains("- path: /readyz"), "{out}");
    assert!(out.contains("[-]etcd") || out.contains("Unauthorized"), "the verbose body is shown: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_bootstraps_then_switches_to_the_node_credential_by_itself() {
    let mut env = Env::new(LabOptions::default()).await;
    let d = env.lab.dir.path().display().to_string();
    // A k3s-like node before it joined: nothing at the well-known paths.
    let agent_dir = env.lab.path("var-lib-rancher-k3s-agent");
    let auto = format!(
        "{{mode: auto, well_known: [{{name: k3s-agent, cert_file: {a}/client-kubelet.crt, key_file: {a}/client-kubelet.key, ca_file: {a}/server-ca.crt}}]}}",
        a = agent_dir.display()
    );
    let yaml = env
        .lab
        .config_yaml("")
        .replace(&format!("{{mode: client_cert, cert_file: {d}/node.crt, key_file: {d}/node.key}}"), &auto)
        .replace(
            &format!("  tls: {{ca_file: {d}/ca.crt, server_name: kubernetes}}\n"),
            "  tls: {server_name: kubernetes}\n",
        );
    env.lab.write_config(&yaml).unwrap();
    let check = apilb().arg("check").arg("--config").arg(env.lab.config_path()).output().unwrap();
    let check_out = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{check_out}");
    assert!(check_out.contains("no credential found"), "{check_out}");
    assert!(check_out.contains("credential bootstrap"), "{check_out}");

    env.start_agent().await;
    // 401 counts as alive: every master UP, but the status says why.
    let s = env
        .wait_status(Duration::from_secs(10), "UP on 401", |s| {
            s.masters.iter().all(|m| m.state == "UP" && m.check_code == Some(401))
        })
        .await;
    assert_eq!(s.check.auth, "bootstrap");
    assert!(!s.check.verified);
    let m = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert!(m.contains("apilb_check_bootstrap 1"), "{m}");
    assert!(m.contains("apilb_check_auth_info{mode=\"bootstrap\",verified=\"false\"} 1"), "{m}");
    let first_worker = s.haproxy.workers.clone();

    // The node joins: its credential and CA appear. Traffic keeps flowing.
    let load = apilb_testkit::testapi::Load::start(
        env.lab.listen,
        env.lab.client_tls().unwrap(),
        Some(env.lab.token.clone()),
        2,
    );
    std::fs::create_dir_all(&agent_dir).unwrap();
    std::fs::write(agent_dir.join("server-ca.crt"), env.lab.pki.ca_pem()).unwrap();
    std::fs::write(agent_dir.join("client-kubelet.key"), &env.lab.node_cert.key_pem).unwrap();
    std::fs::write(agent_dir.join("client-kubelet.crt"), &env.lab.node_cert.cert_pem).unwrap();
    let s = env
        .wait_status(Duration::from_secs(15), "authenticated checks", |s| {
            s.check.auth == "client_cert"
                && s.masters.iter().all(|m| m.check_code == Some(200) && m.state == "UP")
        })
        .await;
    assert!(s.check.verified);
    assert!(s.check.source.contains("k3s-agent"), "{}", s.check.source);
    assert_ne!(s.haproxy.workers, first_worker, "switched by a reload");
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert!(env.lab.servers.iter().all(|srv| srv.stats().by_cert.load(Ordering::SeqCst) > 0));
    let m = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert!(m.contains("apilb_check_bootstrap 0"), "{m}");
}

/// A one-server lab whose server presents the certificate `make` issues
/// (given the lab's CA).
async fn lab_with_cert(
    make: impl FnOnce(&apilb_testkit::testapi::Pki) -> apilb_testkit::testapi::CertPair,
) -> (Env, ApiServer) {
    let env = Env::new(LabOptions { masters: 1, ..LabOptions::default() }).await;
    let cert = make(&env.lab.pki);
    let server = ApiServer::start(ApiServerOptions {
        name: "odd".into(),
        cert,
        auth: Auth { anonymous: false, tokens: vec![], client_ca_pem: Some(env.lab.pki.ca_pem()) },
        bind: "127.0.0.1:0".parse().unwrap(),
        cluster: None,
    })
    .await
    .unwrap();
    let yaml = env.lab.config_yaml_for(&[&server], "");
    env.lab.write_config(&yaml).unwrap();
    (env, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_diagnoses_a_wrong_ca() {
    let (env, _server) = lab_with_cert(|_| {
        let other = apilb_testkit::testapi::Pki::new("some other CA").unwrap();
        other.server_cert("kube-apiserver", &["kubernetes", "127.0.0.1"]).unwrap()
    })
    .await;
    let (code, out) = probe(&env.lab.config_path(), &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("Unknown CA"), "{out}");
    assert!(out.contains("issued by CN=some other CA"), "{out}");
    assert!(out.contains("health.tls.ca_file"), "{out}");
    assert!(
        out.contains("subject  CN=kube-apiserver"),
        "the certificate is shown even though it failed: {out}"
    );
    assert!(!out.contains("http "), "no request is sent to an unverified server: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_diagnoses_a_name_mismatch() {
    let (env, _server) =
        lab_with_cert(|pki| pki.server_cert("kube-apiserver", &["api.example.com", "10.9.9.9"]).unwrap())
            .await;
    let (code, out) = probe(&env.lab.config_path(), &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("Name mismatch"), "{out}");
    assert!(out.contains("does not cover \"kubernetes\""), "{out}");
    assert!(out.contains("It covers: DNS:api.example.com, IP:10.9.9.9"), "{out}");
    assert!(out.contains("health.tls.server_name"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_diagnoses_expiry_refusal_and_timeouts() {
    let env = Env::new(LabOptions::default()).await;
    let expired = env.lab.pki.expired_server_cert("kube-apiserver", &["kubernetes", "127.0.0.1"]).unwrap();
    let old = ApiServer::start(ApiServerOptions {
        name: "old".into(),
        cert: expired,
        auth: Auth { anonymous: false, tokens: vec![], client_ca_pem: Some(env.lab.pki.ca_pem()) },
        bind: "127.0.0.1:0".parse().unwrap(),
        cluster: None,
    })
    .await
    .unwrap();
    env.lab.servers[1].crash();
    env.lab.servers[2].hang();
    let all: Vec<&ApiServer> = env.lab.servers.iter().chain(std::iter::once(&old)).collect();
    env.lab.write_config(&env.lab.config_yaml_for(&all, "")).unwrap();
    let (code, out) = probe(&env.lab.config_path(), &[]).await;
    eprintln!("{out}");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("3 of 4 masters failed the check"), "{out}");
    let section = |name: &str| out.split("\n\n").find(|s| s.starts_with(name)).unwrap_or_default().to_owned();
    assert!(section("master-1").contains("result  OK"), "{out}");
    assert!(section("master-2").contains("Connection refused: nothing listens"), "{out}");
    assert!(section("master-3").contains("does not complete a TLS handshake"), "{out}");
    assert!(section("old").contains("Expired certificate"), "{out}");
    assert!(section("old").contains("EXPIRED"), "{out}");
}

#[test]
fn check_mentions_missing_credential_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("apilb.yaml");
    std::fs::write(
        &cfg,
        "masters: [10.0.0.1:6443]\nhealth:\n  auth:\n    mode: auto\n    cert_file: /nonexistent/node.crt\n    well_known: []\n",
    )
    .unwrap();
    let out = apilb().arg("check").arg("--config").arg(&cfg).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("health.auth.cert_file /nonexistent/node.crt does not exist (yet)"), "{text}");
    // In an explicit mode a missing file is an error.
    std::fs::write(&cfg, "masters: [10.0.0.1:6443]\nhealth:\n  tls: {insecure_skip_verify: true}\n  auth: {mode: bearer, token_file: /nonexistent/token}\n").unwrap();
    let out = apilb().arg("check").arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("health.auth.token_file: /nonexistent/token: no such file")
    );
}

/// docs/migration.md, joining with `none` or `bearer`: the node's copy of
/// the cluster CA (k3s: agent/server-ca.crt) exists only after the join. An
/// explicit mode refuses the file until then and says what to do; `auto`
/// with the token checks in bootstrap mode, then switches to the verified
/// token by itself (hitless) once the CA appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_node_joins_before_its_ca_exists() {
    let mut env = Env::new(LabOptions { auth: LabAuth::Bearer, ..LabOptions::default() }).await;
    let d = env.lab.dir.path().display().to_string();
    let agent_dir = env.lab.path("var-lib-rancher-k3s-agent");
    let ca = agent_dir.join("server-ca.crt");
    let tls_line = format!("  tls: {{ca_file: {d}/ca.crt, server_name: kubernetes}}\n");
    assert!(env.lab.config_yaml("").contains(&tls_line));
    let with_ca_not_yet = |auth: &str| {
        env.lab
            .config_yaml("")
            .replace(&tls_line, &format!("  tls: {{ca_file: {}, server_name: kubernetes}}\n", ca.display()))
            .replace(&format!("{{mode: bearer, token_file: {d}/token}}"), auth)
    };

    // mode bearer (or none): exit 2, with the way out.
    env.lab.write_config(&with_ca_not_yet(&format!("{{mode: bearer, token_file: {d}/token}}"))).unwrap();
    let out = apilb().arg("check").arg("--config").arg(env.lab.config_path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("health.tls.ca_file: {}: no such file", ca.display())), "{err}");
    assert!(err.contains("appears only when the node joins"), "{err}");
    assert!(err.contains("health.auth.mode auto"), "{err}");

    // mode auto with the token: valid now, bootstrap until the CA exists.
    env.lab
        .write_config(&with_ca_not_yet(&format!("{{mode: auto, token_file: {d}/token, well_known: []}}")))
        .unwrap();
    let out = apilb().arg("check").arg("--config").arg(env.lab.config_path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("does not exist (yet)"), "{text}");
    assert!(text.contains("unverified with credential bootstrap"), "{text}");
    env.start_agent().await;
    let s = env
        .wait_status(Duration::from_secs(10), "UP on 401 (bootstrap)", |s| {
            s.masters.iter().all(|m| m.state == "UP" && m.check_code == Some(401))
        })
        .await;
    assert_eq!(s.check.auth, "bootstrap");
    assert!(
        env.lab.servers.iter().all(|srv| srv.stats().by_token.load(Ordering::SeqCst) == 0),
        "no token sent unverified"
    );

    // The join writes the CA: verified bearer checks, without dropping a connection.
    let load = apilb_testkit::testapi::Load::start(
        env.lab.listen,
        env.lab.client_tls().unwrap(),
        Some(env.lab.token.clone()),
        2,
    );
    std::fs::create_dir_all(&agent_dir).unwrap();
    std::fs::write(&ca, env.lab.pki.ca_pem()).unwrap();
    let s = env
        .wait_status(Duration::from_secs(15), "verified bearer checks", |s| {
            s.check.auth == "bearer" && s.masters.iter().all(|m| m.state == "UP" && m.check_code == Some(200))
        })
        .await;
    assert!(s.check.verified);
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert!(env.lab.servers.iter().all(|srv| srv.stats().by_token.load(Ordering::SeqCst) > 0));
}
