//! apilb's benchmarks: they print numbers (Markdown tables on stdout, one
//! JSON document on disk), they assert nothing. BENCHMARKS.md quotes them.
//!
//!     scripts/bench                        # everything (installs HAProxy, nginx)
//!     scripts/bench --quick                # smaller loads, shorter windows
//!     scripts/bench failover reload        # only the sections named
//!     scripts/bench --json out.json        # where the JSON goes
//!
//! Sections: failover (crash, hang, readyz 503, blackhole; apilb against
//! the baseline of seed 004, and in the first three apilb with the
//! persistent checker too), reload (disruption over many changes),
//! overhead (latency and throughput against direct and nginx), footprint
//! (idle CPU and memory with 3 and 100 masters), apilb-only ones:
//! render, discovery, restart, and checkload (what a fleet's health checks
//! cost the API server: HAProxy's checks against the persistent checker,
//! alone and with its HAProxy backstop, on a real etcd; needs `etcd`).
//!
//! `cargo test --all-targets` runs this binary without `--bench`: a smoke
//! test of about ten seconds (3 reloads, one tiny overhead round) that
//! fails when a section cannot run.
//!
//! Everything runs on this machine: real HAProxy, real apilb processes,
//! test API servers with real TLS on loopback (one in a network namespace
//! for the blackhole). Every load is bounded and stops by itself.

use std::time::{Duration, Instant};

mod checkload;
mod clients;
mod failover;
mod footprint;
mod lbs;
mod netns;
mod overhead;
mod reload;
mod report;

use std::path::PathBuf;

use apilb::agent::{self, Control};
use apilb::config::Config;
use apilb::inputs::Inputs;
use apilb::layout::Paths;
use apilb::render::{Features, render};
use apilb_testkit::lab::{ClusterKind, Lab, LabOptions, loopback};
use apilb_testkit::testapi::Session;

/// The runtime layout of a lab's agent: its config puts the runtime and
/// state directories under the lab directory.
fn layout(lab: &Lab) -> Paths {
    Paths::under(lab.dir.path())
}

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
            bytes = std::hint::black_box(render(&config, &inputs, &paths, Features::default()))
                .text
                .expose()
                .len();
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
        let sock = layout(&lab).stats_socket();
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
        let pid: i32 = std::fs::read_to_string(layout(&lab).pidfile())
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

/// The sections, in the order they run.
const SECTIONS: [&str; 8] =
    ["render", "failover", "reload", "overhead", "footprint", "discovery", "restart", "checkload"];

/// The command line: section names, `--quick`, `--json PATH`.
struct Args {
    sections: Vec<String>,
    quick: bool,
    json: PathBuf,
    /// Run without `--bench`, i.e. by `cargo test --all-targets`: a smoke
    /// test of a few seconds that fails on any error, so the benchmarks
    /// cannot rot unnoticed between runs of `scripts/bench`.
    smoke: bool,
}

fn args() -> Args {
    let mut out = Args {
        sections: Vec::new(),
        quick: false,
        json: PathBuf::from("target/bench/apilb-bench.json"),
        smoke: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => out.quick = true,
            "--json" => out.json = it.next().map(PathBuf::from).unwrap_or(out.json),
            // `cargo bench` passes --bench; `cargo test` does not.
            "--bench" => out.smoke = false,
            s if s.starts_with('-') => {}
            s => out.sections.push(s.to_owned()),
        }
    }
    if out.smoke {
        out.sections = vec!["reload".into(), "overhead".into()];
        out.json = PathBuf::from("target/bench/smoke.json");
    }
    out
}

