//! The HNDSR inference server: HTTP layer, admission core, backends.
//!
//! Layers, outermost first: [`http`] (axum routes, edge limits, OpenAPI) →
//! [`core`] (admission, GPU permits, coalescing, inference threads; no HTTP
//! and no torch) → [`backend::Backend`]. [`server::Server`] assembles them
//! and runs the lifecycle ([`lifecycle`]); [`config`] turns flags and
//! environment into typed configuration.

pub mod backend;
pub mod codec;
pub mod config;
pub mod core;
pub mod error;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod profile;
pub mod server;

pub use crate::error::Error;
