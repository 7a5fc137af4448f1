//! SIGKILL of each component in turn, under a paced load of new
//! connections and with long-lived ones held: an HAProxy worker, the
//! HAProxy master, then apilb itself (a separate process, restarted as
//! systemd would, which must adopt the running HAProxy).

use std::time::{Duration, Instant};

use apilb_testkit::lab::LabOptions;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::*;
use crate::support::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Worker,
    Master,
    Agent,
}

/// What one kill cost.
struct Cost {
    victim: Victim,
    /// New connections attempted / failed between the kill and the end.
    attempted: usize,
    failed: usize,
    /// Long-lived connections that did not survive.
    dropped: usize,
    held: usize,
    /// From the kill to the first new connection that succeeded after the
    /// last one that failed (zero when none failed).
    serving_again: Duration,
    /// From the kill until the agent reported every master UP again.
    recovered: Duration,
    note: String,
}

fn sigkill(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_each_component_under_load() {
    let _serial = exclusive().await;
    raise_nofile();
    let held_n = pick(100, 1000);
    let mut reaper = Reaper::default();
    let mut env = Env::new(LabOptions::default()).await;
    reaper.watch(&env.lab);
    tolerant_checks(&mut env.lab);
    let masters = env.lab.servers.len();
    let mut agent = AgentProcess::spawn(&env.lab, "agent-1", &[]);
    agent.wait_ready(&env.lab).await;
    wait_remote_status(&env.lab, Duration::from_secs(15), "every master UP", all_up(masters)).await;

    let mut costs = Vec::new();
    let mut generation = 1;
    for victim in [Victim::Worker, Victim::Master, Victim::Agent] {
        let before = show_proc(&env.lab).await.unwrap();
        let status_before = apilb::status_client::fetch(env.lab.metrics).await.unwrap();
        let mut held = open_pool(&env.lab, held_n).await;
        // 4 clients, one new connection each every 20 ms: 200/s.
        let load = Paced::start(&env.lab, 4, Duration::from_millis(20));
        load.wait_more_ok(20, Duration::from_secs(10), "load running before the kill").await;

        let killed = Instant::now();
        let mut note = String::new();
        match victim {
            Victim::Worker => {
                let pid = before.workers[0].pid;
                sigkill(pid);
                eventually(Duration::from_secs(5), "worker dead", || async move { !alive(pid) }).await;
            }
            Victim::Master => {
                let pid = before.master_pid;
                sigkill(pid);
                eventually(Duration::from_secs(5), "master dead", || async move { !alive(pid) }).await;
            }
            Victim::Agent => {
                agent.signal(Signal::SIGKILL);
                agent.wait_exit(Duration::from_secs(5)).expect("apilb died");
            }
        }
        if victim == Victim::Agent {
            // Nothing of the data plane was touched: a new connection is
            // served right away, with no agent at all.
            assert!(served_by(&env).await.is_ok(), "no agent: new connections are still served");
        } else {
            let took = eventually(Duration::from_secs(15), "frontend serving again", || async {
                served_by(&env).await.is_ok()
            })
            .await;
            assert!(took < Duration::from_secs(10), "{victim:?}: serving again only after {took:?}");
        }
        if victim == Victim::Agent {
            // systemd's Restart=always starts the next agent.
            generation += 1;
            agent = AgentProcess::spawn(&env.lab, &format!("agent-{generation}"), &[]);
            agent.wait_ready(&env.lab).await;
            note = format!("the new agent was ready {:.1?} after the kill", killed.elapsed());
        }
        let s =
            wait_remote_status(&env.lab, Duration::from_secs(20), "every master UP again", all_up(masters))
                .await;
        let recovered = killed.elapsed();
        // Some load on the recovered data plane before stopping it.
        load.wait_more_ok(20, Duration::from_secs(10), "load served after recovery").await;
        let report = load.stop().await;
        let probe = held.probe().await;
        let after = show_proc(&env.lab).await.unwrap();
        let attempted = report.attempts.iter().filter(|a| a.ended >= killed).count();
        let failures = report.failures();
        let failed = failures.len();
        // Only attempts between the kill and the recovery failed.
        assert!(
            failures.iter().all(|a| a.ended >= killed && a.started <= killed + recovered),
            "{victim:?}: failures outside the outage: {}",
            report.describe()
        );
        // Serving again: the first success after the last failure began.
        let serving_again = match failures.iter().map(|a| a.started).max() {
            None => Duration::ZERO,
            Some(last_failure) => report
                .attempts
                .iter()
                .find(|a| a.outcome.is_ok() && a.started >= last_failure)
                .map(|a| a.started.saturating_duration_since(killed))
                .unwrap_or_default(),
        };
        match victim {
            Victim::Agent => {
                assert_eq!(failed, 0, "killing apilb cost new connections: {}", report.describe());
                assert!(probe.all_ok(), "killing apilb cost long-lived connections: {probe}");
                assert_eq!(after.master_pid, before.master_pid, "the new agent restarted HAProxy");
                assert_eq!(
                    after.workers.iter().map(|w| w.pid).collect::<Vec<_>>(),
                    before.workers.iter().map(|w| w.pid).collect::<Vec<_>>(),
                    "the worker changed"
                );
                assert!(s.haproxy.adopted && s.haproxy.master_pid == Some(before.master_pid), "{s:#?}");
                assert!(agent.logs().contains("adopted the running HAProxy master"), "{}", agent.logs());
                assert_eq!(s.haproxy.restarts, 0, "{s:#?}");
            }
            Victim::Worker | Victim::Master => {
                // HAProxy's master-worker design: a killed worker takes the
                // master down; a killed master takes its workers. apilb
                // starts a new master.
                assert_ne!(after.master_pid, before.master_pid, "{after:?}");
                assert_eq!(
                    s.haproxy.restarts,
                    status_before.haproxy.restarts + 1,
                    "apilb counted one restart: {s:#?}"
                );
                // Those long-lived connections lived in the dead process.
                assert_eq!(probe.ok, 0, "{probe}");
                note = format!("HAProxy master {} -> {}", before.master_pid, after.master_pid);
            }
        }
        costs.push(Cost {
            victim,
            attempted,
            failed,
            dropped: probe.closed + probe.failed,
            held: held_n,
            serving_again,
            recovered,
            note,
        });
    }
    for c in &costs {
        measured(
            "kills",
            &format!(
                "SIGKILL {:?}: {} of {} new connections failed (paced load, 200/s), {} of {} long-lived \
                 dropped, serving again after {:.0?}, every master UP after {:.1?}; {}",
                c.victim, c.failed, c.attempted, c.dropped, c.held, c.serving_again, c.recovered, c.note
            ),
        );
    }
}
