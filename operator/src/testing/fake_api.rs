//! An in-memory Kubernetes API server behind a real `kube::Client`, for controller tests.
//!
//! It keeps objects as JSON and implements what the operator uses: get, list with equality
//! label selectors, create, replace (optimistic concurrency), server-side apply (owner
//! replaces the fields it sends, status kept), merge and JSON patches, the status
//! subresource, deletion with finalizers and owner-reference garbage collection. A write
//! that changes nothing keeps the resourceVersion, as a real apiserver does, so tests can
//! assert that a second reconcile writes nothing.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

/// `(api prefix, plural, namespace, name)`, e.g. `("apis/apps/v1", "deployments", "default", "x")`.
type Key = (String, String, String, String);

#[derive(Default)]
pub struct Store {
    objects: BTreeMap<Key, Value>,
    next_version: u64,
    /// Every mutating request, as `METHOD plural/name[/sub]`.
    pub writes: Vec<String>,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    pub store: Arc<Mutex<Store>>,
}

struct Target {
    prefix: String,
    plural: String,
    namespace: String,
    name: Option<String>,
    subresource: Option<String>,
}

impl FakeApi {
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(request).await) }
        });
        kube::Client::new(service, "default")
    }

    pub fn get(&self, prefix: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let store = self.store.lock().unwrap();
        store.objects.get(&(prefix.into(), plural.into(), namespace.into(), name.into())).cloned()
    }

    pub fn list(&self, prefix: &str, plural: &str) -> Vec<Value> {
        let store = self.store.lock().unwrap();
        store.objects.iter().filter(|((p, k, _, _), _)| p == prefix && k == plural).map(|(_, v)| v.clone()).collect()
    }

    pub fn names(&self, prefix: &str, plural: &str) -> Vec<String> {
        self.list(prefix, plural).iter().map(|o| o["metadata"]["name"].as_str().unwrap_or_default().to_string()).collect()
    }

    /// Puts an object as-is (tests use it to play kubelet and controllers: set status).
    pub fn put(&self, prefix: &str, plural: &str, namespace: &str, object: Value) {
        let mut store = self.store.lock().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let stored = store.stamp(object, None);
        store.objects.insert((prefix.into(), plural.into(), namespace.into(), name), stored);
    }

    /// Mutates a stored object in place.
    pub fn edit(&self, prefix: &str, plural: &str, namespace: &str, name: &str, edit: impl FnOnce(&mut Value)) {
        let mut store = self.store.lock().unwrap();
        let key = (prefix.to_string(), plural.to_string(), namespace.to_string(), name.to_string());
        let mut object = store.objects.get(&key).cloned().expect("object to edit exists");
        edit(&mut object);
        let stamped = store.stamp(object, None);
        store.objects.insert(key, stamped);
    }

    pub fn remove(&self, prefix: &str, plural: &str, namespace: &str, name: &str) {
        let mut store = self.store.lock().unwrap();
        store.objects.remove(&(prefix.into(), plural.into(), namespace.into(), name.into()));
    }

    /// Every object but Events (which record history, not state).
    pub fn snapshot(&self) -> BTreeMap<Key, Value> {
        let store = self.store.lock().unwrap();
        store.objects.iter().filter(|((_, plural, _, _), _)| plural != "events").map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn write_count(&self) -> usize {
        self.store.lock().unwrap().writes.len()
    }

    async fn handle(&self, request: Request<kube::client::Body>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let Some(target) = parse_path(parts.uri.path()) else { return status(404, "NotFound", "unknown path") };
        let query = parts.uri.query().unwrap_or_default().to_string();
        let content_type = parts.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let mut store = self.store.lock().unwrap();
        if parts.method != Method::GET {
            let what = format!("{} {}/{}{}", parts.method, target.plural, target.name.clone().unwrap_or_default(), target.subresource.as_ref().map(|s| format!("/{s}")).unwrap_or_default());
            store.writes.push(what);
        }
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        match (parts.method.clone(), &target.name) {
            (Method::GET, None) => store.list_response(&target, &query),
            (Method::GET, Some(_)) => store.get_response(&target),
            (Method::POST, _) => store.create(&target, body),
            (Method::PUT, Some(_)) => store.replace(&target, body),
            (Method::PATCH, Some(_)) => store.patch(&target, body, &content_type),
            (Method::DELETE, Some(_)) => store.delete(&target),
            _ => status(405, "MethodNotAllowed", "unsupported"),
        }
    }
}

