//! apilb: a node-local load balancer agent for the Kubernetes API, with
//! HAProxy as its data plane.
//!
//! Data flow: [`config`] (YAML → validated [`config::Config`]) →
//! [`inputs`] (the files it names: CA, credential, password) →
//! [`render`] (pure: haproxy.cfg text + hash) → [`haproxy`] (validate with
//! `haproxy -c`, then run it). See ARCHITECTURE.md.

pub mod agent;
pub mod backoff;
pub mod check;
pub mod config;
pub mod digest;
pub mod discovery;
pub mod fsutil;
pub mod haproxy;
pub mod http;
pub mod inputs;
pub mod layout;
pub mod logging;
pub mod manual;
pub mod masters;
pub mod metrics;
pub mod probe;
pub mod render;
pub mod sanitize;
pub mod status;
pub mod status_client;
pub mod systemd;
pub mod tls;

use std::path::Path;

/// A config that cannot be used: the YAML, or a file it names.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The YAML is missing, malformed or invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A file the config names is missing or malformed.
    #[error(transparent)]
    Input(#[from] inputs::InputError),
}

/// Everything needed to run or validate one version of the config.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The parsed config.
    pub config: config::Config,
    /// The files it refers to, read.
    pub inputs: inputs::Inputs,
    /// The haproxy.cfg it renders to.
    pub rendered: render::Rendered,
}

/// Loads the config at `path`, reads its files and renders it for `paths`
/// (the config's own directories unless overridden, e.g. for validation)
/// and an HAProxy with `features`.
pub fn load(
    path: &Path,
    paths: Option<&layout::Paths>,
    features: render::Features,
) -> Result<Loaded, LoadError> {
    let (config, inputs) = load_parts(path)?;
    let paths = paths.cloned().unwrap_or_else(|| layout::Paths::from_config(&config));
    Ok(assemble(config, inputs, &paths, features))
}

/// Loads the config at `path` and reads its files, without rendering (the
/// agent renders with the masters it has learned).
pub fn load_parts(path: &Path) -> Result<(config::Config, inputs::Inputs), LoadError> {
    let config = config::Config::load(path)?;
    let inputs = inputs::Inputs::gather(&config)?;
    Ok((config, inputs))
}

/// Renders a config and its inputs for `paths` and an HAProxy with
/// `features`.
pub fn assemble(
    config: config::Config,
    inputs: inputs::Inputs,
    paths: &layout::Paths,
    features: render::Features,
) -> Loaded {
    let rendered = render::render(&config, &inputs, paths, features);
    Loaded { config, inputs, rendered }
}
