//! The OpenAPI document (utoipa), served at `/openapi.json` and committed
//! as `docs/openapi.json` (`make generate`; drift fails `make test`).

use utoipa::OpenApi;

use super::handlers;

/// The server's API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "HNDSR inference server",
        description = "Satellite image super-resolution. See docs/server.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        handlers::upscale_raw,
        handlers::upscale_json,
        handlers::healthz,
        handlers::readyz,
        handlers::metrics,
        handlers::info,
        handlers::openapi,
    ),
    components(schemas(crate::error::ErrorBody)),
    tags(
        (name = "upscale", description = "Super-resolution"),
        (name = "probes", description = "Kubernetes probes and metrics"),
        (name = "info", description = "Server description"),
    )
)]
pub struct ApiDoc;

/// The document as pretty JSON with a trailing newline (as committed).
#[must_use]
pub fn json() -> String {
    let mut doc = ApiDoc::openapi();
    // The crate version would make the committed file churn on every bump.
    doc.info.version = "v1".to_owned();
    let mut s = doc.to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}
