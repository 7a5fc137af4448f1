//! `apilb-demo` (what `scripts/demo` runs) as users run it: the failover
//! shows, and Ctrl-C stops HAProxy and removes every file.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use apilb::haproxy::supervisor::alive;

fn apilb_demo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_apilb-demo"));
    c.env("PATH", format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_shows_failover_and_cleans_up_on_ctrl_c() {
    /// Kills the demo and its HAProxy if the test fails midway.
    struct Guard(std::process::Child, Option<u32>);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            if let Some(pid) = self.1 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let child =
        apilb_demo().stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut guard = Guard(child, None);
    let child = &mut guard.0;
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let mut seen = String::new();
    let mut wait_for = |needle: &str, limit: Duration| {
        let start = std::time::Instant::now();
        while !seen.contains(needle) {
            let left =
                limit.checked_sub(start.elapsed()).unwrap_or_else(|| panic!("no {needle:?} in:\n{seen}"));
            match rx.recv_timeout(left) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(_) => panic!("no {needle:?} in:\n{seen}"),
            }
        }
        seen.clone()
    };
    wait_for("3/3 masters up", Duration::from_secs(30));
    let out = wait_for("Check: client_cert", Duration::from_secs(5));
    let dir =
        out.split("config          ").nth(1).and_then(|r| r.split("/apilb.yaml").next()).unwrap().to_owned();
    let pid: i32 =
        out.split("master ").filter_map(|r| r.split(',').next()?.trim().parse().ok()).next().unwrap();
    guard.1 = Some(pid as u32);
    assert!(out.contains("local endpoint  https://127.0.0.1:"), "{out}");
    writeln!(stdin, "hang 1").unwrap();
    // A timeout at layer 6 (TLS handshake) or 7 (HTTP), depending on where
    // the check was when the master hung.
    let out = wait_for("master-1 is DOWN (was UP): L", Duration::from_secs(15));
    let line = out.lines().find(|l| l.contains("master-1 is DOWN (was UP)")).unwrap();
    assert!(line.contains("TOUT"), "{line}");
    writeln!(stdin, "resume 1").unwrap();
    wait_for("master-1 is UP (was DOWN)", Duration::from_secs(15));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exit: {status}");
    wait_for("removed", Duration::from_secs(5));
    assert!(!alive(pid as u32), "the demo left HAProxy running");
    assert!(!std::path::Path::new(&dir).exists(), "the demo left {dir}");
}