impl Store {
    fn key(target: &Target, name: &str) -> Key {
        (target.prefix.clone(), target.plural.clone(), target.namespace.clone(), name.to_string())
    }

    /// Fills server-side metadata; bumps resourceVersion only if the object changed.
    fn stamp(&mut self, mut object: Value, previous: Option<&Value>) -> Value {
        let meta = &mut object["metadata"];
        if let Some(prev) = previous {
            for field in ["uid", "creationTimestamp", "resourceVersion", "generation", "deletionTimestamp"] {
                if !prev["metadata"][field].is_null() {
                    meta[field] = prev["metadata"][field].clone();
                }
            }
            if prev == &object {
                return object;
            }
            let spec_changed = prev.get("spec") != object.get("spec");
            if spec_changed {
                let generation = prev["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                object["metadata"]["generation"] = json!(generation);
            }
        } else {
            let name = meta["name"].as_str().unwrap_or_default().to_string();
            if meta["uid"].is_null() {
                meta["uid"] = json!(format!("uid-{name}-{}", self.next_version));
            }
            meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            if meta["generation"].is_null() {
                meta["generation"] = json!(1);
            }
        }
        self.next_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.next_version.to_string());
        object
    }

    fn get_response(&self, target: &Target) -> Response<Full<Bytes>> {
        let key = Self::key(target, target.name.as_deref().unwrap_or_default());
        match self.objects.get(&key) {
            Some(object) => ok(200, object),
            None => status(404, "NotFound", "not found"),
        }
    }

    fn list_response(&self, target: &Target, query: &str) -> Response<Full<Bytes>> {
        let selector = query_param(query, "labelSelector");
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((p, k, ns, _), _)| p == &target.prefix && k == &target.plural && (target.namespace.is_empty() || ns == &target.namespace))
            .map(|(_, v)| v.clone())
            .filter(|v| matches_selector(v, selector.as_deref()))
            .collect();
        ok(200, &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": self.next_version.to_string()}, "items": items}))
    }

    fn create(&mut self, target: &Target, mut body: Value) -> Response<Full<Bytes>> {
        let name = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let key = Self::key(target, &name);
        if self.objects.contains_key(&key) {
            return status(409, "AlreadyExists", "already exists");
        }
        body["metadata"]["namespace"] = json!(target.namespace);
        let stored = self.stamp(body, None);
        self.objects.insert(key, stored.clone());
        ok(201, &stored)
    }

    fn replace(&mut self, target: &Target, body: Value) -> Response<Full<Bytes>> {
        let key = Self::key(target, target.name.as_deref().unwrap_or_default());
        let Some(existing) = self.objects.get(&key).cloned() else { return status(404, "NotFound", "not found") };
        let sent_version = body["metadata"]["resourceVersion"].as_str().map(str::to_string);
        if sent_version.is_some() && sent_version.as_deref() != existing["metadata"]["resourceVersion"].as_str() {
            return status(409, "Conflict", "the object has been modified");
        }
        let stored = self.stamp(body, Some(&existing));
        self.objects.insert(key, stored.clone());
        ok(200, &stored)
    }

    fn patch(&mut self, target: &Target, body: Value, content_type: &str) -> Response<Full<Bytes>> {
        let key = Self::key(target, target.name.as_deref().unwrap_or_default());
        let existing = self.objects.get(&key).cloned();
        let on_status = target.subresource.as_deref() == Some("status");
        let patched = match (content_type, existing.clone()) {
            (t, None) if t.contains("apply-patch") && !on_status => {
                let mut created = body.clone();
                if let Some(map) = created.as_object_mut() {
                    map.remove("status");
                }
                created["metadata"]["namespace"] = json!(target.namespace);
                created
            }
            (_, None) => return status(404, "NotFound", "not found"),
            (t, Some(current)) if t.contains("apply-patch") => server_side_apply(current, body, on_status),
            (t, Some(mut current)) if t.contains("merge-patch") => {
                merge(&mut current, &body);
                current
            }
            (t, Some(mut current)) if t.contains("json-patch") => {
                null_missing_test_paths(&mut current, &body);
                let Ok(patch) = serde_json::from_value::<json_patch::Patch>(body) else { return status(400, "BadRequest", "bad json patch") };
                if json_patch::patch(&mut current, &patch).is_err() {
                    return status(422, "Invalid", "json patch test failed");
                }
                current
            }
            _ => return status(415, "UnsupportedMediaType", "patch type"),
        };
        let stored = self.stamp(patched, existing.as_ref());
        if is_deleted_and_unblocked(&stored) {
            self.remove_with_dependents(&key);
            return ok(200, &stored);
        }
        self.objects.insert(key, stored.clone());
        ok(200, &stored)
    }

