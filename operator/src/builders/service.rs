//! Service `<name>`: a ClusterIP selecting serving pods only, so standby
//! pods (prewarm) never receive traffic until promoted.

use hndsr_contract::http;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Ctx, common_labels, serving_selector};

/// Port the Service exposes (plain HTTP; the container listens on the contract port).
pub const SERVICE_PORT: i32 = 80;

pub(super) fn build(ctx: &Ctx<'_>) -> Service {
    Service {
        metadata: ctx.meta(common_labels(&ctx.name)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(serving_selector(&ctx.name)),
            ports: Some(vec![ServicePort {
                name: Some(http::PORT_NAME.to_owned()),
                port: SERVICE_PORT,
                target_port: Some(IntOrString::String(http::PORT_NAME.to_owned())),
                protocol: Some("TCP".to_owned()),
                app_protocol: Some("http".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}
