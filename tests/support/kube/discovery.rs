//! The resources the stand-in serves, their discovery documents
//! (`/api`, `/apis`, `/api/v1`, `/apis/GROUP/VERSION`) and their `Table`
//! columns as kubectl prints them.
//!
//! Only the legacy (non-aggregated) discovery is served: kubectl asks for
//! aggregated discovery first and falls back when the answer is a plain
//! `APIVersions` / `APIGroupList`, which is what a pre-1.26 server does.

use serde_json::{Value, json};

use super::time;

/// One served resource.
pub struct ResDef {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short: &'static [&'static str],
    pub verbs: &'static [&'static str],
    /// `(name, kind, verbs)` of each subresource.
    pub subresources: &'static [(&'static str, &'static str, &'static [&'static str])],
    pub categories: &'static [&'static str],
}

impl ResDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }
    /// The name kube uses in messages: `pods`, `deployments.apps`.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.to_string() } else { format!("{}.{}", self.plural, self.group) }
    }
    pub fn is_review(&self) -> bool {
        self.verbs == CREATE_ONLY
    }
    pub fn has_sub(&self, sub: &str) -> bool {
        self.subresources.iter().any(|(n, _, _)| *n == sub)
    }
}

const ALL: &[&str] = &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];
const CREATE_ONLY: &[&str] = &["create"];
const GET_PATCH_UPDATE: &[&str] = &["get", "patch", "update"];
const STATUS: (&str, &str, &[&str]) = ("status", "", GET_PATCH_UPDATE);

macro_rules! res {
    ($g:expr, $p:expr, $s:expr, $k:expr, $ns:expr, $short:expr, $verbs:expr, $subs:expr, $cat:expr) => {
        ResDef {
            group: $g,
            version: "v1",
            plural: $p,
            singular: $s,
            kind: $k,
            namespaced: $ns,
            short: $short,
            verbs: $verbs,
            subresources: $subs,
            categories: $cat,
        }
    };
}

pub static RESOURCES: &[ResDef] = &[
    res!("", "namespaces", "namespace", "Namespace", false, &["ns"], ALL, &[STATUS], &[]),
    res!("", "nodes", "node", "Node", false, &["no"], ALL, &[STATUS], &[]),
    res!(
        "",
        "pods",
        "pod",
        "Pod",
        true,
        &["po"],
        ALL,
        &[
            ("attach", "PodAttachOptions", &["create", "get"]),
            ("exec", "PodExecOptions", &["create", "get"]),
            ("log", "Pod", &["get"]),
            ("portforward", "PodPortForwardOptions", &["create", "get"]),
            STATUS
        ],
        &["all"]
    ),
    res!("", "services", "service", "Service", true, &["svc"], ALL, &[STATUS], &["all"]),
    res!("", "configmaps", "configmap", "ConfigMap", true, &["cm"], ALL, &[], &[]),
    res!("", "secrets", "secret", "Secret", true, &[], ALL, &[], &[]),
    res!(
        "",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        true,
        &["sa"],
        ALL,
        &[("token", "TokenRequest", CREATE_ONLY)],
        &[]
    ),
    res!("", "events", "event", "Event", true, &["ev"], ALL, &[], &[]),
    res!(
        "apps",
        "deployments",
        "deployment",
        "Deployment",
        true,
        &["deploy"],
        ALL,
        &[("scale", "Scale", GET_PATCH_UPDATE), STATUS],
        &["all"]
    ),
    res!(
        "apps",
        "replicasets",
        "replicaset",
        "ReplicaSet",
        true,
        &["rs"],
        ALL,
        &[("scale", "Scale", GET_PATCH_UPDATE), STATUS],
        &["all"]
    ),
    res!("apps", "daemonsets", "daemonset", "DaemonSet", true, &["ds"], ALL, &[STATUS], &["all"]),
    res!(
        "apps",
        "statefulsets",
        "statefulset",
        "StatefulSet",
        true,
        &["sts"],
        ALL,
        &[("scale", "Scale", GET_PATCH_UPDATE), STATUS],
        &["all"]
    ),
    res!("batch", "jobs", "job", "Job", true, &[], ALL, &[STATUS], &["all"]),
    res!("batch", "cronjobs", "cronjob", "CronJob", true, &["cj"], ALL, &[STATUS], &["all"]),
    res!("rbac.authorization.k8s.io", "roles", "role", "Role", true, &[], ALL, &[], &[]),
    res!("rbac.authorization.k8s.io", "rolebindings", "rolebinding", "RoleBinding", true, &[], ALL, &[], &[]),
    res!("rbac.authorization.k8s.io", "clusterroles", "clusterrole", "ClusterRole", false, &[], ALL, &[], &[]),
    res!(
        "rbac.authorization.k8s.io",
        "clusterrolebindings",
        "clusterrolebinding",
        "ClusterRoleBinding",
        false,
        &[],
        ALL,
        &[],
        &[]
    ),
    res!(
        "authorization.k8s.io",
        "selfsubjectaccessreviews",
        "selfsubjectaccessreview",
        "SelfSubjectAccessReview",
        false,
        &[],
        CREATE_ONLY,
        &[],
        &[]
    ),
    res!(
        "authorization.k8s.io",
        "selfsubjectrulesreviews",
        "selfsubjectrulesreview",
        "SelfSubjectRulesReview",
        false,
        &[],
        CREATE_ONLY,
        &[],
        &[]
    ),
    res!(
        "authorization.k8s.io",
        "subjectaccessreviews",
        "subjectaccessreview",
        "SubjectAccessReview",
        false,
        &[],
        CREATE_ONLY,
        &[],
        &[]
    ),
    res!(
        "authentication.k8s.io",
        "selfsubjectreviews",
        "selfsubjectreview",
        "SelfSubjectReview",
        false,
        &[],
        CREATE_ONLY,
        &[],
        &[]
    ),
];

