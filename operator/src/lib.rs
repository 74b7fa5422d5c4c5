//! The HNDSR operator: reconciles `HndsrService` into a Deployment, a
//! Service, a HorizontalPodAutoscaler (or a KEDA ScaledObject) and a
//! PodDisruptionBudget, with prewarm a standby Deployment and capacity
//! placeholders, and at zero replicas a zero responder.

pub mod builders;
pub mod defaults;
pub mod effective;
pub mod status;
pub mod validate;

pub mod config;
pub mod context;
pub mod controller;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod quantity;
pub mod slim;
pub mod ssa;
pub mod standby;
pub mod watches;
pub mod zero;
