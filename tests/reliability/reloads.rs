//! Long-lived connections held across 20 validated reloads, under a
//! steady load of new connections.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use apilb::agent::Control;
use apilb_testkit::lab::LabOptions;
use apilb_testkit::testapi::Load;

use crate::common::*;
use crate::support::*;

const RELOADS: usize = 20;
/// What the lab renders as `hard-stop-after`: every reload and the final
/// probe must fit in it, or the first old worker would close its
/// connections on purpose.
const HARD_STOP_AFTER: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_connections_survive_twenty_reloads_under_load() {
    let _serial = exclusive().await;
    let nofile = raise_nofile();
    // Held before the first reload, on the first worker.
    let held_n = pick(1000, 5000);
    // Held after each reload, on each new worker: every old worker keeps
    // connections, so every one of them must stay.
    let pin_n = pick(10, 25);
    // Each worker accepts at most maxconn connections (4096 by default);
    // HAProxy needs 2 × maxconn + ~45 descriptors and fails to start when
    // the hard RLIMIT_NOFILE (20000 here) is lower.
    let extra = "  maxconn: 9000\n";

    let mut reaper = Reaper::default();
    let mut env = Env::new(LabOptions::default()).await;
    reaper.watch(&env.lab);
    tolerant_checks(&mut env.lab);
    env.lab.write_config(&config_variant(&env.lab, 0, extra)).unwrap();
    env.start_agent().await;
    env.wait_all_up().await;
    let cfg = std::fs::read_to_string(layout(&env.lab).config_file()).unwrap();
    assert!(cfg.contains("hard-stop-after 1m"), "the lab's hard-stop-after changed; adjust HARD_STOP_AFTER");
    assert!(cfg.contains("mworker-max-reloads 50"), "{cfg}");

    let opening = Instant::now();
    let mut held = open_pool(&env.lab, held_n).await;
    let opened_in = opening.elapsed();
    let first_worker = show_proc(&env.lab).await.unwrap().workers[0].pid;

    let load = Load::start(env.lab.listen, env.lab.client_tls().unwrap(), Some(env.lab.token.clone()), 2);
    let mut pins = apilb_testkit::testapi::pool::Pool::new(pool_options(&env.lab));
    // The workers holding connections, oldest first.
    let mut pinned = vec![first_worker];
    let first_reload = Instant::now();
    let mut hash = env.agent().status().borrow().config.hash.clone();
    for i in 1..=RELOADS {
        env.lab.write_config(&config_variant(&env.lab, i, extra)).unwrap();
        env.agent().send(Control::Reload).await;
        let before = hash.clone();
        let s = env
            .wait_status(Duration::from_secs(20), &format!("reload {i} applied"), move |s| {
                s.config.hash != before
                    && s.config.last_reload.as_ref().is_some_and(|r| r.result == "success")
            })
            .await;
        hash = s.config.hash.clone();
        let proc = show_proc(&env.lab).await.unwrap();
        assert_eq!(proc.workers.len(), 1, "{proc:?}");
        let worker = proc.workers[0].pid;
        assert!(!pinned.contains(&worker), "reload {i} did not start a new worker: {proc:?}");
        // Every worker that holds connections is still there, as an old
        // worker, and alive.
        let old: BTreeSet<u32> = proc.old_workers.iter().map(|w| w.pid).collect();
        for pid in &pinned {
            assert!(
                old.contains(pid) && alive(*pid),
                "old worker {pid} holding connections is gone: {proc:?}"
            );
        }
        let r = pins.open(pin_n).await;
        assert_eq!(r.opened, pin_n, "{r:?}");
        pinned.push(worker);
    }
    let reloads_took = first_reload.elapsed();

    let proc = show_proc(&env.lab).await.unwrap();
    assert_eq!(proc.old_workers.len(), RELOADS, "every old worker holds connections: {proc:?}");
    let processes = haproxy_processes(&env.lab);
    assert_eq!(
        processes.len(),
        RELOADS + 2,
        "master + {RELOADS} old workers + the current one: {processes:?} ({proc:?})"
    );

    let probing = Instant::now();
    let main = held.probe().await;
    let later = pins.probe().await;
    let probe_took = probing.elapsed();
    let report = load.stop().await;
    let within = first_reload.elapsed();

    assert!(
        within < HARD_STOP_AFTER,
        "reloads and probe took {within:?}, longer than hard-stop-after: the result means nothing"
    );
    let metrics = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    let states = transitions(&metrics);
    assert!(
        main.all_ok() && main.ok == held_n,
        "connections held across {RELOADS} reloads: {main}; {states:?}"
    );
    assert!(
        later.all_ok() && later.ok == RELOADS * pin_n,
        "connections pinning the old workers: {later}; {states:?}"
    );
    assert_eq!(report.failed, 0, "new connections failed during the reloads: {:?}", report.errors);
    assert!(report.ok > 50, "too little load to mean anything: {}", report.ok);
    assert_eq!(
        metric(&metrics, "apilb_haproxy_reloads_total{result=\"success\"}"),
        Some(RELOADS as f64),
        "{metrics}"
    );

    // Released, the old workers leave at once (not at hard-stop-after).
    held.close();
    pins.close();
    let released = Instant::now();
    let mut last = proc;
    while !last.old_workers.is_empty() {
        assert!(
            released.elapsed() < Duration::from_secs(30),
            "old workers stay without connections: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = show_proc(&env.lab).await.unwrap();
    }
    let left_in = released.elapsed();
    let after = eventually(Duration::from_secs(10), "only master and worker left", || async {
        haproxy_processes(&env.lab).len() == 2
    })
    .await;

    measured(
        "reloads",
        &format!(
            "{RELOADS} validated reloads in {reloads_took:.1?} under load; {held_n} connections held across \
             all of them + {pin_n} more after each reload ({} total, opened in {opened_in:.1?}): {main} / \
             {later}, probed in {probe_took:.1?}; new connections during the reloads: {} ok, {} failed; \
             HAProxy processes alive at the end: {} (master + {} workers), 2 within {:.1?} of releasing the \
             connections; first reload to last answer {within:.1?} (hard-stop-after {HARD_STOP_AFTER:?}); \
             RLIMIT_NOFILE {nofile}",
            held_n + RELOADS * pin_n,
            report.ok,
            report.failed,
            processes.len(),
            processes.len() - 1,
            left_in + after,
        ),
    );
}