/// The groups in the order `/apis` lists them.
pub const GROUPS: &[&str] =
    &["apps", "batch", "rbac.authorization.k8s.io", "authorization.k8s.io", "authentication.k8s.io"];

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResDef> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}

pub fn find_kind(api_version: &str, kind: &str) -> Option<&'static ResDef> {
    RESOURCES.iter().find(|r| r.api_version() == api_version && r.kind == kind)
}

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.3",
        "gitCommit": "32cc146f75aad04beaaa245a7157eb35063a9f99",
        "gitTreeState": "clean",
        "buildDate": "2025-03-11T19:52:21Z",
        "goVersion": "go1.23.6",
        "compiler": "gc",
        "platform": "linux/arm64"
    })
}

pub fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]
    })
}

pub fn api_group_list() -> Value {
    let groups: Vec<Value> = GROUPS
        .iter()
        .map(|g| {
            let gv = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(group: &str) -> Option<Value> {
    GROUPS.contains(&group).then(|| {
        let gv = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv.clone()], "preferredVersion": gv})
    })
}

pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    if version != "v1" || !(group.is_empty() || GROUPS.contains(&group)) {
        return None;
    }
    let mut out = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group) {
        let mut v = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": r.verbs,
        });
        if !r.short.is_empty() {
            v["shortNames"] = json!(r.short);
        }
        if !r.categories.is_empty() {
            v["categories"] = json!(r.categories);
        }
        out.push(v);
        for (sub, kind, verbs) in r.subresources {
            let kind = if kind.is_empty() { r.kind } else { kind };
            let mut v = json!({
                "name": format!("{}/{sub}", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": kind,
                "verbs": verbs,
            });
            if *sub == "scale" {
                v["group"] = json!("autoscaling");
                v["version"] = json!("v1");
            }
            out.push(v);
        }
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}))
}

// ---- Tables -------------------------------------------------------------

fn col(name: &str, ty: &str, priority: u32) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": name, "priority": priority})
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn containers(o: &Value) -> (String, String) {
    let cs = o.pointer("/spec/template/spec/containers").and_then(Value::as_array).cloned().unwrap_or_default();
    let names: Vec<String> = cs.iter().map(|c| s(&c["name"])).collect();
    let images: Vec<String> = cs.iter().map(|c| s(&c["image"])).collect();
    (names.join(","), images.join(","))
}

fn selector(o: &Value) -> String {
    let m = o.pointer("/spec/selector/matchLabels").and_then(Value::as_object).cloned().unwrap_or_default();
    m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(",")
}