fn main() {
    let args = args();
    // Words naming a section pick sections; other words pick failover
    // scenarios (`scripts/bench hang blackhole`).
    let (sections, scenarios): (Vec<&String>, Vec<&String>) =
        args.sections.iter().partition(|w| SECTIONS.iter().any(|s| s.contains(w.as_str())));
    let wanted = |name: &str| {
        (sections.is_empty() && scenarios.is_empty())
            || sections.iter().any(|w| name.contains(w.as_str()))
            || (name == "failover" && !scenarios.is_empty())
    };
    // SAFETY: set before any thread is started.
    unsafe { std::env::set_var("PATH", lbs::path_env()) };
    // Thousands of connections: client and server side of each.
    let _ = raise_fd_limit();
    let machine = report::machine();
    let s = args.smoke;
    let title = if s {
        " (smoke test: run scripts/bench for numbers)"
    } else if args.quick {
        " (--quick)"
    } else {
        ""
    };
    println!("# apilb benchmarks{title}\n");
    println!("machine: {}\n", serde_json::to_string(&machine).unwrap_or_default());
    let mut rep = report::Report::default();
    rep.set("machine", machine);
    rep.set("quick", serde_json::json!(args.quick));
    if wanted("render") {
        bench_render();
    }
    let q = args.quick;
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let run = async {
        if wanted("failover") {
            let sizes = failover::Sizes {
                rate: if q { 50 } else { 100 },
                long_lived: if q { 60 } else { 200 },
                period: Duration::from_secs(1),
                warmup: Duration::from_secs(2),
                window: Duration::from_secs(if q { 8 } else { 12 }),
            };
            let pick = |scenario: &str| {
                scenarios.is_empty() || scenarios.iter().any(|n| scenario.contains(n.as_str()))
            };
            rep.set("failover", failover::bench(sizes, &pick).await);
        }
        if wanted("reload") {
            let sizes = reload::Sizes {
                changes: if s {
                    3
                } else if q {
                    20
                } else {
                    100
                },
                rate: if q || s { 50 } else { 100 },
                long_lived: if s {
                    10
                } else if q {
                    50
                } else {
                    200
                },
                long_lived_per_change: 2,
                period: Duration::from_secs(1),
            };
            rep.set("reload", reload::bench(sizes).await);
        }
        if wanted("overhead") {
            let sizes = overhead::Sizes {
                rounds: if q || s { 1 } else { 3 },
                connections: if s {
                    10
                } else if q {
                    100
                } else {
                    500
                },
                requests: if s {
                    50
                } else if q {
                    500
                } else {
                    3000
                },
                concurrency: 8,
                duration: if s {
                    Duration::from_millis(300)
                } else {
                    Duration::from_secs(if q { 2 } else { 5 })
                },
            };
            rep.set("overhead", overhead::bench(sizes).await);
        }
        if wanted("footprint") {
            rep.set("footprint", footprint::bench(Duration::from_secs(if q { 10 } else { 60 })).await);
        }
        if wanted("discovery") {
            bench_discovery().await;
        }
        if wanted("restart") {
            bench_restart().await;
        }
        if wanted("checkload") {
            let sizes = checkload::Sizes {
                nodes: 200,
                processes: 4,
                warmup: Duration::from_secs(if q { 3 } else { 5 }),
                window: Duration::from_secs(if q { 20 } else { 60 }),
                rounds: if q { 1 } else { 2 },
                paths: &["/health", "/version"],
            };
            rep.set("checkload", checkload::bench(sizes).await);
        }
    };
    rt.block_on(async {
        // Ctrl-C drops the run, and with it every process it started.
        tokio::select! {
            () = run => {}
            _ = tokio::signal::ctrl_c() => println!("\ninterrupted: the JSON holds the sections that finished"),
        }
    });
    match rep.write(&args.json) {
        Ok(()) => println!("JSON: {}", args.json.display()),
        Err(e) => println!("cannot write {}: {e}", args.json.display()),
    }
    if args.smoke && rep.has_errors() {
        eprintln!("smoke test failed: a section could not run (its error is printed above)");
        std::process::exit(1);
    }
}

/// Raises the soft limit on open files to the hard limit.
fn raise_fd_limit() -> nix::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
}
