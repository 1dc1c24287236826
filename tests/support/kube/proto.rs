//! Just enough Kubernetes protobuf to read the review kinds kubectl sends
//! as `application/vnd.kubernetes.protobuf` (`auth can-i`, `auth whoami`).
//!
//! The envelope is the magic `k8s\0` followed by a `runtime.Unknown`:
//! `typeMeta = 1 { apiVersion = 1, kind = 2 }`, `raw = 2` (the object's
//! own message), `contentEncoding = 3`, `contentType = 4`.
//! `SelfSubjectAccessReview { metadata = 1, spec = 2 { resourceAttributes
//! = 1 { namespace = 1, verb = 2, group = 3, version = 4, resource = 5,
//! subresource = 6, name = 7 }, nonResourceAttributes = 2 { path = 1, verb
//! = 2 } } }`.

use serde_json::{Map, Value, json};

/// Splits a message into `(field number, wire type, bytes or varint)`.
fn fields(mut b: &[u8]) -> Option<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (key, n) = varint(b)?;
        b = &b[n..];
        match key & 7 {
            0 => {
                let (v, n) = varint(b)?;
                b = &b[n..];
                out.push((key >> 3, v.to_le_bytes().to_vec()));
            }
            1 => {
                out.push((key >> 3, b.get(..8)?.to_vec()));
                b = &b[8..];
            }
            2 => {
                let (len, n) = varint(b)?;
                let len = usize::try_from(len).ok()?;
                let v = b.get(n..n.checked_add(len)?)?;
                out.push((key >> 3, v.to_vec()));
                b = &b[n + len..];
            }
            5 => {
                out.push((key >> 3, b.get(..4)?.to_vec()));
                b = &b[4..];
            }
            _ => return None,
        }
    }
    Some(out)
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, x) in b.iter().enumerate().take(10) {
        v |= u64::from(x & 0x7f) << (7 * i);
        if x & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn strings(msg: &[u8], names: &[(u64, &str)]) -> Option<Map<String, Value>> {
    let mut m = Map::new();
    for (f, v) in fields(msg)? {
        if let Some((_, name)) = names.iter().find(|(n, _)| *n == f) {
            m.insert(name.to_string(), json!(String::from_utf8_lossy(&v)));
        }
    }
    Some(m)
}

/// Decodes an enveloped review into its JSON form (`spec` only).
pub fn decode_review(body: &[u8]) -> Option<Value> {
    let unknown = body.strip_prefix(b"k8s\0")?;
    let raw = fields(unknown)?.into_iter().find(|(f, _)| *f == 2)?.1;
    let mut spec = Map::new();
    for (f, v) in fields(&raw)? {
        if f != 2 {
            continue;
        }
        for (sf, sv) in fields(&v)? {
            match sf {
                1 => {
                    let names = [
                        (1, "namespace"),
                        (2, "verb"),
                        (3, "group"),
                        (4, "version"),
                        (5, "resource"),
                        (6, "subresource"),
                        (7, "name"),
                    ];
                    spec.insert("resourceAttributes".into(), Value::Object(strings(&sv, &names)?));
                }
                2 => {
                    let names = [(1, "path"), (2, "verb")];
                    spec.insert("nonResourceAttributes".into(), Value::Object(strings(&sv, &names)?));
                }
                _ => {}
            }
        }
    }
    Some(json!({"metadata": {"creationTimestamp": null}, "spec": spec}))
}

fn string_map(entries: &[Vec<u8>], bytes_as_base64: bool) -> Option<Value> {
    use base64::Engine;
    let mut m = Map::new();
    for e in entries {
        let f = fields(e)?;
        let key = f.iter().find(|(n, _)| *n == 1).map(|(_, v)| String::from_utf8_lossy(v).into_owned())?;
        let val = f.iter().find(|(n, _)| *n == 2).map(|(_, v)| v.clone()).unwrap_or_default();
        let val = if bytes_as_base64 {
            base64::engine::general_purpose::STANDARD.encode(val)
        } else {
            String::from_utf8_lossy(&val).into_owned()
        };
        m.insert(key, json!(val));
    }
    Some(Value::Object(m))
}

fn object_meta(msg: &[u8]) -> Option<Value> {
    let f = fields(msg)?;
    let mut m = strings(msg, &[(1, "name"), (2, "generateName"), (3, "namespace")])?;
    for (num, key) in [(11, "labels"), (12, "annotations")] {
        let entries: Vec<Vec<u8>> = f.iter().filter(|(n, _)| *n == num).map(|(_, v)| v.clone()).collect();
        if !entries.is_empty() {
            m.insert(key.into(), string_map(&entries, false)?);
        }
    }
    Some(Value::Object(m))
}

/// Decodes an enveloped ConfigMap or Secret (what `kubectl create
/// configmap|secret` sends) into JSON; other kinds give `None`.
pub fn decode_object(body: &[u8]) -> Option<Value> {
    let unknown = fields(body.strip_prefix(b"k8s\0")?)?;
    let type_meta = unknown.iter().find(|(f, _)| *f == 1)?.1.clone();
    let tm = strings(&type_meta, &[(1, "apiVersion"), (2, "kind")])?;
    let raw = unknown.iter().find(|(f, _)| *f == 2)?.1.clone();
    let f = fields(&raw)?;
    let all = |n: u64| -> Vec<Vec<u8>> { f.iter().filter(|(x, _)| *x == n).map(|(_, v)| v.clone()).collect() };
    let mut obj = json!({"apiVersion": tm.get("apiVersion")?, "kind": tm.get("kind")?});
    obj["metadata"] = object_meta(all(1).first()?)?;
    match tm.get("kind")?.as_str()? {
        "ConfigMap" => {
            obj["data"] = string_map(&all(2), false)?;
            obj["binaryData"] = string_map(&all(3), true)?;
        }
        "Secret" => {
            obj["data"] = string_map(&all(2), true)?;
            if let Some(t) = all(3).first() {
                obj["type"] = json!(String::from_utf8_lossy(t));
            }
            let sd = string_map(&all(4), true)?;
            if let Some(m) = sd.as_object().filter(|m| !m.is_empty()) {
                // stringData merges into data, as the API server does.
                for (k, v) in m {
                    obj["data"][k] = v.clone();
                }
            }
        }
        _ => return None,
    }
    Some(obj)
}
