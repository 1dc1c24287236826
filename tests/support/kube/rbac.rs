//! Authentication identities and the RBAC authorizer, following
//! kube-apiserver's `rbac` plugin: bindings grant the rules of their role;
//! a request is allowed when any rule of any role bound to the user (or
//! one of their groups) covers it. `system:masters` is always allowed, as
//! the real server's privileged group is.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::discovery;
use super::store::Store;

/// Who a request runs as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    pub fn new(name: &str, groups: &[&str]) -> Self {
        UserInfo { name: name.into(), groups: groups.iter().map(|g| g.to_string()).collect(), ..Default::default() }
    }
}

/// The authorizer's view of one request (`authorizer.Attributes`).
#[derive(Clone, Debug, Default)]
pub struct Attrs {
    pub verb: String,
    pub resource_request: bool,
    pub namespace: String,
    pub api_group: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
    pub path: String,
}

fn strings(v: &Value) -> Vec<&str> {
    // Entries that are not strings (an empty `-` in YAML) never match.
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

fn rule_allows(rule: &Value, a: &Attrs) -> bool {
    let verbs = strings(&rule["verbs"]);
    if !verbs.iter().any(|v| *v == "*" || *v == a.verb) {
        return false;
    }
    if !a.resource_request {
        return strings(&rule["nonResourceURLs"]).iter().any(|u| {
            *u == "*" || *u == a.path || u.strip_suffix('*').is_some_and(|prefix| a.path.starts_with(prefix))
        });
    }
    if !strings(&rule["apiGroups"]).iter().any(|g| *g == "*" || *g == a.api_group) {
        return false;
    }
    let combined =
        if a.subresource.is_empty() { a.resource.clone() } else { format!("{}/{}", a.resource, a.subresource) };
    let resource_ok = strings(&rule["resources"])
        .iter()
        .any(|r| *r == "*" || *r == combined || (!a.subresource.is_empty() && *r == format!("*/{}", a.subresource)));
    if !resource_ok {
        return false;
    }
    let names = strings(&rule["resourceNames"]);
    names.is_empty() || names.contains(&a.name.as_str())
}

fn subject_matches(s: &Value, user: &UserInfo, binding_ns: &str) -> bool {
    let name = s["name"].as_str().unwrap_or("");
    match s["kind"].as_str().unwrap_or("") {
        "User" => name == user.name,
        "Group" => user.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let ns = s["namespace"].as_str().filter(|n| !n.is_empty()).unwrap_or(binding_ns);
            user.name == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

fn role_rules(store: &Store, role_ref: &Value, binding_ns: &str) -> Vec<Value> {
    let name = role_ref["name"].as_str().unwrap_or("");
    let role = match role_ref["kind"].as_str() {
        Some("ClusterRole") => {
            discovery::find("rbac.authorization.k8s.io", "v1", "clusterroles").and_then(|r| store.get(r, "", name))
        }
        Some("Role") => {
            discovery::find("rbac.authorization.k8s.io", "v1", "roles").and_then(|r| store.get(r, binding_ns, name))
        }
        _ => None,
    };
    role.and_then(|r| r["rules"].as_array().cloned()).unwrap_or_default()
}

/// Every rule that applies to `user` in namespace `ns` ("" = cluster scope).
pub fn rules_for(store: &Store, user: &UserInfo, ns: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let crb = discovery::find("rbac.authorization.k8s.io", "v1", "clusterrolebindings").expect("crb");
    for b in store.list(crb, "") {
        if strings_obj(&b["subjects"]).iter().any(|s| subject_matches(s, user, "")) {
            out.extend(role_rules(store, &b["roleRef"], ""));
        }
    }
    if !ns.is_empty() {
        let rb = discovery::find("rbac.authorization.k8s.io", "v1", "rolebindings").expect("rb");
        for b in store.list(rb, ns) {
            if strings_obj(&b["subjects"]).iter().any(|s| subject_matches(s, user, ns)) {
                out.extend(role_rules(store, &b["roleRef"], ns));
            }
        }
    }
    out
}

fn strings_obj(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// The RBAC decision for `user` doing `a`.
pub fn authorize(store: &Store, user: &UserInfo, a: &Attrs) -> bool {
    if user.groups.iter().any(|g| g == "system:masters") {
        return true;
    }
    let ns = if a.resource_request { a.namespace.as_str() } else { "" };
    rules_for(store, user, ns).iter().any(|r| rule_allows(r, a))
}

/// The message kube-apiserver writes for a denied request
/// (`forbiddenMessage` in `endpoints/handlers/responsewriters`).
pub fn forbidden_message(user: &str, a: &Attrs) -> String {
    if !a.resource_request {
        return format!("User {user:?} cannot {} path {:?}", a.verb, a.path);
    }
    let mut resource = a.resource.clone();
    if !a.subresource.is_empty() {
        resource = format!("{resource}/{}", a.subresource);
    }
    if a.namespace.is_empty() {
        format!(
            "User {user:?} cannot {} resource {resource:?} in API group {:?} at the cluster scope",
            a.verb, a.api_group
        )
    } else {
        format!(
            "User {user:?} cannot {} resource {resource:?} in API group {:?} in the namespace {:?}",
            a.verb, a.api_group, a.namespace
        )
    }
}

/// The 403 `Status` for a denied request (`apierrors.NewForbidden`).
pub fn forbidden_status(user: &str, a: &Attrs) -> Value {
    let msg = forbidden_message(user, a);
    if !a.resource_request {
        return super::status(403, "Forbidden", &format!("forbidden: {msg}"), json!({}));
    }
    let qualified = if a.api_group.is_empty() { a.resource.clone() } else { format!("{}.{}", a.resource, a.api_group) };
    let message = if a.name.is_empty() {
        format!("{qualified} is forbidden: {msg}")
    } else {
        format!("{qualified} {:?} is forbidden: {msg}", a.name)
    };
    let mut details = json!({"kind": a.resource});
    if !a.name.is_empty() {
        details["name"] = json!(a.name);
    }
    if !a.api_group.is_empty() {
        details["group"] = json!(a.api_group);
    }
    super::status(403, "Forbidden", &message, details)
}

/// The bootstrap policy every cluster starts with (the parts kubectl and
/// the tests rely on): `cluster-admin` for `system:masters`, discovery,
/// basic-user and public-info for authenticated users.
pub fn bootstrap_yaml() -> &'static str {
    r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: cluster-admin}
rules:
- apiGroups: ["*"]
  resources: ["*"]
  verbs: ["*"]
- nonResourceURLs: ["*"]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: cluster-admin}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:masters"}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:discovery"}
rules:
- nonResourceURLs: ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz", "/version", "/version/"]
  verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:discovery"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:discovery"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:authenticated"}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:basic-user"}
