//! The TLS client configuration of the persistent checker.
//!
//! One function, so it can be swapped for the shared TLS module when that
//! lands: it must give exactly what HAProxy's check uses (the check's CA,
//! verification as configured, the client certificate when the credential
//! is one). Today it is [`crate::probe::check_client_config`], the same
//! code `apilb probe` runs.

use std::sync::Arc;

use crate::inputs::Inputs;

use super::CheckError;

/// The checker's TLS client configuration for `inputs` (built once and
/// shared by every [`super::Checker`] of a node).
pub fn client_config(inputs: &Inputs) -> Result<Arc<rustls::ClientConfig>, CheckError> {
    crate::probe::check_client_config(inputs).map_err(CheckError::Tls)
}
