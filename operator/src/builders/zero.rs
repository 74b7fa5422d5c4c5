//! EndpointSlice `<name>-zero`: while a KEDA service is at zero serving
//! pods, its Service sends requests to the operator's zero responder
//! instead of refusing the connection.
//!
//! kube-proxy routes a Service to every EndpointSlice labelled
//! `kubernetes.io/service-name: <name>`, not only those the EndpointSlice
//! controller makes from the selector; one with another `managed-by` is
//! left alone by that controller. The slice's port carries the Service's
//! port name, which is how kube-proxy pairs it with the Service port.

use std::net::SocketAddr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};

use super::{Ctx, common_labels};
use hndsr_contract::http;

/// `endpointslice.kubernetes.io/managed-by` of the zero slice: anything
/// but the EndpointSlice controller's own value keeps it from deleting it.
pub const MANAGED_BY: &str = "hndsr-operator.hndsr.io";

/// Name of the zero EndpointSlice of `name`.
#[must_use]
pub fn zero_slice_name(name: &str) -> String {
    format!("{name}-zero")
}

pub(super) fn build(ctx: &Ctx<'_>, responder: SocketAddr) -> EndpointSlice {
    let mut labels = common_labels(&ctx.name);
    labels.insert("kubernetes.io/service-name".to_owned(), ctx.name.clone());
    labels.insert(
        "endpointslice.kubernetes.io/managed-by".to_owned(),
        MANAGED_BY.to_owned(),
    );
    let mut metadata = ctx.meta(labels);
    metadata.name = Some(zero_slice_name(&ctx.name));
    EndpointSlice {
        metadata,
        address_type: if responder.is_ipv4() { "IPv4" } else { "IPv6" }.to_owned(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![responder.ip().to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            ..Endpoint::default()
        }]),
        ports: Some(vec![EndpointPort {
            name: Some(http::PORT_NAME.to_owned()),
            port: Some(i32::from(responder.port())),
            protocol: Some("TCP".to_owned()),
            ..EndpointPort::default()
        }]),
    }
}
