//! Server-side apply of children with a write-free steady state.
//!
//! Every desired child is stamped with [`SPEC_HASH`], a hash of the desired
//! object, and applied under [`hndsr_crds::FIELD_MANAGER`] with `force`.
//! Before applying, the live child (from the watch cache) is checked:
//!
//! 1. its [`SPEC_HASH`] equals the desired one (our intent has not changed), and
//! 2. our field manager still owns every field of the desired object
//!    ([`owns_all_fields`]).
//!
//! Only when both hold is the apply skipped, so the steady state makes no
//! writes. (2) is what catches drift: when anybody else changes a field we
//! applied (`kubectl edit`, `kubectl apply`, `kubectl scale`, a JSON patch
//! that removes it), the API server moves ownership of that field to the
//! other manager (or drops it with the field), so it disappears from our
//! `managedFields` entry. Comparing ownership instead of values is immune to
//! the API server's normalisation (quantities, defaulted fields), which
//! would make a value comparison see "drift" forever.

use std::{borrow::Cow, fmt::Debug};

use k8s_openapi::{
    NamespaceResourceScope,
    apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry},
};
use kube::{
    Resource, ResourceExt,
    api::{Api, Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use sha2::{Digest, Sha256};

use hndsr_crds::FIELD_MANAGER;

/// Annotation on every child: hash of the desired object the operator applied.
pub const SPEC_HASH: &str = "hndsr.io/spec-hash";

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The live child matched: no write.
    Unchanged,
    /// The child did not exist and was created.
    Created,
    /// Our intent changed (spec or operator version): applied.
    Updated,
    /// Our intent was unchanged but someone else changed our fields: re-applied.
    DriftReverted,
}

impl Outcome {
    /// Whether an API write happened.
    #[must_use]
    pub fn wrote(self) -> bool {
        self != Self::Unchanged
    }
}

/// Hex sha256 (first 16 bytes) of the JSON of `obj`. Deterministic: struct
/// fields serialise in declaration order and maps are `BTreeMap`s.
///
/// # Errors
/// Serialisation failed.
pub fn spec_hash<K: Serialize>(obj: &K) -> Result<String, serde_json::Error> {
    let bytes = serde_json::to_vec(obj)?;
    let digest = Sha256::digest(&bytes);
    Ok(digest.iter().take(16).map(|b| format!("{b:02x}")).collect())
}

/// Whether the entry is our own apply on the main resource.
pub fn is_ours(entry: &ManagedFieldsEntry) -> bool {
    entry.manager.as_deref() == Some(FIELD_MANAGER)
        && entry.operation.as_deref() == Some("Apply")
        && entry.subresource.as_deref().is_none_or(str::is_empty)
}

/// Field manager of the one-field apply that hands a Deployment's
/// `spec.replicas` over to an autoscaler (see [`owns_replicas`]).
pub const REPLICAS_HANDOVER_MANAGER: &str = "hndsr-operator-replicas-handover";

/// Whether our apply entry in `managed` owns `spec.replicas`. Server-side
/// apply deletes a field its only owner stops applying, and the API server
/// then defaults `replicas` to 1: before the first apply that leaves the
/// count to an autoscaler, the operator applies the live count under
/// [`REPLICAS_HANDOVER_MANAGER`], which keeps it until the autoscaler's
/// first scale takes the field over (the handover the Kubernetes docs
/// describe for HPAs).
#[must_use]
pub fn owns_replicas(managed: &[ManagedFieldsEntry]) -> bool {
    managed
        .iter()
        .filter(|e| is_ours(e))
        .filter_map(fields_tree)
        .any(|f| f.get("f:spec").and_then(|s| s.get("f:replicas")).is_some())
}

/// The field set of a managed-fields entry as a tree, whether as the API
/// server sends it or [packed](pack_fields) by the watch caches.
fn fields_tree(entry: &ManagedFieldsEntry) -> Option<Cow<'_, Value>> {
    match &entry.fields_v1.as_ref()?.0 {
        Value::String(packed) => serde_json::from_str(packed).ok().map(Cow::Owned),
        tree => Some(Cow::Borrowed(tree)),
    }
}

/// Packs a field set into its compact JSON text. A field set is a deep tree
/// of one-key objects, which as `serde_json` maps costs tens of kilobytes
/// per Deployment; as text it costs its length. A real field set is always
/// an object, so a string is unambiguous; the readers here unpack it.
pub fn pack_fields(fields: &mut FieldsV1) {
    if fields.0.is_object()
        && let Ok(text) = serde_json::to_string(&fields.0)
    {
        fields.0 = Value::String(text);
    }
}

