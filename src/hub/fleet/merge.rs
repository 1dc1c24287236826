//! Merging the clusters' answers: pure functions over JSON, no I/O.
//!
//! Every item names its cluster: a list item or a Table row's object
//! carries the annotation [`CLUSTER_ANNOTATION`], and a Table gains a
//! `Cluster` column in front (kubectl prints it as `CLUSTER`).
//!
//! Not here: asking the clusters, framing the response, deciding which
//! failures are worth a warning.

use serde_json::{Value, json};

/// The annotation that names an item's cluster in the fleet view. It is
/// added by the hub to what it returns, never written to a cluster.
pub const CLUSTER_ANNOTATION: &str = "uplink.dev/cluster";

/// The column put in front of every merged Table.
pub fn cluster_column() -> Value {
    json!({
        "name": "Cluster",
        "type": "string",
        "format": "",
        "description": "The uplink cluster that answered.",
        "priority": 0,
    })
}

/// What one cluster answered, taken apart for merging.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// A `Table` (meta.k8s.io/v1): its column definitions and rows.
    Table { columns: Vec<Value>, rows: Vec<Value> },
    /// A list (`items`), each item annotated with its cluster.
    Items(Vec<Value>),
    /// One object (a get by name), annotated with its cluster.
    Object(Value),
}

/// Why an answer could not be merged.
#[derive(Debug, PartialEq, Eq)]
pub enum MergeError {
    /// The body is not JSON.
    NotJson(String),
    /// JSON, but not a Kubernetes object (no `kind`, not an object).
    NotAnObject,
}

impl std::fmt::Display for MergeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MergeError::NotJson(e) => write!(f, "the answer is not JSON ({e})"),
            MergeError::NotAnObject => f.write_str("the answer is not a Kubernetes object"),
        }
    }
}

/// Parses a 2xx answer of `cluster` and marks everything in it as that
/// cluster's.
pub fn parse(cluster: &str, body: &[u8]) -> Result<Parsed, MergeError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| MergeError::NotJson(e.to_string()))?;
    let Value::Object(mut map) = v else { return Err(MergeError::NotAnObject) };
    if map.get("kind").and_then(Value::as_str) == Some("Table") {
        let columns = match map.remove("columnDefinitions") {
            Some(Value::Array(c)) => c,
            _ => Vec::new(),
        };
        let rows = match map.remove("rows") {
            Some(Value::Array(r)) => r.into_iter().map(|r| row_with_cluster(r, cluster)).collect(),
            _ => Vec::new(),
        };
        return Ok(Parsed::Table { columns, rows });
    }
    if let Some(Value::Array(items)) = map.remove("items") {
        return Ok(Parsed::Items(
            items.into_iter().filter_map(|mut i| annotated(&mut i, cluster).then_some(i)).collect(),
        ));
    }
    if !map.contains_key("kind") {
        return Err(MergeError::NotAnObject);
    }
    let mut obj = Value::Object(map);
    annotated(&mut obj, cluster);
    Ok(Parsed::Object(obj))
}

/// Adds the cluster annotation to an object's metadata; false when `obj`
/// is not an object (such an item is dropped).
fn annotated(obj: &mut Value, cluster: &str) -> bool {
    let Some(map) = obj.as_object_mut() else { return false };
    let meta = map.entry("metadata").or_insert_with(|| json!({}));
    let Some(meta) = meta.as_object_mut() else { return false };
    let ann = meta.entry("annotations").or_insert_with(|| json!({}));
    if !ann.is_object() {
        *ann = json!({});
    }
    ann[CLUSTER_ANNOTATION] = json!(cluster);
    true
}

/// A Table row with the cluster's name as its first cell, and its object
/// (when the client asked for one) annotated.
fn row_with_cluster(mut row: Value, cluster: &str) -> Value {
    if let Some(cells) = row.get_mut("cells").and_then(Value::as_array_mut) {
        cells.insert(0, json!(cluster));
    } else {
        row["cells"] = json!([cluster]);
    }
    if let Some(obj) = row.get_mut("object") {
        annotated(obj, cluster);
    }
    row
}

/// Fits a row (cluster cell first) to the merged Table's `width` columns:
/// clusters of different versions may print a column more or less, and
/// kubectl refuses a row whose cells do not match the columns.
pub fn fit_row(row: &mut Value, width: usize) {
    if let Some(cells) = row.get_mut("cells").and_then(Value::as_array_mut) {
        cells.resize(width, json!(""));
    }
}

