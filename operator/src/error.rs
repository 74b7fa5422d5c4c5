//! The operator's error type: every variant names the operation that failed
//! and carries the object it was working on, and maps to a bounded metric
//! label ([`Error::reason`]).

use std::time::Duration;

/// Errors of a reconcile pass, the leader elector and start-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `HndsrService` has no namespace (it is a namespaced kind, so the
    /// object came from somewhere unexpected).
    #[error("HndsrService {name} has no namespace")]
    MissingNamespace {
        /// Name of the object.
        name: String,
    },

    /// Server-side apply of a child object failed.
    #[error("applying {kind} {namespace}/{name} failed: {source}")]
    Apply {
        /// Kind of the child.
        kind: &'static str,
        /// Namespace of the child.
        namespace: String,
        /// Name of the child.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// Reading a child that is missing from the watch cache failed.
    #[error("reading {kind} {namespace}/{name} failed: {source}")]
    Read {
        /// Kind of the child.
        kind: &'static str,
        /// Namespace of the child.
        namespace: String,
        /// Name of the child.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// An object with a child's name exists but is not controlled by this
    /// `HndsrService`; the operator will not take it over.
    #[error(
        "{kind} {namespace}/{name} already exists and is not owned by this HndsrService: delete or rename it, or rename the HndsrService"
    )]
    Conflict {
        /// Kind of the child.
        kind: &'static str,
        /// Namespace of the child.
        namespace: String,
        /// Name of the child.
        name: String,
    },

    /// Deleting a child that the spec no longer asks for failed.
    #[error("deleting {kind} {namespace}/{name} failed: {source}")]
    Delete {
        /// Kind of the child.
        kind: &'static str,
        /// Namespace of the child.
        namespace: String,
        /// Name of the child.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// Patching `status` of the `HndsrService` failed.
    #[error("patching status of HndsrService {namespace}/{name} failed: {source}")]
    PatchStatus {
        /// Namespace of the object.
        namespace: String,
        /// Name of the object.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// A desired object could not be serialised (a bug in a builder).
    #[error("serialising the desired {kind} failed: {source}")]
    Serialize {
        /// Kind of the object.
        kind: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },

    /// Reading, creating or renewing the leader-election Lease failed.
    #[error("{operation} of Lease {namespace}/{name} failed: {source}")]
    Lease {
        /// `get`, `create` or `replace`.
        operation: &'static str,
        /// Namespace of the Lease.
        namespace: String,
        /// Name of the Lease.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// This replica held the lease but could not renew it within the renew
    /// deadline; another replica may be leading now.
    #[error("lost leadership of Lease {namespace}/{name}: not renewed for {elapsed:?}")]
    LeadershipLost {
        /// Namespace of the Lease.
        namespace: String,
        /// Name of the Lease.
        name: String,
        /// Time since the last successful renewal.
        elapsed: Duration,
    },
}

impl Error {
    /// A bounded, static label for `reconcile_errors_total{reason}`.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingNamespace { .. } => "missing_namespace",
            Self::Read { .. } => "read",
            Self::Conflict { .. } => "conflict",
            Self::Apply { .. } => "apply",
            Self::Delete { .. } => "delete",
            Self::PatchStatus { .. } => "patch_status",
            Self::Serialize { .. } => "serialize",
            Self::Lease { .. } => "lease",
            Self::LeadershipLost { .. } => "leadership_lost",
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
