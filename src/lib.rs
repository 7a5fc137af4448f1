//! apilb: a node-local load balancer agent for the Kubernetes API, with
//! HAProxy as its data plane.
//!
//! Data flow: [`config`] (YAML → validated [`config::Config`]) →
//! [`inputs`] (the files it names: CA, credential, password) →
//! [`render`] (pure: haproxy.cfg text + hash) → [`haproxy`] (validate with
//! `haproxy -c`, then run it). See ARCHITECTURE.md.

pub mod agent;
pub mod config;
pub mod demo;
pub mod fsutil;
pub mod haproxy;
pub mod http;
pub mod inputs;
pub mod lab;
pub mod metrics;
pub mod probe;
pub mod render;
pub mod status;
pub mod status_client;
pub mod systemd;
pub mod testapi;

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
/// (the config's own directories unless overridden, e.g. for validation).
pub fn load(path: &Path, paths: Option<&render::Paths>) -> Result<Loaded, LoadError> {
    let config = config::Config::load(path)?;
    let inputs = inputs::Inputs::gather(&config)?;
    let paths = paths.cloned().unwrap_or_else(|| render::Paths::from_config(&config));
    let rendered = render::render(&config, &inputs, &paths);
    Ok(Loaded { config, inputs, rendered })
}