    fn delete(&mut self, target: &Target) -> Response<Full<Bytes>> {
        let key = Self::key(target, target.name.as_deref().unwrap_or_default());
        let Some(mut object) = self.objects.get(&key).cloned() else { return status(404, "NotFound", "not found") };
        let has_finalizers = object["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if object["metadata"]["deletionTimestamp"].is_null() {
                object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:01Z");
                self.next_version += 1;
                object["metadata"]["resourceVersion"] = json!(self.next_version.to_string());
                self.objects.insert(key, object.clone());
            }
            return ok(200, &object);
        }
        self.remove_with_dependents(&key);
        ok(200, &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}))
    }

    /// Removes an object and, like the garbage collector, everything it owns.
    fn remove_with_dependents(&mut self, key: &Key) {
        let Some(object) = self.objects.remove(key) else { return };
        let uid = object["metadata"]["uid"].as_str().unwrap_or_default().to_string();
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, v)| v["metadata"]["ownerReferences"].as_array().is_some_and(|refs| refs.iter().any(|r| r["uid"] == json!(uid))))
            .map(|(k, _)| k.clone())
            .collect();
        for dependent in dependents {
            self.remove_with_dependents(&dependent);
        }
    }
}

/// The applier's fields replace the object's; status survives a main-resource apply and
/// only status changes through the status subresource.
fn server_side_apply(mut current: Value, applied: Value, on_status: bool) -> Value {
    if on_status {
        current["status"] = applied.get("status").cloned().unwrap_or(Value::Null);
        return current;
    }
    let status = current.get("status").cloned();
    let metadata = current["metadata"].clone();
    let mut result = applied;
    for (field, value) in metadata.as_object().cloned().unwrap_or_default() {
        if result["metadata"].get(&field).is_none() {
            result["metadata"][field] = value;
        }
    }
    if let Some(status) = status {
        result["status"] = status;
    }
    result
}

fn is_deleted_and_unblocked(object: &Value) -> bool {
    !object["metadata"]["deletionTimestamp"].is_null() && object["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty())
}

/// The apiserver reads an absent field as null when a JSON patch tests for null (kube's
/// finalizer helper relies on it); json-patch would fail the test on a missing path.
fn null_missing_test_paths(current: &mut Value, patch: &Value) {
    for op in patch.as_array().into_iter().flatten() {
        let (Some("test"), Some(path), Some(Value::Null)) = (op["op"].as_str(), op["path"].as_str(), op.get("value")) else { continue };
        if current.pointer(path).is_some() {
            continue;
        }
        if let Some((parent, key)) = path.rsplit_once('/') {
            if let Some(Value::Object(map)) = current.pointer_mut(parent) {
                map.insert(key.to_string(), Value::Null);
            }
        }
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in patch_map {
        if value.is_null() {
            if let Some(map) = target.as_object_mut() {
                map.remove(key);
            }
        } else {
            merge(&mut target[key], value);
        }
    }
}

fn matches_selector(object: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else { return true };
    selector.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => object["metadata"]["labels"][k].as_str() == Some(v),
        None => true,
    })
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match parts.first()? {
        &"api" => (parts[..2].join("/"), &parts[2..]),
        &"apis" => (parts[..3].join("/"), &parts[3..]),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    Some(Target {
        prefix,
        plural: rest.first()?.to_string(),
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn ok(code: u16, body: &Value) -> Response<Full<Bytes>> {
    respond(code, body)
}

fn status(code: u16, reason: &str, message: &str) -> Response<Full<Bytes>> {
    respond(code, &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}))
}

fn respond(code: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
    response
}
