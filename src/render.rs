//! What an admin installs for a registered cluster, rendered by the hub.
//!
//! At registration the hub hands out, for one cluster:
//! - a Kubernetes manifest ([`kubernetes_manifest`]) from the template
//!   `config/kubernetes.yaml.tmpl`: namespace, service account, the
//!   impersonation ClusterRole limited by `resourceNames` to the registered
//!   users and groups, the state Role, the activation and state Secrets and
//!   the agent Deployment (object names as in the project's conventions);
//! - the activation file for a systemd host ([`systemd_activation_file`]),
//!   to be dropped at `/etc/uplink/activation.json`;
//! - after deregistration, what the admin may delete
//!   ([`cleanup_instructions`], from `config/cleanup.txt.tmpl`).
//!
//! # Safety of substitution
//!
//! Values come from people (cluster, user and group names) and from the hub
//! (the activation, which holds a secret). Each is substituted exactly once,
//! in a single pass over the template, so a value containing `{{...}}` is
//! never expanded. Every YAML value is written as a double-quoted scalar
//! with everything outside printable ASCII escaped ([`yaml_quote`]), so no
//! value can end its line, open a comment or start a new key or document;
//! the same quoted form is used where a value appears in a comment or in
//! text. The impersonation rules are generated, not templated, and a rule
//! whose list is empty is left out: an empty `resourceNames` would grant
//! every name.
//!
//! Out of scope: checking that names are valid Kubernetes names (the hub
//! validates what it registers; the API server refuses the rest).

use std::fmt;
use std::fmt::Write as _;

/// The Kubernetes manifest template (`config/kubernetes.yaml.tmpl`).
pub const KUBERNETES_TEMPLATE: &str = include_str!("../config/kubernetes.yaml.tmpl");
/// The cleanup instructions template (`config/cleanup.txt.tmpl`).
pub const CLEANUP_TEMPLATE: &str = include_str!("../config/cleanup.txt.tmpl");

/// Namespace the agent is installed in unless the admin picks another.
pub const DEFAULT_NAMESPACE: &str = "uplink";
/// Image repository of the agent; the tag is the hub's own version.
pub const IMAGE_REPOSITORY: &str = "ghcr.io/uplink/uplink";
/// Name of the Secret the agent keeps its registration in (pre-created).
pub const STATE_SECRET: &str = "uplink-state";

/// Everything the install artefacts of one cluster depend on.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterInstall {
    /// The cluster's name on the hub.
    pub cluster: String,
    /// Namespace for the agent's namespaced objects (a DNS label).
    pub namespace: String,
    /// Agent image reference, e.g. `ghcr.io/uplink/uplink:0.1.0`.
    pub image: String,
    /// The activation, as the JSON document the agent reads (holds the
    /// one-time code: never logged, see the `Debug` impl).
    pub activation_json: String,
    /// Hub user names the agent may impersonate in this cluster.
    pub impersonate_users: Vec<String>,
    /// Hub group names the agent may impersonate in this cluster.
    pub impersonate_groups: Vec<String>,
}

impl ClusterInstall {
    /// An install in the default namespace with the image matching this
    /// build, and nobody to impersonate yet.
    pub fn new(cluster: impl Into<String>, activation_json: impl Into<String>) -> Self {
        ClusterInstall {
            cluster: cluster.into(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            image: format!("{IMAGE_REPOSITORY}:{}", env!("CARGO_PKG_VERSION")),
            activation_json: activation_json.into(),
            impersonate_users: Vec::new(),
            impersonate_groups: Vec::new(),
        }
    }
}

impl fmt::Debug for ClusterInstall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterInstall")
            .field("cluster", &self.cluster)
            .field("namespace", &self.namespace)
            .field("image", &self.image)
            .field("activation_json", &"<redacted>")
            .field("impersonate_users", &self.impersonate_users)
            .field("impersonate_groups", &self.impersonate_groups)
            .finish()
    }
}

/// The multi-document Kubernetes manifest that installs the agent.
pub fn kubernetes_manifest(install: &ClusterInstall) -> String {
    let state_secret = format!("{}/{STATE_SECRET}", install.namespace);
    substitute(
        KUBERNETES_TEMPLATE,
        &[
            ("cluster", yaml_quote(&install.cluster)),
            ("namespace", yaml_quote(&install.namespace)),
            ("image", yaml_quote(&install.image)),
            ("state_secret", yaml_quote(&state_secret)),
            ("activation_json", yaml_quote(&install.activation_json)),
            ("impersonate_rules", impersonate_rules(install)),
        ],
    )
}

