//! apilb's benchmarks: they print numbers, they assert nothing.
//!
//!     cargo bench --bench apilb            # everything
//!     cargo bench --bench apilb -- render  # only sections whose name contains "render"
//!
//! Needs HAProxy on PATH (scripts/ensure-deps). Runs the real agent and
//! HAProxy against local test API servers, like the integration tests.
//! Numbers from a noisy 2-core machine are indicative; compare runs on the
//! same machine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apilb::agent::{self, Control};
use apilb::config::Config;
use apilb::inputs::Inputs;
use apilb::lab::{ClusterKind, Lab, LabOptions, loopback};
use apilb::render::{Paths, render};
use apilb::testapi::{Load, Session};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "n={} p50={:.1?} p95={:.1?} max={:.1?}",
        v.len(),
        percentile(&v, 0.5),
        percentile(&v, 0.95),
        v.last().copied().unwrap_or_default()
    )
}

fn bench_render() {
    println!("## render (pure: config + inputs -> haproxy.cfg + sha256)");
    for n in [3usize, 100, 1000] {
        let masters: String =
            (0..n).map(|i| format!("  - 10.{}.{}.{}:6443\n", i / 65536, (i / 256) % 256, i % 256)).collect();
        let yaml = format!(
            "masters:\n{masters}health:\n  tls: {{insecure_skip_verify: true}}\n  auth: {{mode: none}}\n"
        );
        let config = Config::parse(&yaml, "bench").expect("config");
        let inputs = Inputs::gather(&config).expect("inputs");
        let paths = Paths::from_config(&config);
        let iterations = (20_000 / n).max(20);
        let start = Instant::now();
        let mut bytes = 0;
        for _ in 0..iterations {
            bytes = std::hint::black_box(render(&config, &inputs, &paths)).text.len();
        }
        let per = start.elapsed() / iterations as u32;
        println!("  {n:>5} masters: {per:>10.1?} per render ({bytes} bytes)");
    }
}

/// A lab, its config (`extra` appended, made from the lab) and a running
/// agent whose masters have all passed a check.
async fn lab_and_agent(opts: LabOptions, extra: impl FnOnce(&Lab) -> String) -> (Lab, agent::Handle) {
    let lab = Lab::start(opts).await.expect("lab");
    let yaml = lab.config_yaml(&extra(&lab));
    lab.write_config(&yaml).expect("config");
    let handle = agent::start(agent::Options {
        config_path: lab.config_path(),
        shutdown_grace: Duration::from_secs(1),
    })
    .await
    .expect("agent");
    let mut status = handle.status();
    let n = lab.servers.len();
    let _ = tokio::time::timeout(
        Duration::from_secs(15),
        status.wait_for(|s| s.masters.len() == n && s.masters.iter().all(|m| m.check_status == "L7OK")),
    )
    .await;
    (lab, handle)
}

async fn stop(lab: Lab, handle: agent::Handle) {
    handle.send(Control::Shutdown).await;
    let _ = handle.wait().await;
    drop(lab);
}

async fn connection_rate(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: &str,
    clients: usize,
) -> (f64, String) {
    let secs = 5;
    // Latency per connection: connect + TLS + GET /version, sequentially.
    let mut lat = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let mut s = Session::connect(addr, tls.clone(), Some(token)).await.expect("connect");
        s.served_by().await.expect("request");
        lat.push(t.elapsed());
    }
    let load = Load::start(addr, tls, Some(token.to_owned()), clients);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let r = load.stop().await;
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    (r.ok as f64 / secs as f64, summary(lat))
}

async fn bench_connections() {
    println!("## new connections (TCP + TLS + GET /version), 4 concurrent clients, 5s");
    let (lab, handle) = lab_and_agent(LabOptions::default(), |_| String::new()).await;
    let tls = lab.client_tls().expect("tls");
    let (direct, direct_lat) = connection_rate(lab.servers[0].addr(), tls.clone(), &lab.token, 4).await;
    let (via, via_lat) = connection_rate(lab.listen, tls, &lab.token, 4).await;
    println!("  direct to one test server : {direct:>8.0} conn/s; one at a time: {direct_lat}");
    println!("  through apilb's HAProxy   : {via:>8.0} conn/s; one at a time: {via_lat}");
    stop(lab, handle).await;
}