/// The column definitions of a resource's table.
pub fn columns(r: &ResDef) -> Vec<Value> {
    let (i, st, d) = ("integer", "string", "date");
    match r.plural {
        "pods" => vec![
            col("Name", st, 0),
            col("Ready", st, 0),
            col("Status", st, 0),
            col("Restarts", st, 0),
            col("Age", st, 0),
            col("IP", st, 1),
            col("Node", st, 1),
            col("Nominated Node", st, 1),
            col("Readiness Gates", st, 1),
        ],
        "nodes" => vec![
            col("Name", st, 0),
            col("Status", st, 0),
            col("Roles", st, 0),
            col("Age", st, 0),
            col("Version", st, 0),
            col("Internal-IP", st, 1),
            col("External-IP", st, 1),
            col("OS-Image", st, 1),
            col("Kernel-Version", st, 1),
            col("Container-Runtime", st, 1),
        ],
        "namespaces" => vec![col("Name", st, 0), col("Status", st, 0), col("Age", st, 0)],
        "deployments" => vec![
            col("Name", st, 0),
            col("Ready", st, 0),
            col("Up-to-date", i, 0),
            col("Available", i, 0),
            col("Age", st, 0),
            col("Containers", st, 1),
            col("Images", st, 1),
            col("Selector", st, 1),
        ],
        "replicasets" => vec![
            col("Name", st, 0),
            col("Desired", i, 0),
            col("Current", i, 0),
            col("Ready", i, 0),
            col("Age", st, 0),
            col("Containers", st, 1),
            col("Images", st, 1),
            col("Selector", st, 1),
        ],
        "daemonsets" => vec![
            col("Name", st, 0),
            col("Desired", i, 0),
            col("Current", i, 0),
            col("Ready", i, 0),
            col("Up-to-date", i, 0),
            col("Available", i, 0),
            col("Node Selector", st, 0),
            col("Age", st, 0),
            col("Containers", st, 1),
            col("Images", st, 1),
            col("Selector", st, 1),
        ],
        "statefulsets" => vec![
            col("Name", st, 0),
            col("Ready", st, 0),
            col("Age", st, 0),
            col("Containers", st, 1),
            col("Images", st, 1),
        ],
        "jobs" => vec![
            col("Name", st, 0),
            col("Status", st, 0),
            col("Completions", st, 0),
            col("Duration", st, 0),
            col("Age", st, 0),
            col("Containers", st, 1),
            col("Images", st, 1),
            col("Selector", st, 1),
        ],
        _ => vec![col("Name", st, 0), col("Created At", d, 0)],
    }
}

