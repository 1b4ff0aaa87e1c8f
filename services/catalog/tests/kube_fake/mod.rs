//! A small in-process Kubernetes API server for the DataProduct resources:
//! GET, PATCH (JSON patch and merge patch) and the status subresource, with
//! the API server's rules that the reconciler relies on — `test` of a missing
//! field equals `null`, the status subresource changes only `.status`, and an
//! object being deleted disappears once its last finalizer is removed. The
//! API server is not a part we ship, so faking it is fair; everything else
//! in these tests is real.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

const BASE: &str = "/apis/medallion.dev/v1alpha1/namespaces/{ns}/dataproducts/{name}";

#[derive(Default)]
struct Store {
    objects: BTreeMap<(String, String), Value>,
    /// Every request: `METHOD path content-type`.
    requests: Vec<String>,
    resource_version: u64,
}

#[derive(Clone, Default)]
pub struct FakeApi(Arc<Mutex<Store>>);

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
        })),
    )
        .into_response()
}

impl FakeApi {
    /// Serves on a free port; returns a kube client for it.
    pub async fn start(&self) -> kube::Client {
        let app = Router::new()
            .route(BASE, get(get_object).patch(patch_object))
            .route(
                &format!("{BASE}/status"),
                get(get_object).patch(patch_status),
            )
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// `kubectl apply` of a new object (or a spec change: generation + 1).
    pub fn apply(&self, object: Value) {
        let mut s = self.0.lock().unwrap();
        s.resource_version += 1;
        let rv = s.resource_version;
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let key = (ns.clone(), name.clone());
        let mut object = object;
        match s.objects.get(&key) {
            Some(old) => {
                let mut merged = old.clone();
                let generation = old["metadata"]["generation"].as_i64().unwrap()
                    + i64::from(old["spec"] != object["spec"]);
                merged["spec"] = object["spec"].take();
                merged["metadata"]["annotations"] = object["metadata"]["annotations"].take();
                merged["metadata"]["generation"] = json!(generation);
                merged["metadata"]["resourceVersion"] = json!(rv.to_string());
                s.objects.insert(key, merged);
            }
            None => {
                object["metadata"]["namespace"] = json!(ns);
                object["metadata"]["uid"] = json!(format!("uid-{name}"));
                object["metadata"]["generation"] = json!(1);
                object["metadata"]["resourceVersion"] = json!(rv.to_string());
                object["metadata"]["creationTimestamp"] = json!("2026-11-29T10:00:00Z");
                s.objects.insert(key, object);
            }
        }
    }

    /// `kubectl delete`: with finalizers the object only gets a deletion timestamp.
    pub fn delete(&self, name: &str) {
        let mut s = self.0.lock().unwrap();
        let key = ("default".to_string(), name.to_string());
        let Some(obj) = s.objects.get_mut(&key) else {
            return;
        };
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            obj["metadata"]["deletionTimestamp"] = json!("2026-11-29T11:00:00Z");
        } else {
            s.objects.remove(&key);
        }
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        let s = self.0.lock().unwrap();
        s.objects
            .get(&("default".to_string(), name.to_string()))
            .cloned()
    }

    pub fn requests(&self) -> Vec<String> {
        self.0.lock().unwrap().requests.clone()
    }
}

async fn get_object(
    State(api): State<FakeApi>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let mut s = api.0.lock().unwrap();
    s.requests.push(format!("GET {ns}/{name}"));
    match s.objects.get(&(ns, name.clone())) {
        Some(o) => axum::Json(o.clone()).into_response(),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("dataproducts \"{name}\" not found"),
        ),
    }
}

fn content_type(h: &HeaderMap) -> String {
    h.get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

async fn patch_object(
    State(api): State<FakeApi>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch(api, ns, name, &content_type(&headers), &body, false)
}

async fn patch_status(
    State(api): State<FakeApi>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch(api, ns, name, &content_type(&headers), &body, true)
}

fn patch(
    api: FakeApi,
    ns: String,
    name: String,
    ct: &str,
    body: &[u8],
    status_only: bool,
) -> Response {
    let mut s = api.0.lock().unwrap();
    let sub = if status_only { "/status" } else { "" };
    s.requests.push(format!("PATCH {ns}/{name}{sub} {ct}"));
    let key = (ns, name.clone());
    let Some(current) = s.objects.get(&key).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("dataproducts \"{name}\" not found"),
        );
    };
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "body is not JSON".into(),
        );
    };
    let mut next = current.clone();
    // The API server's JSON patch treats a missing field as null.
    if next["metadata"].get("finalizers").is_none() {
        next["metadata"]["finalizers"] = Value::Null;
    }
    let applied = match ct {
        "application/json-patch+json" => serde_json::from_value::<json_patch::Patch>(doc)
            .map_err(|e| e.to_string())
            .and_then(|p| json_patch::patch(&mut next, &p).map_err(|e| e.to_string())),
        "application/merge-patch+json" => {
            json_patch::merge(&mut next, &doc);
            Ok(())
        }
        other => Err(format!("content type {other} is not supported here")),
    };
    if let Err(e) = applied {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e);
    }
    if next["metadata"]["finalizers"].is_null() {
        next["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("finalizers");
    }
    if status_only {
        // The status subresource ignores everything but `.status`.
        let mut only = current.clone();
        only["status"] = next["status"].take();
        next = only;
    } else {
        // The main resource ignores `.status`.
        next["status"] = current.get("status").cloned().unwrap_or(Value::Null);
        if next["status"].is_null() {
            next.as_object_mut().unwrap().remove("status");
        }
    }
    s.resource_version += 1;
    next["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
    let deleting = next["metadata"].get("deletionTimestamp").is_some();
    let finalizers_left = next["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    if deleting && !finalizers_left {
        s.objects.remove(&key);
    } else {
        s.objects.insert(key, next.clone());
    }
    axum::Json(next).into_response()
}
