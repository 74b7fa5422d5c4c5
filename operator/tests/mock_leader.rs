//! The Lease elector against a mocked API server: create when absent,
//! follow a valid foreign lease without writing, take over an expired one
//! with a resourceVersion-guarded replace, and lose a race on 409.

use std::time::Duration;

use hndsr_operator::{config::LeaderConfig, leader::LeaderElector};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{Client, client::Body};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(10);

fn cfg() -> LeaderConfig {
    LeaderConfig {
        lease_name: "hndsr-operator-leader".into(),
        lease_namespace: "hndsr-system".into(),
        identity: "op-a".into(),
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    }
}

fn lease(holder: &str, renewed: Timestamp) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "hndsr-operator-leader", "namespace": "hndsr-system", "resourceVersion": "41"},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": renewed.to_string(),
            "renewTime": renewed.to_string(),
            "leaseTransitions": 2
        }
    })
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

fn conflict() -> (StatusCode, Value) {
    (
        StatusCode::CONFLICT,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
               "message": "the object has been modified"}),
    )
}

/// Answers the scripted responses in order; returns (method, path, body) of each request.
async fn run(
    script: Vec<(StatusCode, Value)>,
) -> (
    Result<bool, hndsr_operator::error::Error>,
    Vec<(Method, String, Value)>,
) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let elector = LeaderElector::new(Client::new(svc, "default"), cfg());
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        for (code, body) in script {
            let Some((req, send)) = handle.next_request().await else {
                break;
            };
            let (parts, b) = req.into_parts();
            let bytes = b.collect().await.unwrap().to_bytes();
            let req_body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            seen.push((parts.method, parts.uri.path().to_owned(), req_body));
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
        seen
    });
    let result = tokio::time::timeout(TIMEOUT, elector.try_acquire_or_renew())
        .await
        .expect("elector timed out");
    let seen = tokio::time::timeout(TIMEOUT, server)
        .await
        .expect("mock timed out")
        .unwrap();
    (result, seen)
}

const PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/hndsr-system/leases/hndsr-operator-leader";

#[tokio::test]
async fn creates_the_lease_when_absent() {
    let created = lease("op-a", Timestamp::now());
    let (result, seen) = run(vec![not_found(), (StatusCode::CREATED, created)]).await;
    assert!(result.unwrap());
    assert_eq!(seen[0].0, Method::GET);
    assert_eq!(seen[0].1, PATH);
    assert_eq!(seen[1].0, Method::POST);
    assert_eq!(seen[1].2["spec"]["holderIdentity"], "op-a");
    assert_eq!(seen[1].2["spec"]["leaseTransitions"], 0);
}

#[tokio::test]
async fn follows_a_valid_foreign_lease_without_writing() {
    let (result, seen) = run(vec![(StatusCode::OK, lease("op-b", Timestamp::now()))]).await;
    assert!(!result.unwrap());
    assert_eq!(seen.len(), 1, "only the read: {seen:?}");
}

#[tokio::test]
async fn takes_over_an_expired_lease_guarded_by_resource_version() {
    let old = Timestamp::now() - SignedDuration::from_secs(60);
    let expired = lease("op-b", old);
    let mut taken = expired.clone();
    taken["spec"]["holderIdentity"] = json!("op-a");
    let (result, seen) = run(vec![(StatusCode::OK, expired), (StatusCode::OK, taken)]).await;
    assert!(result.unwrap());
    assert_eq!(seen[1].0, Method::PUT);
    assert_eq!(seen[1].1, PATH);
    let body = &seen[1].2;
    assert_eq!(
        body["metadata"]["resourceVersion"], "41",
        "replace is guarded by the version read"
    );
    assert_eq!(body["spec"]["holderIdentity"], "op-a");
    assert_eq!(body["spec"]["leaseTransitions"], 3);
}

#[tokio::test]
async fn renews_its_own_lease() {
    let mine = lease("op-a", Timestamp::now() - SignedDuration::from_secs(2));
    let (result, seen) = run(vec![(StatusCode::OK, mine.clone()), (StatusCode::OK, mine)]).await;
    assert!(result.unwrap());
    assert_eq!(seen[1].0, Method::PUT);
    assert_eq!(
        seen[1].2["spec"]["leaseTransitions"], 2,
        "a renewal is no transition"
    );
}

#[tokio::test]
async fn losing_the_race_is_not_an_error() {
    let old = Timestamp::now() - SignedDuration::from_secs(60);
    let (result, seen) = run(vec![(StatusCode::OK, lease("op-b", old)), conflict()]).await;
    assert!(!result.unwrap(), "409: another replica won");
    assert_eq!(seen.len(), 2);
}
