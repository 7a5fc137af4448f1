//! `apilb-demo` (run by `scripts/demo`): try apilb on this machine: three
//! local test API servers behind the real agent and HAProxy on
//! 127.0.0.1:16443 (or a free port). Part of the test kit, never shipped.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Exit code for any failure.
const EXIT_FAILURE: u8 = 1;

/// Try apilb on this machine: three local test API servers behind the
/// real agent and HAProxy on 127.0.0.1:16443 (or a free port).
///
/// The servers speak real TLS with a CA generated on the fly and have
/// anonymous auth off, like k3s; the checks use a verified client
/// certificate. Break masters from the prompt (crash, hang, fail) and
/// watch the failover. Ctrl-C stops everything and removes every file.
/// Needs HAProxy 2.6+ installed; runs without root.
#[derive(Parser, Debug)]
#[command(name = "apilb-demo", version)]
struct Cli {
    /// The HAProxy binary to use.
    #[arg(long, default_value = "haproxy")]
    haproxy: String,

    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logs to stderr as `apilb run` does; `APILB_LOG` overrides the filter.
fn init_logging(format: LogFormat, default_filter: &str) {
    apilb::logging::init(format == LogFormat::Json, default_filter);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("apilb-demo: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    // State changes (apilb) and HAProxy's warnings; not every notice.
    init_logging(cli.log_format, "warn,apilb::agent=info");
    let result = runtime.block_on(apilb_testkit::demo::run(&cli.haproxy));
    // A blocking read of stdin (the prompt) would otherwise keep the
    // process alive after everything else has stopped.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apilb-demo: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
