//! A real Kubernetes control plane on 127.0.0.1 for the end-to-end tests.
//!
//! The programs (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kwok) are built from their upstream Go modules by
//! `e2e/scripts/build-binaries.sh` into a version-keyed cache ([`bins`]) and
//! run here as plain child processes ([`process`]), with certificates made on
//! the fly ([`certs`]). [`ControlPlane`] starts and stops the whole thing;
//! [`shared`] gives every test in one test binary the same control plane and a
//! fresh namespace of its own. The `hndsr-e2e` binary starts one standalone
//! (`up` / `down`) for manual use.
//!
//! Pods run on fake GPU nodes driven by kwok: nothing in them executes, pod IPs
//! are fake, so tests assert on API state only.

pub mod argocd;
pub mod bins;
pub mod certs;
mod cluster;
mod error;
pub mod fixtures;
pub mod keda;
pub mod metrics_server;
pub mod monitoring;
pub mod node;
pub mod operator;
pub mod process;
pub mod registry;
pub mod shared;
pub mod wait;

pub use cluster::{
    ControlPlane, ControlPlaneOptions, FakeNodes, GPU_RESOURCE, client_from_kubeconfig,
};
pub use error::{Error, Result};