/// Whether `FIELD_MANAGER`'s apply entry in `managed` owns every field set in
/// `desired` (the JSON of the desired object). `apiVersion`, `kind`,
/// `metadata.name` and `metadata.namespace` are identity, not owned fields.
#[must_use]
pub fn owns_all_fields(managed: &[ManagedFieldsEntry], desired: &Value) -> bool {
    let Some(fields) = managed.iter().find(|e| is_ours(e)).and_then(fields_tree) else {
        return false;
    };
    let Some(top) = desired.as_object() else {
        return false;
    };
    top.iter().all(|(key, value)| match key.as_str() {
        "apiVersion" | "kind" | "status" => true,
        "metadata" => {
            let mut meta = value.clone();
            if let Some(m) = meta.as_object_mut() {
                for identity in [
                    "name",
                    "namespace",
                    "uid",
                    "resourceVersion",
                    "managedFields",
                ] {
                    m.remove(identity);
                }
            }
            field_covered(&meta, fields.get("f:metadata"))
        }
        _ => field_covered(value, fields.get(format!("f:{key}"))),
    })
}

/// `value` is set by us under the fieldsV1 node `node`.
fn field_covered(value: &Value, node: Option<&Value>) -> bool {
    // Empty maps/lists and nulls may not be recorded at all: never drift.
    match value {
        Value::Null => return true,
        Value::Object(m) if m.is_empty() => return true,
        Value::Array(a) if a.is_empty() => return true,
        _ => {}
    }
    let Some(node) = node else { return false };
    let Some(children) = node.as_object() else {
        return true;
    };
    // `{}` is a leaf: an atomic field owned as a whole. (A node holding only
    // `.` owns the map or list itself but none of its members.)
    if children.is_empty() {
        return true;
    }
    match value {
        Value::Object(map) => map
            .iter()
            .all(|(k, v)| field_covered(v, children.get(&format!("f:{k}")))),
        Value::Array(items) => items.iter().enumerate().all(|(i, item)| {
            list_item_node(children, i, item).is_some_and(|n| field_covered(item, Some(n)))
        }),
        _ => true,
    }
}

/// Finds the fieldsV1 node of a list item: by merge key (`k:{...}`), by
/// value (`v:...`, set lists) or by index (`i:N`).
fn list_item_node<'a>(
    children: &'a serde_json::Map<String, Value>,
    index: usize,
    item: &Value,
) -> Option<&'a Value> {
    children.iter().find_map(|(key, node)| {
        if let Some(k) = key.strip_prefix("k:") {
            let keys: serde_json::Map<String, Value> = serde_json::from_str(k).ok()?;
            let obj = item.as_object()?;
            // A key field we did not set was defaulted by the API server
            // (e.g. `protocol: TCP`); every key field we did set must match.
            let mut matched = false;
            for (kk, kv) in &keys {
                match obj.get(kk) {
                    Some(v) if v == kv => matched = true,
                    Some(_) => return None,
                    None => {}
                }
            }
            matched.then_some(node)
        } else if let Some(v) = key.strip_prefix("v:") {
            let val: Value = serde_json::from_str(v).ok()?;
            (val == *item).then_some(node)
        } else if let Some(i) = key.strip_prefix("i:") {
            (i.parse::<usize>().ok()? == index).then_some(node)
        } else {
            None
        }
    })
}

/// Decides whether `desired` must be applied over `live`, and why.
///
/// # Errors
/// Serialisation of `desired` failed.
pub fn plan<K>(desired: &mut K, live: Option<&K>) -> Result<Outcome, serde_json::Error>
where
    K: Resource + Serialize,
{
    let hash = spec_hash(&*desired)?;
    desired
        .annotations_mut()
        .insert(SPEC_HASH.to_owned(), hash.clone());
    let Some(live) = live else {
        return Ok(Outcome::Created);
    };
    if live.annotations().get(SPEC_HASH) != Some(&hash) {
        return Ok(Outcome::Updated);
    }
    let json = serde_json::to_value(&*desired)?;
    if owns_all_fields(
        live.meta().managed_fields.as_deref().unwrap_or_default(),
        &json,
    ) {
        Ok(Outcome::Unchanged)
    } else {
        Ok(Outcome::DriftReverted)
    }
}