/// One table row's cells.
pub fn cells(r: &ResDef, o: &Value) -> Vec<Value> {
    let name = s(&o["metadata"]["name"]);
    let created = o["metadata"]["creationTimestamp"].as_str();
    let age = time::age(created);
    match r.plural {
        "pods" => {
            let statuses =
                o.pointer("/status/containerStatuses").and_then(Value::as_array).cloned().unwrap_or_default();
            let total = o.pointer("/spec/containers").and_then(Value::as_array).map_or(0, Vec::len);
            let ready = statuses.iter().filter(|c| c["ready"] == json!(true)).count();
            let restarts: i64 = statuses.iter().map(|c| int(&c["restartCount"])).sum();
            let phase = s(&o["status"]["phase"]);
            let status = if o["metadata"]["deletionTimestamp"].is_string() {
                "Terminating".to_string()
            } else if phase == "Succeeded" {
                "Completed".to_string()
            } else {
                phase
            };
            let ip = o["status"]["podIP"].as_str().unwrap_or("<none>").to_string();
            let node = o["spec"]["nodeName"].as_str().unwrap_or("<none>").to_string();
            vec![
                json!(name),
                json!(format!("{ready}/{total}")),
                json!(status),
                json!(restarts.to_string()),
                json!(age),
                json!(ip),
                json!(node),
                json!("<none>"),
                json!("<none>"),
            ]
        }
        "nodes" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .is_some_and(|c| c["status"] == "True");
            let mut roles: Vec<String> = o["metadata"]["labels"]
                .as_object()
                .map(|m| {
                    m.keys().filter_map(|k| k.strip_prefix("node-role.kubernetes.io/")).map(str::to_string).collect()
                })
                .unwrap_or_default();
            roles.sort();
            let roles = if roles.is_empty() { "<none>".to_string() } else { roles.join(",") };
            let addr = |t: &str| {
                o.pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().find(|x| x["type"] == t))
                    .map_or("<none>".to_string(), |x| s(&x["address"]))
            };
            let info = &o["status"]["nodeInfo"];
            vec![
                json!(name),
                json!(if ready { "Ready" } else { "NotReady" }),
                json!(roles),
                json!(age),
                json!(s(&info["kubeletVersion"])),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                json!(s(&info["osImage"])),
                json!(s(&info["kernelVersion"])),
                json!(s(&info["containerRuntimeVersion"])),
            ]
        }
        "namespaces" => vec![json!(name), json!(o["status"]["phase"].as_str().unwrap_or("Active")), json!(age)],
        "deployments" => {
            let (c, im) = containers(o);
            let st = &o["status"];
            vec![
                json!(name),
                json!(format!("{}/{}", int(&st["readyReplicas"]), int(&o["spec"]["replicas"]))),
                json!(int(&st["updatedReplicas"])),
                json!(int(&st["availableReplicas"])),
                json!(age),
                json!(c),
                json!(im),
                json!(selector(o)),
            ]
        }
        "replicasets" => {
            let (c, im) = containers(o);
            let st = &o["status"];
            vec![
                json!(name),
                json!(int(&o["spec"]["replicas"])),
                json!(int(&st["replicas"])),
                json!(int(&st["readyReplicas"])),
                json!(age),
                json!(c),
                json!(im),
                json!(selector(o)),
            ]
        }
        "daemonsets" => {
            let (c, im) = containers(o);
            let st = &o["status"];
            let node_sel = o
                .pointer("/spec/template/spec/nodeSelector")
                .and_then(Value::as_object)
                .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(","))
                .filter(|x| !x.is_empty())
                .unwrap_or_else(|| "<none>".into());
            vec![
                json!(name),
                json!(int(&st["desiredNumberScheduled"])),
                json!(int(&st["currentNumberScheduled"])),
                json!(int(&st["numberReady"])),
                json!(int(&st["updatedNumberScheduled"])),
                json!(int(&st["numberAvailable"])),
                json!(node_sel),
                json!(age),
                json!(c),
                json!(im),
                json!(selector(o)),
            ]
        }
        "statefulsets" => {
            let (c, im) = containers(o);
            vec![
                json!(name),
                json!(format!("{}/{}", int(&o["status"]["readyReplicas"]), int(&o["spec"]["replicas"]))),
                json!(age),
                json!(c),
                json!(im),
            ]
        }
        "jobs" => {
            let (c, im) = containers(o);
            let succeeded = int(&o["status"]["succeeded"]);
            let completions = o["spec"]["completions"].as_i64().unwrap_or(1);
            let status = if succeeded >= completions { "Complete" } else { "Running" };
            let duration = match (
                o["status"]["startTime"].as_str().and_then(time::parse_rfc3339),
                o["status"]["completionTime"].as_str().and_then(time::parse_rfc3339),
            ) {
                (Some(a), Some(b)) => format!("{}s", (b - a).max(0)),
                (Some(a), None) => format!("{}s", (time::now_secs() - a).max(0)),
                _ => String::new(),
            };
            vec![
                json!(name),
                json!(status),
                json!(format!("{succeeded}/{completions}")),
                json!(duration),
                json!(age),
                json!(c),
                json!(im),
                json!(selector(o)),
            ]
        }
        _ => vec![json!(name), json!(created.unwrap_or(""))],
    }
}

/// Whether the `Accept` header asks for a `meta.k8s.io` Table.
pub fn wants_table(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').next().is_some_and(|first| first.contains("as=Table") && first.contains("g=meta.k8s.io"))
    })
}

/// A table of `objects`; `include` is the `includeObject` parameter.
pub fn table(r: &ResDef, objects: &[Value], rv: &str, cont: Option<&str>, include: Option<&str>, defs: bool) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let object = match include {
                Some("None") => Value::Null,
                Some("Object") => o.clone(),
                _ => json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"].clone(),
                }),
            };
            json!({"cells": cells(r, o), "object": object})
        })
        .collect();
    let mut meta = json!({"resourceVersion": rv});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": if defs { Value::Array(columns(r)) } else { json!([]) },
        "rows": rows,
    })
}