/// The content of `/etc/uplink/activation.json` on a systemd host: the
/// activation exactly as in the manifest's Secret, newline-terminated.
pub fn systemd_activation_file(install: &ClusterInstall) -> String {
    format!("{}\n", install.activation_json.trim_end())
}

/// What an admin may delete once the cluster is deregistered, for both
/// install modes.
pub fn cleanup_instructions(install: &ClusterInstall) -> String {
    substitute(
        CLEANUP_TEMPLATE,
        &[("cluster", yaml_quote(&install.cluster)), ("namespace_sh", shell_quote(&install.namespace))],
    )
}

/// `s` as a YAML double-quoted scalar that is also plain ASCII: `"` and `\`
/// are escaped, and so is every character outside printable ASCII (`\n`,
/// `\t`, `\uXXXX`, `\UXXXXXXXX`), including the characters YAML 1.1 treats
/// as line breaks (U+0085, U+2028, U+2029). The result reads back as exactly
/// `s` in YAML 1.1 and 1.2 parsers, and is safe inside a comment.
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            ' '..='~' => out.push(c),
            c if u32::from(c) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\U{:08X}", u32::from(c));
            }
        }
    }
    out.push('"');
    out
}

/// `s` as one POSIX shell word: bare when it is made only of characters the
/// shell never interprets, otherwise single-quoted; control characters,
/// which would break the line a person copies, are shown as `$'\xHH'`.
fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=@".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        return s.to_owned();
    }
    let mut out = String::from("'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("'\\''"),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                out.push_str("'$'");
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\x{b:02x}");
                }
                out.push_str("''");
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The impersonation `rules:` items of the ClusterRole (after the template's
/// own `list nodes` rule). Names are sorted and deduplicated (stable output),
/// empty names dropped (nobody has one), and a rule with no names left is
/// omitted entirely.
fn impersonate_rules(install: &ClusterInstall) -> String {
    let mut out = String::new();
    for (resource, names) in [("users", &install.impersonate_users), ("groups", &install.impersonate_groups)] {
        let mut names: Vec<&str> = names.iter().map(String::as_str).filter(|n| !n.is_empty()).collect();
        names.sort_unstable();
        names.dedup();
        if names.is_empty() {
            continue;
        }
        let _ = writeln!(out, "  - apiGroups: [\"\"]");
        let _ = writeln!(out, "    resources: [{}]", yaml_quote(resource));
        let _ = writeln!(out, "    verbs: [\"impersonate\"]");
        let _ = writeln!(out, "    resourceNames:");
        for name in names {
            let _ = writeln!(out, "      - {}", yaml_quote(name));
        }
    }
    // No users or groups registered: no rule at all, the agent may
    // impersonate no one (the template's node rule keeps `rules:` a list).
    out.truncate(out.trim_end_matches('\n').len());
    out
}

/// Replaces each `{{name}}` of `template` with its value, in one pass: text
/// inserted from a value is never scanned again. A placeholder with no value
/// is left as it is (the tests render every template and look for leftovers).
fn substitute(template: &str, values: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len() + 1024);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let name = after[..end].trim();
        match values.iter().find(|(key, _)| *key == name) {
            Some((_, value)) => out.push_str(value),
            None => out.push_str(&rest[start..start + 2 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use yaml_rust2::{Yaml, YamlLoader};

    const ACTIVATION: &str = r#"{
  "cluster": "edge-1",
  "hub_url": "https://hub.example.com:8443",
  "activation_id": "act_0123456789abcdef",
  "activation_code": "REPLACE-WITH-THE-CODE-FROM-uplink-hub-cluster-register",
  "expires_at": "2026-12-04T10:00:00Z"
}"#;

    fn example() -> ClusterInstall {
        let mut install = ClusterInstall::new("edge-1", ACTIVATION);
        install.impersonate_users = vec!["alice@example.com".into(), "bob".into()];
        install.impersonate_groups = vec!["ops".into()];
        install
    }

    fn parse_docs(manifest: &str) -> Vec<Yaml> {
        YamlLoader::load_from_str(manifest).unwrap_or_else(|e| panic!("not YAML: {e}\n{manifest}"))
    }

    fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    fn strings(y: &Yaml) -> Vec<&str> {
        y.as_vec().expect("a list").iter().map(|v| v.as_str().expect("a string")).collect()
    }

    /// Every `resourceNames` anywhere must be a non-empty list of strings.
    fn assert_no_empty_resource_names(y: &Yaml) {
        match y {
            Yaml::Hash(h) => {
                for (k, v) in h {
                    if k.as_str() == Some("resourceNames") {
                        assert!(!strings(v).is_empty(), "empty resourceNames");
                    }
                    assert_no_empty_resource_names(v);
                }
            }
            Yaml::Array(a) => a.iter().for_each(assert_no_empty_resource_names),
            _ => {}
        }
    }

    #[test]
    fn manifest_has_every_object_with_the_conventional_names() {
        let docs = parse_docs(&kubernetes_manifest(&example()));
        let kinds: Vec<(&str, &str)> =
            docs.iter().map(|d| (d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap())).collect();
        assert_eq!(
            kinds,
            [
                ("Namespace", "uplink"),
                ("ServiceAccount", "uplink-agent"),
                ("ClusterRole", "uplink-impersonate"),
                ("ClusterRoleBinding", "uplink-impersonate"),
                ("Role", "uplink-state"),
                ("RoleBinding", "uplink-state"),
                ("Secret", "uplink-activation"),
                ("Secret", "uplink-state"),
                ("Deployment", "uplink-agent"),
            ]
        );
        for d in &docs[1..] {
            if d["kind"].as_str() != Some("ClusterRole") && d["kind"].as_str() != Some("ClusterRoleBinding") {
                assert_eq!(d["metadata"]["namespace"].as_str(), Some("uplink"));
            }
        }
    }

    #[test]
    fn impersonation_is_limited_to_the_registered_names() {
        let docs = parse_docs(&kubernetes_manifest(&example()));
        let rules = &find(&docs, "ClusterRole", "uplink-impersonate")["rules"].as_vec().unwrap()[1..];
        assert_eq!(rules.len(), 2);
        assert_eq!(strings(&rules[0]["resources"]), ["users"]);
        assert_eq!(strings(&rules[0]["verbs"]), ["impersonate"]);
        assert_eq!(strings(&rules[0]["resourceNames"]), ["alice@example.com", "bob"]);
        assert_eq!(strings(&rules[1]["resources"]), ["groups"]);
        assert_eq!(strings(&rules[1]["resourceNames"]), ["ops"]);
        assert_no_empty_resource_names(&Yaml::Array(docs));
    }

    /// The agent's only right of its own outside its namespace: `list` on
    /// nodes, for the node count (`GET /api/v1/nodes?limit=1`).
    #[test]
    fn the_only_other_cluster_rule_lists_nodes() {
        let docs = parse_docs(&kubernetes_manifest(&example()));
        let rules = find(&docs, "ClusterRole", "uplink-impersonate")["rules"].as_vec().unwrap();
        assert_eq!(strings(&rules[0]["apiGroups"]), [""]);
        assert_eq!(strings(&rules[0]["resources"]), ["nodes"]);
        assert_eq!(strings(&rules[0]["verbs"]), ["list"]);
        assert!(rules[0]["resourceNames"].is_badvalue());
        for r in &rules[1..] {
            assert_eq!(strings(&r["verbs"]), ["impersonate"]);
        }
    }

    #[test]
    fn an_empty_list_omits_its_rule_instead_of_granting_everyone() {
        let mut install = example();
        install.impersonate_groups.clear();
        let docs = parse_docs(&kubernetes_manifest(&install));
        let rules = &find(&docs, "ClusterRole", "uplink-impersonate")["rules"].as_vec().unwrap()[1..];
        assert_eq!(rules.len(), 1);
        assert_eq!(strings(&rules[0]["resources"]), ["users"]);

        // Names that are all empty count as no names.
        install.impersonate_users = vec![String::new(), String::new()];
        let docs = parse_docs(&kubernetes_manifest(&install));
        let rules = &find(&docs, "ClusterRole", "uplink-impersonate")["rules"].as_vec().unwrap()[1..];
        assert!(rules.is_empty(), "{rules:?}");
        assert_no_empty_resource_names(&Yaml::Array(docs));
    }

    #[test]
    fn names_are_sorted_and_deduplicated() {
        let mut install = example();
        install.impersonate_users = vec!["carol".into(), "alice".into(), "carol".into()];
        let docs = parse_docs(&kubernetes_manifest(&install));
        let rules = &find(&docs, "ClusterRole", "uplink-impersonate")["rules"].as_vec().unwrap()[1..];
        assert_eq!(strings(&rules[0]["resourceNames"]), ["alice", "carol"]);
    }

    #[test]
    fn state_role_allows_only_get_and_update_on_its_own_secret() {
        let docs = parse_docs(&kubernetes_manifest(&example()));
        let rules = find(&docs, "Role", "uplink-state")["rules"].as_vec().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(strings(&rules[0]["resources"]), ["secrets"]);
        assert_eq!(strings(&rules[0]["resourceNames"]), ["uplink-state"]);
        assert_eq!(strings(&rules[0]["verbs"]), ["get", "update"]);
    }

    #[test]
    fn deployment_is_hardened() {
        let docs = parse_docs(&kubernetes_manifest(&example()));
        let deploy = find(&docs, "Deployment", "uplink-agent");
        assert_eq!(deploy["spec"]["replicas"].as_i64(), Some(2));
        let pod = &deploy["spec"]["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
        assert_eq!(pod["serviceAccountName"].as_str(), Some("uplink-agent"));
        let c = &pod["containers"][0];
        assert_eq!(c["image"].as_str(), Some(&*format!("ghcr.io/uplink/uplink:{}", env!("CARGO_PKG_VERSION"))));
        assert_eq!(
            strings(&c["args"]),
            ["run", "--activation", "/etc/uplink/activation", "--state-secret", "uplink/uplink-state"]
        );
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
        assert_eq!(sc["runAsUser"].as_i64(), Some(65532));
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
        assert_eq!(sc["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"));
        assert_eq!(strings(&c["livenessProbe"]["exec"]["command"]), ["/uplink", "status", "--live"]);
        assert_eq!(strings(&c["readinessProbe"]["exec"]["command"]), ["/uplink", "status", "--ready"]);
        let token = &pod["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(token["expirationSeconds"].as_i64(), Some(3600));
        let sa = find(&docs, "ServiceAccount", "uplink-agent");
        assert_eq!(sa["automountServiceAccountToken"].as_bool(), Some(false));
    }

    #[test]
    fn activation_goes_into_the_secret_unchanged() {
        let install = example();
        let docs = parse_docs(&kubernetes_manifest(&install));
        let secret = find(&docs, "Secret", "uplink-activation");
        assert_eq!(secret["stringData"]["activation.json"].as_str(), Some(ACTIVATION));
        let file = systemd_activation_file(&install);
        assert_eq!(file, format!("{ACTIVATION}\n"));
        let parsed: serde_json::Value = serde_json::from_str(&file).unwrap();
        assert_eq!(parsed["cluster"], "edge-1");
    }

    #[test]
    fn hostile_values_stay_values() {
        let hostile = [
            "a\"b\n  - \"*\"",
            "x\n---\nkind: Secret",
            "{{image}}",
            "{{ impersonate_rules }}",
            "# not a comment",
            "back\\slash 'single' \t tab",
            "line\u{2028}sep\u{85}nel\u{2029}",
            "nul\0bell\u{7}",
            "ünï ☃ 🦀",
            " leading and trailing ",
            "",
        ];
        for bad in hostile {
            let activation = format!(r#"{{"cluster": {}, "hub_ca_pem": "-----BEGIN\n}}}}"}}"#, serde_json::json!(bad));
            let install = ClusterInstall {
                cluster: bad.to_owned(),
                namespace: bad.to_owned(),
                image: bad.to_owned(),
                activation_json: activation.clone(),
                impersonate_users: vec![bad.to_owned(), "*".to_owned()],
                impersonate_groups: vec![bad.to_owned()],
            };
            let manifest = kubernetes_manifest(&install);
            let docs = parse_docs(&manifest);
            assert_eq!(docs.len(), 9, "{bad:?} changed the document count:\n{manifest}");
            for d in &docs[1..] {
                if d["metadata"]["namespace"].as_str().is_some() {
                    assert_eq!(d["metadata"]["namespace"].as_str(), Some(bad));
                }
            }
            assert_eq!(docs[0]["metadata"]["name"].as_str(), Some(bad));
            let role = find(&docs, "ClusterRole", "uplink-impersonate");
            assert_eq!(role["metadata"]["annotations"]["uplink/cluster"].as_str(), Some(bad));
            let mut users = vec![bad, "*"];
            users.retain(|u| !u.is_empty());
            users.sort_unstable();
            assert_eq!(strings(&role["rules"][1]["resourceNames"]), users, "{bad:?}");
            let secret = &docs[6];
            assert_eq!(secret["stringData"]["activation.json"].as_str(), Some(&*activation));
            let c = &docs[8]["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(c["image"].as_str(), Some(bad));
            assert_eq!(c["args"][4].as_str(), Some(&*format!("{bad}/uplink-state")));
            assert_no_empty_resource_names(&Yaml::Array(docs.clone()));
            // Values are quoted ASCII: nothing raw reaches the text.
            assert!(manifest.is_ascii());
            let cleanup = cleanup_instructions(&install);
            assert_eq!(
                cleanup.lines().count(),
                cleanup_instructions(&example()).lines().count(),
                "{bad:?} broke a line:\n{cleanup}"
            );
        }
    }

    /// Names as Kubernetes has them read back from `resourceNames`
    /// exactly, whatever YAML gives meaning to (`:`, `#`, `@`, leading
    /// `system:`, spaces, UTF-8, YAML 1.1 line breaks).
    #[test]
    fn kubernetes_names_read_back_exactly() {
        let names = [
            "arn:aws:iam::1234567890:user/Alice",
            "arn:aws:iam::1234567890:role/Admins",
            "jane@example.com",
            "oidc:https://idp.example.com#42",
            "system:masters",
            "Jane Doe",
            "Zoë Ångström",
            "山田",
            "yes",
            "- item",
            "key: value",
            "line\u{2028}sep",
        ];
        let mut install = example();
        install.impersonate_users = names.iter().map(|n| n.to_string()).collect();
        install.impersonate_groups = names.iter().map(|n| n.to_string()).collect();
        let docs = parse_docs(&kubernetes_manifest(&install));
        let rules = &find(&docs, "ClusterRole", "uplink-impersonate")["rules"].as_vec().unwrap()[1..];
        let mut sorted = names.to_vec();
        sorted.sort_unstable();
        assert_eq!(strings(&rules[0]["resourceNames"]), sorted);
        assert_eq!(strings(&rules[1]["resourceNames"]), sorted);
    }

    #[test]
    fn every_placeholder_is_filled() {
        let manifest = kubernetes_manifest(&example());
        assert!(!manifest.contains("{{") && !manifest.contains("}}"), "{manifest}");
        let cleanup = cleanup_instructions(&example());
        assert!(!cleanup.contains("{{") && !cleanup.contains("}}"), "{cleanup}");
        assert!(cleanup.contains("kubectl delete namespace uplink\n"));
        assert!(cleanup.contains("kubectl delete clusterrole uplink-impersonate\n"));
        assert!(cleanup.contains("systemctl disable --now uplink\n"));
    }

    #[test]
    fn substitution_is_single_pass() {
        let out = substitute("a {{x}} b {{ y }} {{unknown}} {{", &[("x", "{{y}}".into()), ("y", "Y".into())]);
        assert_eq!(out, "a {{y}} b Y {{unknown}} {{");
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("uplink"), "uplink");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("a\nb"), "'a'$'\\x0a''b'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn debug_redacts_the_activation() {
        let shown = format!("{:?}", example());
        assert!(!shown.contains("REPLACE-WITH"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    /// `config/kubernetes.example.yaml` is this renderer's output for the
    /// example install; rewrite it with `UPLINK_BLESS=1 cargo test`.
    #[test]
    fn example_manifest_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/kubernetes.example.yaml");
        let mut install = example();
        install.image = format!("{IMAGE_REPOSITORY}:{}", env!("CARGO_PKG_VERSION"));
        let rendered = kubernetes_manifest(&install);
        if std::env::var_os("UPLINK_BLESS").is_some() {
            std::fs::write(path, &rendered).unwrap();
        }
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == rendered,
            "config/kubernetes.example.yaml is stale: run `UPLINK_BLESS=1 cargo test render::`"
        );
    }
}