/// The head of a merged Table, up to the opening bracket of `rows`.
pub fn table_head(columns: &[Value]) -> Vec<u8> {
    let mut all = Vec::with_capacity(columns.len() + 1);
    all.push(cluster_column());
    all.extend(columns.iter().cloned());
    let mut out =
        br#"{"kind":"Table","apiVersion":"meta.k8s.io/v1","metadata":{"resourceVersion":""},"columnDefinitions":"#
            .to_vec();
    out.extend_from_slice(&serde_json::to_vec(&all).unwrap_or_else(|_| b"[]".to_vec()));
    out.extend_from_slice(br#","rows":["#);
    out
}

/// The head of a merged `List`, up to the opening bracket of `items`.
pub fn list_head() -> Vec<u8> {
    br#"{"kind":"List","apiVersion":"v1","metadata":{"resourceVersion":""},"items":["#.to_vec()
}

/// What closes a Table or List begun with [`table_head`] or [`list_head`].
pub const TAIL: &[u8] = b"]}\n";

/// The message of a `Status` failure body, if it is one.
pub fn status_message(body: &[u8]) -> Option<(String, String)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let message = v.get("message")?.as_str()?.to_string();
    let reason = v.get("reason").and_then(Value::as_str).unwrap_or("").to_string();
    Some((reason, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_gain_a_cluster_cell_and_annotated_objects() {
        let body = json!({
            "kind": "Table", "apiVersion": "meta.k8s.io/v1",
            "columnDefinitions": [{"name": "Name"}, {"name": "Status"}],
            "rows": [{"cells": ["n1", "Ready"], "object": {"kind": "PartialObjectMetadata", "metadata": {"name": "n1"}}}],
        });
        let Parsed::Table { columns, rows } = parse("edge-1", &serde_json::to_vec(&body).unwrap()).unwrap() else {
            panic!("not a table")
        };
        assert_eq!(columns.len(), 2);
        assert_eq!(rows[0]["cells"], json!(["edge-1", "n1", "Ready"]));
        assert_eq!(rows[0]["object"]["metadata"]["annotations"][CLUSTER_ANNOTATION], "edge-1");
        let mut head = table_head(&columns);
        head.extend_from_slice(&serde_json::to_vec(&rows[0]).unwrap());
        head.extend_from_slice(TAIL);
        let merged: Value = serde_json::from_slice(&head).unwrap();
        assert_eq!(merged["columnDefinitions"][0]["name"], "Cluster");
        assert_eq!(merged["columnDefinitions"].as_array().unwrap().len(), 3);
        assert_eq!(merged["rows"][0]["cells"][0], "edge-1");
    }

    #[test]
    fn list_items_and_objects_are_annotated_keeping_their_own_annotations() {
        let body = br#"{"kind":"PodList","items":[{"metadata":{"name":"a","annotations":{"x":"1"}}},{"metadata":{"name":"b"}},7]}"#;
        let Parsed::Items(items) = parse("edge-2", body).unwrap() else { panic!() };
        assert_eq!(items.len(), 2, "a non-object item is dropped");
        assert_eq!(items[0]["metadata"]["annotations"], json!({"x": "1", CLUSTER_ANNOTATION: "edge-2"}));
        assert_eq!(items[1]["metadata"]["annotations"][CLUSTER_ANNOTATION], "edge-2");
        let Parsed::Object(o) = parse("edge-3", br#"{"kind":"Pod","metadata":{"name":"a"}}"#).unwrap() else {
            panic!()
        };
        assert_eq!(o["metadata"]["annotations"][CLUSTER_ANNOTATION], "edge-3");
        assert!(matches!(parse("e", b"<html>"), Err(MergeError::NotJson(_))));
        assert_eq!(parse("e", b"[1]"), Err(MergeError::NotAnObject));
        assert_eq!(parse("e", br#"{"a":1}"#), Err(MergeError::NotAnObject));
    }

    #[test]
    fn rows_fit_the_merged_width() {
        let mut short = json!({"cells": ["edge-1", "n1"]});
        fit_row(&mut short, 4);
        assert_eq!(short["cells"], json!(["edge-1", "n1", "", ""]));
        let mut long = json!({"cells": ["edge-1", "n1", "a", "b", "c"]});
        fit_row(&mut long, 3);
        assert_eq!(long["cells"], json!(["edge-1", "n1", "a"]));
    }
}
