//! Footprint: memory and CPU while idle (no client traffic, checks
//! running), for apilb's agent and HAProxy, and for the baseline's HAProxy,
//! with few and with many masters.

use std::time::Duration;

use apilb_testkit::lab::{Lab, LabOptions};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::lbs::{Apilb, Baseline, children_of};
use crate::report::table;

/// CPU time (user + system) and resident memory of a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// utime + stime.
    pub cpu: Duration,
    rss_kib: u64,
    peak_rss_kib: u64,
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// CPU and memory of `pid` from /proc (all its threads).
pub fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(Usage {
        cpu: Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64),
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
    })
}

/// Memory of a HAProxy master and its workers, KiB: the sum of their
/// proportional set sizes (a page shared by n processes counts 1/n in
/// each), so pages shared after a fork are not counted many times.
pub fn haproxy_pss_kib(master: u32) -> u64 {
    std::iter::once(master)
        .chain(children_of(master))
        .filter_map(|pid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
            text.lines().find(|l| l.starts_with("Pss:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// A HAProxy master and its workers, summed.
pub fn haproxy_usage(master: u32) -> Usage {
    let mut total = Usage::default();
    for pid in std::iter::once(master).chain(children_of(master)) {
        if let Some(u) = usage(pid) {
            total.cpu += u.cpu;
            total.rss_kib += u.rss_kib;
            total.peak_rss_kib += u.peak_rss_kib;
        }
    }
    total
}

/// CPU share of one core over `secs`, and memory at the end.
fn over(before: Usage, after: Usage, secs: f64) -> (f64, u64) {
    let cpu = after.cpu.saturating_sub(before.cpu).as_secs_f64() / secs * 100.0;
    ((cpu * 100.0).round() / 100.0, after.rss_kib)
}

/// KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

async fn apilb_run(masters: usize, duration: Duration) -> Result<(Value, Vec<String>), String> {
    let lab = Lab::start(LabOptions { masters, ..LabOptions::default() }).await.map_err(|e| e.to_string())?;
    let lb = Apilb::start(&lab, "").await?;
    let hp = lb.haproxy_pid().ok_or("no HAProxy pid")?;
    // Let the start-up settle: the first checks, the first polls.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (a0, h0, t0) = (usage(lb.pid()).unwrap_or_default(), haproxy_usage(hp), Instant::now());
    tokio::time::sleep(duration).await;
    let secs = t0.elapsed().as_secs_f64();
    let (a1, h1) = (usage(lb.pid()).unwrap_or_default(), haproxy_usage(hp));
    lb.stop().await;
    let (agent_cpu, agent_rss) = over(a0, a1, secs);
    let (hap_cpu, hap_rss) = over(h0, h1, secs);
    Ok((
        json!({
            "setup": "apilb", "masters": masters, "seconds": secs.round(),
            "agent": {"cpu_percent": agent_cpu, "rss_kib": agent_rss, "peak_rss_kib": a1.peak_rss_kib},
            "haproxy": {"cpu_percent": hap_cpu, "rss_kib": hap_rss},
        }),
        vec![
            "apilb".into(),
            masters.to_string(),
            format!("{agent_cpu:.2} %"),
            format!("{} (peak {})", mib(agent_rss), mib(a1.peak_rss_kib)),
            format!("{hap_cpu:.2} %"),
            mib(hap_rss),
        ],
    ))
}

async fn baseline_run(masters: usize, duration: Duration) -> Result<(Value, Vec<String>), String> {
    let lab = Lab::start(LabOptions { masters, ..LabOptions::default() }).await.map_err(|e| e.to_string())?;
    let lb = Baseline::start(&lab).await?;
    let hp = lb.haproxy_pid();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (h0, t0) = (haproxy_usage(hp), Instant::now());
    tokio::time::sleep(duration).await;
    let secs = t0.elapsed().as_secs_f64();
    let h1 = haproxy_usage(hp);
    lb.stop();
    let (hap_cpu, hap_rss) = over(h0, h1, secs);
    Ok((
        json!({
            "setup": "baseline", "masters": masters, "seconds": secs.round(),
            "haproxy": {"cpu_percent": hap_cpu, "rss_kib": hap_rss},
        }),
        vec![
            "baseline".into(),
            masters.to_string(),
            "-".into(),
            "-".into(),
            format!("{hap_cpu:.2} %"),
            mib(hap_rss),
        ],
    ))
}

/// Both setups with 3 and with 100 masters.
pub async fn bench(duration: Duration) -> Value {
    println!(
        "## footprint: idle for {duration:?} (no clients; checks every second)\n\n\
         CPU is the share of one core; memory is the resident set at the end (apilb's peak in brackets). \
         HAProxy counts the master and its workers.\n"
    );
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for masters in [3, 100] {
        for r in [apilb_run(masters, duration).await, baseline_run(masters, duration).await] {
            match r {
                Ok((json, row)) => {
                    results.push(json);
                    rows.push(row);
                }
                Err(e) => {
                    println!("{masters} masters: failed: {e}");
                    results.push(json!({"masters": masters, "error": e}));
                }
            }
        }
    }
    println!(
        "{}",
        table(&["setup", "masters", "agent CPU", "agent memory", "HAProxy CPU", "HAProxy memory"], &rows)
    );
    json!({"settings": {"seconds": duration.as_secs()}, "runs": results})
}
