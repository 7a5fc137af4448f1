//! The `apilb` command line. Only argument parsing and exit codes live
//! here; the work is done by the library.

use std::path::PathBuf;
use std::process::ExitCode;

use apilb::config::{CONFIG_ENV, DEFAULT_CONFIG_PATH};
use apilb::haproxy::{Binary, BinaryError};
use apilb::render;
use clap::{Parser, Subcommand};

/// Exit code for an unusable configuration (YAML, a file it names, or
/// HAProxy's verdict on the rendered config).
const EXIT_CONFIG: u8 = 2;
/// Exit code for any other failure.
const EXIT_FAILURE: u8 = 1;

/// apilb keeps a local, health-checked endpoint for the Kubernetes API on
/// every node: HAProxy on 127.0.0.1:16443 spreads connections over all API
/// servers and moves them away from any server whose /readyz fails.
#[derive(Parser, Debug)]
#[command(name = "apilb", version, about, long_about = None)]
#[command(after_help = "Exit codes: 0 success, 1 failure, 2 invalid configuration.")]
struct Cli {
    /// The configuration file.
    #[arg(long, short = 'c', global = true, env = CONFIG_ENV, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the haproxy.cfg apilb would run for the configuration.
    ///
    /// Secrets (the check's bearer token, the stats password) are replaced by
    /// <redacted> unless --show-secrets is given. Nothing is started or
    /// written except --output.
    Render {
        /// Write the config to this file (mode 0600) instead of stdout.
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
        /// Print or write the secrets instead of <redacted>.
        #[arg(long)]
        show_secrets: bool,
    },
    /// Validate the configuration without touching anything that runs.
    ///
    /// Parses the YAML, reads the files it names (CA, credentials,
    /// password), renders haproxy.cfg and has `haproxy -c` check it in a
    /// scratch directory. Suitable for Ansible's `validate:` and systemd's
    /// ExecReload.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("apilb: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("apilb: {message}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

fn config_error(e: impl std::fmt::Display) -> Failure {
    (EXIT_CONFIG, e.to_string())
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Render {
            output,
            show_secrets,
        } => {
            let loaded = apilb::load(&cli.config, None).map_err(config_error)?;
            let text = if show_secrets {
                loaded.rendered.text.clone()
            } else {
                loaded.rendered.redacted()
            };
            match output {
                Some(path) => {
                    apilb::fsutil::write_atomic(&path, text.as_bytes(), 0o600).map_err(|e| {
                        (
                            EXIT_FAILURE,
                            format!("cannot write {}: {e}", path.display()),
                        )
                    })?
                }
                None => print!("{text}"),
            }
            for aux in &loaded.rendered.aux_files {
                eprintln!(
                    "note: the config refers to {}, which `apilb run` writes before starting HAProxy",
                    aux.path.display()
                );
            }
            Ok(())
        }
        Command::Check => check(&cli.config).await,
    }
}

async fn check(path: &std::path::Path) -> Result<(), Failure> {
    let scratch = tempfile::Builder::new()
        .prefix("apilb-check-")
        .tempdir()
        .map_err(|e| {
            (
                EXIT_FAILURE,
                format!("cannot create a scratch directory: {e}"),
            )
        })?;
    let paths = render::scratch_paths(scratch.path());
    let loaded = apilb::load(path, Some(&paths)).map_err(config_error)?;
    let binary = Binary::new(&loaded.config.haproxy.binary);
    let version = binary
        .version()
        .await
        .map_err(|e| (EXIT_FAILURE, e.to_string()))?;
    let warnings = binary
        .validate_at(&loaded.rendered, &paths, &paths.config_file())
        .await
        .map_err(|e| match e {
            BinaryError::Rejected { .. } => (EXIT_CONFIG, format!("{}: {e}", path.display())),
            other => (EXIT_FAILURE, other.to_string()),
        })?;
    for w in warnings {
        println!("haproxy warning: {w}");
    }
    for note in &loaded.inputs.check.notes {
        println!("note: {note}");
    }
    let c = &loaded.config;
    println!(
        "{}: valid ({} masters, check {} {} with credential {}, HAProxy {}, config sha256:{})",
        path.display(),
        c.masters.len(),
        c.health.path,
        match loaded.inputs.check.verify {
            apilb::inputs::Verify::Ca { .. } => "verified",
            _ => "unverified",
        },
        loaded.inputs.check.mode_in_use(),
        version.full,
        loaded.rendered.short_hash(),
    );
    Ok(())
}