/// Applies `desired` with server-side apply (force, our field manager)
/// unless [`plan`] says the live child already matches. Returns what was
/// done and, when it wrote, the object as the API server answered the
/// apply (its `metadata.generation` says whether the spec changed).
///
/// # Errors
/// Serialisation or the API call failed.
pub async fn ensure<K>(
    api: &Api<K>,
    mut desired: K,
    live: Option<&K>,
) -> Result<(Outcome, Option<K>), EnsureError>
where
    K: Resource<Scope = NamespaceResourceScope> + Serialize + DeserializeOwned + Clone + Debug,
{
    let outcome = plan(&mut desired, live).map_err(EnsureError::Serialize)?;
    if !outcome.wrote() {
        return Ok((outcome, None));
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = api
        .patch(&desired.name_any(), &params, &Patch::Apply(&desired))
        .await
        .map_err(EnsureError::Api)?;
    Ok((outcome, Some(applied)))
}

/// Why [`ensure`] failed (the caller adds the kind and name).
#[derive(Debug, thiserror::Error)]
pub enum EnsureError {
    /// The desired object could not be serialised.
    #[error(transparent)]
    Serialize(serde_json::Error),
    /// The apply call failed.
    #[error(transparent)]
    Api(kube::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
    use serde_json::json;

    fn entry(manager: &str, op: &str, fields: Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(op.into()),
            fields_v1: Some(FieldsV1(fields)),
            fields_type: Some("FieldsV1".into()),
            ..ManagedFieldsEntry::default()
        }
    }

    fn desired() -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "x", "namespace": "ns", "labels": {"a": "b"},
                          "annotations": {"hndsr.io/spec-hash": "h"}},
            "spec": {
                "selector": {"matchLabels": {"a": "b"}},
                "template": {"spec": {
                    "containers": [{"name": "server", "image": "img:1",
                                    "args": ["--x"],
                                    "ports": [{"containerPort": 8080, "name": "http"}],
                                    "resources": {"limits": {"cpu": "1000m"}}}],
                    "securityContext": {}
                }}
            }
        })
    }

    fn our_fields() -> Value {
        json!({
            "f:metadata": {"f:labels": {".": {}, "f:a": {}},
                            "f:annotations": {"f:hndsr.io/spec-hash": {}}},
            "f:spec": {
                "f:selector": {},
                "f:template": {"f:spec": {"f:containers": {
                    "k:{\"name\":\"server\"}": {
                        ".": {}, "f:name": {}, "f:image": {}, "f:args": {},
                        "f:ports": {"k:{\"containerPort\":8080,\"protocol\":\"TCP\"}": {
                            ".": {}, "f:containerPort": {}, "f:name": {}}},
                        "f:resources": {"f:limits": {"f:cpu": {}}}
                    }
                }}}
            }
        })
    }

    #[test]
    fn all_fields_owned_means_no_drift() {
        let managed = vec![
            entry(FIELD_MANAGER, "Apply", our_fields()),
            entry(
                "kube-controller-manager",
                "Update",
                json!({"f:metadata": {"f:annotations": {"f:deployment.kubernetes.io/revision": {}}}}),
            ),
        ];
        assert!(owns_all_fields(&managed, &desired()));
    }

    #[test]
    fn a_field_taken_by_another_manager_is_drift() {
        let mut fields = our_fields();
        // `kubectl edit` changed the image: ownership moved to kubectl-edit.
        fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"server\"}"]
            .as_object_mut()
            .unwrap()
            .remove("f:image");
        let managed = vec![
            entry(FIELD_MANAGER, "Apply", fields),
            entry(
                "kubectl-edit",
                "Update",
                json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"server\"}": {"f:image": {}}}}}}}),
            ),
        ];
        assert!(!owns_all_fields(&managed, &desired()));
    }

    #[test]
    fn a_removed_label_is_drift() {
        let mut fields = our_fields();
        fields["f:metadata"]["f:labels"]
            .as_object_mut()
            .unwrap()
            .remove("f:a");
        assert!(!owns_all_fields(
            &[entry(FIELD_MANAGER, "Apply", fields)],
            &desired()
        ));
    }

    #[test]
    fn foreign_fields_next_to_ours_are_not_drift() {
        // `kubectl rollout restart` adds a template annotation we never set.
        let managed = vec![
            entry(FIELD_MANAGER, "Apply", our_fields()),
            entry(
                "kubectl-rollout",
                "Update",
                json!({"f:spec": {"f:template": {"f:metadata": {"f:annotations": {"f:kubectl.kubernetes.io/restartedAt": {}}}}}}),
            ),
        ];
        assert!(owns_all_fields(&managed, &desired()));
    }

    #[test]
    fn no_entry_of_ours_means_apply() {
        let managed = vec![entry("kubectl-client-side-apply", "Update", our_fields())];
        assert!(!owns_all_fields(&managed, &desired()));
        assert!(!owns_all_fields(&[], &desired()));
    }

    #[test]
    fn hash_is_stable_and_sensitive() {
        let a = desired();
        let mut b = desired();
        assert_eq!(spec_hash(&a).unwrap(), spec_hash(&b).unwrap());
        b["spec"]["template"]["spec"]["containers"][0]["image"] = json!("img:2");
        assert_ne!(spec_hash(&a).unwrap(), spec_hash(&b).unwrap());
        assert_eq!(spec_hash(&a).unwrap().len(), 32);
    }
}
