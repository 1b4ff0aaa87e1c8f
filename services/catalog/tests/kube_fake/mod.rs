// Each test binary uses a different part of this module.
#![allow(dead_code)]

//! A small in-process Kubernetes API server for the DataProduct resources:
//! LIST and WATCH (what kube's watcher calls), GET, PATCH (JSON patch and
//! merge patch) and the status subresource, with
//! the API server's rules that the reconciler relies on — `test` of a missing
//! field equals `null`, the status subresource changes only `.status`, and an
//! object being deleted disappears once its last finalizer is removed. The
//! API server is not a part we ship, so faking it is fair; everything else
//! in these tests is real.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

const COLLECTION: &str = "/apis/medallion.dev/v1alpha1/namespaces/{ns}/dataproducts";
const BASE: &str = "/apis/medallion.dev/v1alpha1/namespaces/{ns}/dataproducts/{name}";

struct Store {
    /// Every change as a watch event: (resourceVersion, type, object).
    events: Vec<(u64, &'static str, Value)>,
    changes: tokio::sync::broadcast::Sender<(u64, &'static str, Value)>,
    objects: BTreeMap<(String, String), Value>,
    /// Every request: `METHOD path content-type`.
    requests: Vec<String>,
    resource_version: u64,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            events: Vec::new(),
            changes: tokio::sync::broadcast::channel(1024).0,
            objects: BTreeMap::new(),
            requests: Vec::new(),
            resource_version: 0,
        }
    }
}

impl Store {
    fn record(&mut self, kind: &'static str, object: &Value) {
        let rv = self.resource_version;
        self.events.push((rv, kind, object.clone()));
        let _ = self.changes.send((rv, kind, object.clone()));
    }
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
        let addr = self.serve().await;
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Serves on a free port; returns its address.
    pub async fn serve(&self) -> std::net::SocketAddr {
        let app = Router::new()
            .route(COLLECTION, get(list_or_watch))
            .route(BASE, get(get_object).patch(patch_object))
            .route(
                &format!("{BASE}/status"),
                get(get_object).patch(patch_status),
            )
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
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
                s.record("MODIFIED", &merged);
                s.objects.insert(key, merged);
            }
            None => {
                object["metadata"]["namespace"] = json!(ns);
                object["metadata"]["uid"] = json!(format!("uid-{name}"));
                object["metadata"]["generation"] = json!(1);
                object["metadata"]["resourceVersion"] = json!(rv.to_string());
                object["metadata"]["creationTimestamp"] = json!("2026-11-29T10:00:00Z");
                s.record("ADDED", &object);
                s.objects.insert(key, object);
            }
        }
    }

    /// `kubectl delete`: with finalizers the object only gets a deletion timestamp.
    pub fn delete(&self, name: &str) {
        let mut s = self.0.lock().unwrap();
        let key = ("default".to_string(), name.to_string());
        let Some(mut obj) = s.objects.get(&key).cloned() else {
            return;
        };
        s.resource_version += 1;
        obj["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            obj["metadata"]["deletionTimestamp"] = json!("2026-11-29T11:00:00Z");
            s.record("MODIFIED", &obj);
            s.objects.insert(key, obj);
        } else {
            s.record("DELETED", &obj);
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
        s.record("DELETED", &next);
        s.objects.remove(&key);
    } else {
        s.record("MODIFIED", &next);
        s.objects.insert(key, next.clone());
    }
    axum::Json(next).into_response()
}

/// LIST, or with `watch=true` a stream of the changes after
/// `resourceVersion` (history first, then live), one JSON event per line.
async fn list_or_watch(
    State(api): State<FakeApi>,
    Path(ns): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let mut s = api.0.lock().unwrap();
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    s.requests
        .push(format!("{} {ns}", if watch { "WATCH" } else { "LIST" }));
    if !watch {
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((n, _), _)| *n == ns)
            .map(|(_, o)| o.clone())
            .collect();
        return axum::Json(json!({
            "kind": "DataProductList", "apiVersion": "medallion.dev/v1alpha1",
            "metadata": {"resourceVersion": s.resource_version.to_string()},
            "items": items,
        }))
        .into_response();
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let live = s.changes.subscribe();
    let history: Vec<_> = s
        .events
        .iter()
        .filter(|(rv, _, _)| *rv > from)
        .cloned()
        .collect();
    let last = history.last().map(|(rv, _, _)| *rv).unwrap_or(from);
    drop(s);
    fn line(kind: &str, object: Value) -> Result<Bytes, std::convert::Infallible> {
        let mut l = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
        l.push(b'\n');
        Ok(Bytes::from(l))
    }
    let past = futures::stream::iter(history.into_iter().map(|(_, k, o)| line(k, o)));
    let future = futures::stream::unfold((live, last), |(mut rx, last)| async move {
        loop {
            match rx.recv().await {
                Ok((rv, k, o)) if rv > last => return Some((line(k, o), (rx, rv))),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    });
    use futures::StreamExt as _;
    Response::builder()
        .header("content-type", "application/json")
        .body(axum::body::Body::from_stream(past.chain(future)))
        .unwrap()
}
