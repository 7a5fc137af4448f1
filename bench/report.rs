//! Numbers out: Markdown tables on stdout (pasted as is into
//! BENCHMARKS.md) and one JSON document on disk.

use std::time::Duration;

use serde_json::{Map, Value, json};

/// The JSON document of a run, section by section.
#[derive(Default)]
pub struct Report {
    sections: Map<String, Value>,
}

impl Report {
    /// Sets a section.
    pub fn set(&mut self, section: &str, value: Value) {
        self.sections.insert(section.to_owned(), value);
    }

    /// True when a run recorded an error (a section that could not run).
    pub fn has_errors(&self) -> bool {
        fn any(v: &Value) -> bool {
            match v {
                Value::Object(m) => m.contains_key("error") || m.values().any(any),
                Value::Array(a) => a.iter().any(any),
                _ => false,
            }
        }
        self.sections.values().any(any)
    }

    /// Writes the document, pretty-printed.
    pub fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = serde_json::to_string_pretty(&Value::Object(self.sections.clone()))?;
        std::fs::write(path, text + "\n")
    }
}

/// A Markdown table with aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> =
            cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    out += &line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for row in rows {
        out += &line(row.clone());
    }
    out
}

/// The `p`-quantile of sorted samples (nearest rank).
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Milliseconds with one decimal, for JSON.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// p50, p99 and max of samples, as JSON (milliseconds) and as text.
pub fn latency(mut samples: Vec<Duration>) -> (Value, String) {
    samples.sort();
    let (p50, p99) = (quantile(&samples, 0.5), quantile(&samples, 0.99));
    let max = samples.last().copied().unwrap_or_default();
    (
        json!({"n": samples.len(), "p50_ms": ms(p50), "p99_ms": ms(p99), "max_ms": ms(max)}),
        format!("{:.2} / {:.2} ms", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3),
    )
}

/// What this run was measured on.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.to_owned()))
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_default();
    let first_line = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .env("PATH", crate::lbs::path_env())
            .output()
            .ok()
            .map(|o| {
                let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
                String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_owned()
            })
            .filter(|s| !s.is_empty())
    };
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next()?.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_gib": mem_gib,
        "kernel": first_line("uname", &["-sr"]),
        "haproxy": first_line("haproxy", &["-v"]),
        "nginx": first_line("nginx", &["-v"]),
        "apilb": env!("CARGO_PKG_VERSION"),
        "commit": first_line("git", &["rev-parse", "--short", "HEAD"]),
        "date": first_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}
