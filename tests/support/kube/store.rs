//! The in-memory object store: objects keyed by resource, namespace and
//! name, one monotonically increasing `resourceVersion`, and a log of
//! watch events; plus label and field selectors.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::discovery::ResDef;
use super::time;

/// `(resource id "group/plural", namespace, name)`; namespace is empty for
/// cluster-scoped objects.
pub type Key = (String, String, String);

pub fn res_id(r: &ResDef) -> String {
    format!("{}/{}", r.group, r.plural)
}

/// One recorded change, as a watch sends it.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    pub key: Key,
    pub kind: &'static str,
    pub object: Value,
}

#[derive(Default)]
pub struct Store {
    pub rv: u64,
    pub objects: BTreeMap<Key, Value>,
    pub events: Vec<Event>,
    uid: u64,
}

/// A store failure, mapped to a `Status` by the handlers.
#[derive(Debug)]
pub enum StoreError {
    NotFound,
    AlreadyExists,
    Conflict,
    Invalid(String),
}

/// A Secret's write-only `stringData` merges into `data` (base64), as the
/// API server does; it is never stored.
fn merge_string_data(kind: &str, obj: &mut Value) {
    use base64::Engine;
    if kind != "Secret" {
        return;
    }
    let Some(Value::Object(sd)) = obj.as_object_mut().and_then(|o| o.remove("stringData")) else { return };
    if !obj["data"].is_object() {
        obj["data"] = json!({});
    }
    for (k, v) in sd {
        obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or("")));
    }
}

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn stamp(&mut self, obj: &mut Value, rv: u64) {
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    }

    /// Creates `obj` (its metadata must carry the name; namespace is set
    /// from `ns`).
    pub fn create(&mut self, r: &ResDef, ns: &str, mut obj: Value) -> Result<Value, StoreError> {
        if !obj.is_object() {
            return Err(StoreError::Invalid("body must be an object".into()));
        }
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let mut name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        if name.is_empty() {
            if let Some(g) = obj["metadata"]["generateName"].as_str() {
                self.uid += 1;
                name = format!("{g}{}", suffix(self.uid));
                obj["metadata"]["name"] = json!(name);
            } else {
                return Err(StoreError::Invalid("name or generateName is required".into()));
            }
        }
        merge_string_data(r.kind, &mut obj);
        let key = (res_id(r), if r.namespaced { ns.to_string() } else { String::new() }, name.clone());
        if self.objects.contains_key(&key) {
            return Err(StoreError::AlreadyExists);
        }
        self.uid += 1;
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(r.kind);
        if r.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        obj["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uid));
        if !obj["metadata"]["creationTimestamp"].is_string() {
            obj["metadata"]["creationTimestamp"] = json!(time::rfc3339_now());
        }
        let rv = self.next_rv();
        self.stamp(&mut obj, rv);
        self.objects.insert(key.clone(), obj.clone());
        self.events.push(Event { rv, key, kind: "ADDED", object: obj.clone() });
        Ok(obj)
    }

    pub fn get(&self, r: &ResDef, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(res_id(r), if r.namespaced { ns.to_string() } else { String::new() }, name.to_string()))
    }

    /// Replaces an object; a `resourceVersion` in `obj` must match.
    pub fn update(&mut self, r: &ResDef, ns: &str, name: &str, mut obj: Value) -> Result<Value, StoreError> {
        let key = (res_id(r), if r.namespaced { ns.to_string() } else { String::new() }, name.to_string());
        let old = self.objects.get(&key).ok_or(StoreError::NotFound)?;
        if !obj.is_object() {
            return Err(StoreError::Invalid("body must be an object".into()));
        }
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if let Some(want) = obj["metadata"]["resourceVersion"].as_str() {
            if !want.is_empty() && Some(want) != old["metadata"]["resourceVersion"].as_str() {
                return Err(StoreError::Conflict);
            }
        }
        match obj["metadata"]["name"].as_str() {
            Some(n) if n != name => {
                return Err(StoreError::Invalid(format!(
                    "metadata.name: Invalid value: {n:?}: the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => obj["metadata"]["name"] = json!(name),
        }
        for k in ["uid", "creationTimestamp"] {
            obj["metadata"][k] = old["metadata"][k].clone();
        }
        merge_string_data(r.kind, &mut obj);
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(r.kind);
        if r.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        }
        let rv = self.next_rv();
        self.stamp(&mut obj, rv);
        self.objects.insert(key.clone(), obj.clone());
        self.events.push(Event { rv, key, kind: "MODIFIED", object: obj.clone() });
        Ok(obj)
    }

    pub fn delete(&mut self, r: &ResDef, ns: &str, name: &str) -> Result<Value, StoreError> {
        let key = (res_id(r), if r.namespaced { ns.to_string() } else { String::new() }, name.to_string());
        let mut obj = self.objects.remove(&key).ok_or(StoreError::NotFound)?;
        let rv = self.next_rv();
        self.stamp(&mut obj, rv);
        self.events.push(Event { rv, key, kind: "DELETED", object: obj.clone() });
        Ok(obj)
    }

    /// Objects of `r` in `ns` (all namespaces when empty), in key order.
    pub fn list(&self, r: &ResDef, ns: &str) -> Vec<Value> {
        let id = res_id(r);
        self.objects
            .iter()
            .filter(|((rid, ons, _), _)| *rid == id && (ns.is_empty() || ons == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

fn suffix(n: u64) -> String {
    let alphabet = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = n.wrapping_mul(2_654_435_761) ^ 0x5bd1e995;
    (0..5)
        .map(|_| {
            let c = alphabet[(x % alphabet.len() as u64) as usize] as char;
            x /= alphabet.len() as u64;
            c
        })
        .collect()
}

// ---- Selectors ------------------------------------------------------------

#[derive(Debug, Clone)]
pub enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && k.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c)
            }
            ')' => {
                depth -= 1;
                cur.push(c)
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Parses a label selector as `labels.Parse` does (the common subset).
pub fn parse_labels(s: &str) -> Result<Vec<LabelReq>, String> {
    let mut out = Vec::new();
    if s.trim().is_empty() {
        return Ok(out);
    }
    for term in split_top(s) {
        let t = term.trim();
        let bad = |why: &str| Err(format!("unable to parse requirement: {why}"));
        if t.is_empty() {
            return bad("found '', expected: identifier");
        }
        let req = if let Some(k) = t.strip_prefix('!') {
            let k = k.trim();
            if !valid_key(k) {
                return bad(&format!("invalid label key {k:?}"));
            }
            LabelReq::NotExists(k.into())
        } else if let Some((k, v)) = t.split_once("!=") {
            LabelReq::NotEq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = t.split_once("==") {
            LabelReq::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = t.split_once('=') {
            LabelReq::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, rest)) = split_word(t, " notin ") {
            LabelReq::NotIn(k, parse_set(&rest)?)
        } else if let Some((k, rest)) = split_word(t, " in ") {
            LabelReq::In(k, parse_set(&rest)?)
        } else if valid_key(t) {
            LabelReq::Exists(t.into())
        } else {
            return bad(&format!("found '{t}', expected: !, identifier, or 'end of string'"));
        };
        let (k, vs): (&str, Vec<&String>) = match &req {
            LabelReq::Eq(k, v) | LabelReq::NotEq(k, v) => (k, vec![v]),
            LabelReq::In(k, v) | LabelReq::NotIn(k, v) => (k, v.iter().collect()),
            LabelReq::Exists(k) | LabelReq::NotExists(k) => (k, vec![]),
        };
        if !valid_key(k) {
            return bad(&format!("invalid label key {k:?}: name part must consist of alphanumeric characters"));
        }
        if let Some(v) = vs.iter().find(|v| !valid_value(v)) {
            return bad(&format!(
                "invalid label value: {v:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.'"
            ));
        }
        out.push(req);
    }
    Ok(out)
}

fn split_word(t: &str, word: &str) -> Option<(String, String)> {
    t.find(word).map(|i| (t[..i].trim().to_string(), t[i + word.len()..].trim().to_string()))
}

fn parse_set(s: &str) -> Result<Vec<String>, String> {
    let inner = s
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: found '{s}', expected: '('"))?;
    Ok(inner.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect())
}

pub fn labels_match(reqs: &[LabelReq], obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    reqs.iter().all(|r| match r {
        LabelReq::Eq(k, v) => get(k) == Some(v),
        LabelReq::NotEq(k, v) => get(k) != Some(v),
        LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
        LabelReq::Exists(k) => get(k).is_some(),
        LabelReq::NotExists(k) => get(k).is_none(),
    })
}

/// `(field path, value, equal?)`
pub type FieldReq = (String, String, bool);

/// The field selectors each resource supports (as its registry strategy).
fn field_pointer(r: &ResDef, field: &str) -> Option<&'static str> {
    match (r.plural, field) {
        (_, "metadata.name") => Some("/metadata/name"),
        (_, "metadata.namespace") if r.namespaced => Some("/metadata/namespace"),
        ("pods", "status.phase") => Some("/status/phase"),
        ("pods", "spec.nodeName") => Some("/spec/nodeName"),
        ("pods", "spec.restartPolicy") => Some("/spec/restartPolicy"),
        ("pods", "spec.serviceAccountName") => Some("/spec/serviceAccountName"),
        ("pods", "status.podIP") => Some("/status/podIP"),
        ("namespaces", "status.phase") => Some("/status/phase"),
        ("nodes", "spec.unschedulable") => Some("/spec/unschedulable"),
        ("secrets", "type") => Some("/type"),
        ("events", "involvedObject.name") => Some("/involvedObject/name"),
        ("events", "involvedObject.kind") => Some("/involvedObject/kind"),
        ("events", "reason") => Some("/reason"),
        ("events", "type") => Some("/type"),
        _ => None,
    }
}

pub fn parse_fields(r: &ResDef, s: &str) -> Result<Vec<FieldReq>, String> {
    let mut out = Vec::new();
    if s.trim().is_empty() {
        return Ok(out);
    }
    for term in s.split(',') {
        let (k, v, eq) = if let Some((k, v)) = term.split_once("!=") {
            (k, v, false)
        } else if let Some((k, v)) = term.split_once("==") {
            (k, v, true)
        } else if let Some((k, v)) = term.split_once('=') {
            (k, v, true)
        } else {
            return Err(format!("invalid selector: '{s}'; can't understand '{term}'"));
        };
        let k = k.trim();
        if field_pointer(r, k).is_none() {
            return Err(format!("field label not supported: {k}"));
        }
        out.push((k.to_string(), v.trim().to_string(), eq));
    }
    Ok(out)
}

pub fn fields_match(r: &ResDef, reqs: &[FieldReq], obj: &Value) -> bool {
    reqs.iter().all(|(k, v, eq)| {
        let actual = field_pointer(r, k)
            .and_then(|p| obj.pointer(p))
            .map(|x| match x {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                o => o.to_string(),
            })
            .unwrap_or_default();
        (actual == *v) == *eq
    })
}

// ---- Patches ----------------------------------------------------------------

/// RFC 7386 JSON merge patch (strategic merge patches are treated the same).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if k.starts_with("$") {
                    continue;
                }
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// RFC 6902 JSON patch: add, remove, replace, test (move/copy too).
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("json patch must be an array")?;
    for op in ops {
        let path = op["path"].as_str().ok_or("missing path")?;
        match op["op"].as_str().unwrap_or("") {
            "add" | "replace" => pointer_set(target, path, op["value"].clone(), op["op"] == "add")?,
            "remove" => {
                pointer_remove(target, path)?;
            }
            "test" => {
                if target.pointer(path) != Some(&op["value"]) {
                    return Err(format!("testing value {path} failed"));
                }
            }
            "move" | "copy" => {
                let from = op["from"].as_str().ok_or("missing from")?;
                let v = if op["op"] == "move" {
                    pointer_remove(target, from)?
                } else {
                    target.pointer(from).cloned().ok_or("missing from value")?
                };
                pointer_set(target, path, v, true)?;
            }
            other => return Err(format!("unexpected op {other:?}")),
        }
    }
    Ok(())
}

fn split_ptr(path: &str) -> Result<(String, String), String> {
    let i = path.rfind('/').ok_or_else(|| format!("bad path {path:?}"))?;
    let last = path[i + 1..].replace("~1", "/").replace("~0", "~");
    Ok((path[..i].to_string(), last))
}

fn pointer_set(target: &mut Value, path: &str, v: Value, add: bool) -> Result<(), String> {
    let (parent, last) = split_ptr(path)?;
    let p = target.pointer_mut(&parent).ok_or_else(|| format!("missing path {parent:?}"))?;
    match p {
        Value::Object(m) => {
            if !add && !m.contains_key(&last) {
                return Err(format!("replace operation does not apply: doc is missing key: {path}"));
            }
            m.insert(last, v);
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(v);
            } else {
                let i: usize = last.parse().map_err(|_| format!("bad index {last}"))?;
                if add && i <= a.len() {
                    a.insert(i, v);
                } else if !add && i < a.len() {
                    a[i] = v;
                } else {
                    return Err(format!("index out of range: {i}"));
                }
            }
        }
        _ => return Err(format!("cannot set {path}")),
    }
    Ok(())
}

fn pointer_remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_ptr(path)?;
    let p = target.pointer_mut(&parent).ok_or_else(|| format!("missing path {parent:?}"))?;
    match p {
        Value::Object(m) => m.remove(&last).ok_or_else(|| format!("missing key {path}")),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| format!("bad index {last}"))?;
            if i < a.len() { Ok(a.remove(i)) } else { Err(format!("index out of range: {i}")) }
        }
        _ => Err(format!("cannot remove {path}")),
    }
}
