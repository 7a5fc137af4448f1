//! Logging set-up shared by the binaries: to stderr, colours only on a
//! terminal (journald and files get plain text), `APILB_LOG` overriding the
//! filter.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber: one JSON object per line when `json`,
/// else human-readable text; `default_filter` unless `APILB_LOG` is set.
pub fn init(json: bool, default_filter: &str) {
    let filter = EnvFilter::try_from_env("APILB_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