rules:
- apiGroups: ["authorization.k8s.io"]
  resources: ["selfsubjectaccessreviews", "selfsubjectrulesreviews"]
  verbs: ["create"]
- apiGroups: ["authentication.k8s.io"]
  resources: ["selfsubjectreviews"]
  verbs: ["create"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:basic-user"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:basic-user"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:authenticated"}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:public-info-viewer"}
rules:
- nonResourceURLs: ["/healthz", "/livez", "/readyz", "/version", "/version/"]
  verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:public-info-viewer"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:public-info-viewer"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:authenticated"}
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:unauthenticated"}
"#
}

// ---- Client certificates -------------------------------------------------

/// Reads one DER TLV at the start of `b`: (tag, content, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, hdr) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    Some((tag, b.get(hdr..end)?, b.get(end..)?))
}

/// The user a client certificate names, as kube's x509 authenticator
/// reads it: CN is the user name, each O a group.
pub fn cert_identity(der: &[u8]) -> Option<(String, Vec<String>)> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r; // explicit version
    }
    for _ in 0..4 {
        // serial, signature algorithm, issuer, validity
        rest = tlv(rest)?.2;
    }
    let (_, mut subject, _) = tlv(rest)?;
    let (mut cn, mut orgs) = (None, Vec::new());
    while !subject.is_empty() {
        let (_, set, r) = tlv(subject)?;
        subject = r;
        let (_, atv, _) = tlv(set)?;
        let (_, oid, r) = tlv(atv)?;
        let (_, value, _) = tlv(r)?;
        let value = String::from_utf8_lossy(value).into_owned();
        match oid {
            [0x55, 0x04, 0x03] => cn = Some(value),
            [0x55, 0x04, 0x0a] => orgs.push(value),
            _ => {}
        }
    }
    Some((cn?, orgs))
}