async fn bench_reloads() {
    println!("## validated hitless reload (SIGHUP -> haproxy -c -> reload -> confirmed by show proc)");
    let (lab, handle) = lab_and_agent(LabOptions::default(), |_| String::new()).await;
    let mut times = Vec::new();
    let mut status = handle.status();
    for i in 0..15 {
        let yaml = lab.config_yaml(&format!("timeouts:\n  connect: {}ms\n", 3100 + i));
        lab.write_config(&yaml).expect("config");
        let before = status.borrow().config.hash.clone();
        let t = Instant::now();
        handle.send(Control::Reload).await;
        let _ = status.wait_for(|s| s.config.hash != before).await;
        times.push(t.elapsed());
    }
    println!("  reload confirmed: {}", summary(times));
    stop(lab, handle).await;
}

async fn bench_discovery() {
    println!("## a discovered master: watch event -> in HAProxy -> in rotation (runtime API, no reload)");
    let opts = LabOptions { cluster: Some(ClusterKind::EndpointSlices), ..LabOptions::default() };
    let (mut lab, handle) = lab_and_agent(opts, |lab| lab.discovery_yaml("")).await;
    let mut status = handle.status();
    let _ = tokio::time::timeout(
        Duration::from_secs(15),
        status.wait_for(|s| s.discovery.as_ref().is_some_and(|d| d.last_success.is_some())),
    )
    .await;
    let cluster = lab.cluster.clone().expect("cluster");
    let (mut present, mut up) = (Vec::new(), Vec::new());
    let mut current: Vec<usize> = vec![1, 2, 3];
    for i in 4..=8 {
        lab.add_server(i).await.expect("server");
        current.push(i);
        let eps: Vec<_> = current.iter().map(|j| (loopback(*j), true)).collect();
        let event = cluster.set_endpoints(&eps);
        let name = format!("127.0.0.{i}");
        let sock = lab.path("run/haproxy.sock");
        let mut seen = None;
        loop {
            let text = apilb::haproxy::cli::command(&sock, "show stat", Duration::from_secs(2))
                .await
                .unwrap_or_default();
            let stats = apilb::haproxy::stat::parse_show_stat(&text).unwrap_or_default();
            if let Some(s) = stats.servers.iter().find(|s| s.name == name) {
                seen.get_or_insert_with(|| event.elapsed());
                if s.status == "UP" {
                    up.push(event.elapsed());
                    break;
                }
            }
            if event.elapsed() > Duration::from_secs(10) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        present.extend(seen);
    }
    println!("  in HAProxy  : {}", summary(present));
    println!("  in rotation : {}  (waits for the first passed check)", summary(up));
    stop(lab, handle).await;
}

async fn bench_restart() {
    println!("## kill -9 of the HAProxy master -> frontend serving again");
    println!("   (kills 0.5s apart are a crash loop: the restart backs off 0, 100ms, 250ms, 500ms, 1s)");
    let (lab, handle) = lab_and_agent(LabOptions::default(), |_| String::new()).await;
    let tls = lab.client_tls().expect("tls");
    let mut times = Vec::new();
    for _ in 0..5 {
        let pid: i32 = std::fs::read_to_string(lab.path("run/haproxy.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let t = Instant::now();
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        loop {
            if let Ok(mut s) = Session::connect(lab.listen, tls.clone(), Some(&lab.token)).await
                && s.served_by().await.is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(t.elapsed());
        // Let the new master settle before the next round.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (i, t) in times.iter().enumerate() {
        println!("  kill {}: serving again after {t:.1?}", i + 1);
    }
    stop(lab, handle).await;
}

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    if std::env::var_os("PATH").is_some_and(|p| !p.to_string_lossy().contains("/usr/sbin")) {
        // SAFETY: set before any thread is started.
        unsafe {
            std::env::set_var("PATH", format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()))
        };
    }
    println!(
        "# apilb benchmarks ({} CPUs)\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    if wanted("render") {
        bench_render();
    }
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        if wanted("connections") {
            bench_connections().await;
        }
        if wanted("reload") {
            bench_reloads().await;
        }
        if wanted("discovery") {
            bench_discovery().await;
        }
        if wanted("restart") {
            bench_restart().await;
        }
    });
}
