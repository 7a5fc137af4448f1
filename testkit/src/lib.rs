//! apilb's test kit: everything that exists only to test, try or fuzz
//! apilb, kept out of the shipped `apilb` crate (and its binary and
//! packages). The root crate's tests, benchmarks and examples use it as a
//! dev-dependency; `fuzz/` depends on it too.
//!
//! - [`testapi`]: stand-in Kubernetes API servers (real TLS, failure
//!   injection), their PKI, and clients that measure a load balancer.
//! - [`lab`]: a throw-away cluster on loopback (CA, N test servers, a node
//!   credential and an apilb.yaml in a temporary directory).
//! - [`demo`]: the interactive demo behind the `apilb-demo` binary
//!   (`scripts/demo`).
//! - [`fuzzing`]: the entry points of the cargo-fuzz targets, replayed on
//!   stable by `tests/fuzz_corpus.rs`.
//!
//! The rule (ARCHITECTURE.md): test-only code goes here, never in `src/`.

pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod lab;
pub mod testapi;
