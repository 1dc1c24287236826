//! What an admin installs for a registered cluster: the activation
//! document and, rendered from it, a Kubernetes manifest, a systemd
//! activation file and cleanup instructions.
//!
//! TEMPORARY: the rendering below is a small local stand-in with the
//! shape of the `ship` branch's `render::kubernetes_manifest(&ClusterInstall)`,
//! `render::systemd_activation_file` and `render::cleanup_instructions`
//! (templates in `config/`). It is replaced by those once `ship` lands;
//! call sites go through [`render`] only.

use serde::{Deserialize, Serialize};

/// The activation an agent reads (CONVENTIONS.md "Activation"); also the
/// content of the Secret key `activation.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ActivationDoc {
    pub cluster: String,
    pub hub_url: String,
    pub activation_id: String,
    pub activation_code: String,
    /// RFC 3339 UTC.
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_pin_sha256: Option<String>,
}

/// Everything the renderers need for one cluster.
#[derive(Debug, Clone)]
pub struct ClusterInstall {
    pub activation: ActivationDoc,
    /// Users and groups the agent may impersonate (RBAC `resourceNames`).
    pub users: Vec<String>,
    pub groups: Vec<String>,
    /// Agent image, e.g. `ghcr.io/uplink/uplink:0.1.0`.
    pub image: String,
}

/// Rendering entry points (local stand-in, see the module docs).
pub mod render {
    use super::ClusterInstall;

    fn yaml_list(items: &[String]) -> String {
        let quoted: Vec<String> = items.iter().map(|i| serde_json::to_string(i).unwrap_or_default()).collect();
        format!("[{}]", quoted.join(", "))
    }

    fn indent(text: &str, spaces: usize) -> String {
        let pad = " ".repeat(spaces);
        text.lines().map(|l| format!("{pad}{l}\n")).collect()
    }

    /// The activation file for a systemd host (`/etc/uplink/activation.json`).
    pub fn systemd_activation_file(install: &ClusterInstall) -> String {
        let mut s = serde_json::to_string_pretty(&install.activation).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Namespace, service account, least-privilege RBAC, activation and
    /// state Secrets, hardened Deployment (CONVENTIONS.md "Kubernetes objects").
    pub fn kubernetes_manifest(install: &ClusterInstall) -> String {
        let activation = systemd_activation_file(install);
        let mut rules = String::new();
        // An empty resourceNames list would mean *all* names: omit the rule.
        if !install.users.is_empty() {
            rules += &format!(
                "  - apiGroups: [\"\"]\n    resources: [\"users\"]\n    verbs: [\"impersonate\"]\n    resourceNames: {}\n",
                yaml_list(&install.users)
            );
        }
        if !install.groups.is_empty() {
            rules += &format!(
                "  - apiGroups: [\"\"]\n    resources: [\"groups\"]\n    verbs: [\"impersonate\"]\n    resourceNames: {}\n",
                yaml_list(&install.groups)
            );
        }
        let rules = if rules.is_empty() { "rules: []\n".to_string() } else { format!("rules:\n{rules}") };
        format!(
            "# uplink agent for cluster {cluster}: kubectl apply -f this file\n\
---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: uplink\n\
---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: uplink-agent\n  namespace: uplink\n\
---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: uplink-impersonate\n{rules}\
---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: uplink-impersonate\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: uplink-impersonate\n\
subjects:\n  - kind: ServiceAccount\n    name: uplink-agent\n    namespace: uplink\n\
---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: uplink-state\n  namespace: uplink\n\
rules:\n  - apiGroups: [\"\"]\n    resources: [\"secrets\"]\n    resourceNames: [\"uplink-state\"]\n    verbs: [\"get\", \"update\"]\n\
---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: uplink-state\n  namespace: uplink\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: uplink-state\n\
subjects:\n  - kind: ServiceAccount\n    name: uplink-agent\n    namespace: uplink\n\
---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: uplink-activation\n  namespace: uplink\ntype: Opaque\n\
stringData:\n  activation.json: |\n{activation}\
---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: uplink-state\n  namespace: uplink\ntype: Opaque\n\
---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: uplink-agent\n  namespace: uplink\n\
spec:\n  replicas: 2\n  selector:\n    matchLabels:\n      app: uplink-agent\n  template:\n    metadata:\n      labels:\n        app: uplink-agent\n\
    spec:\n      serviceAccountName: uplink-agent\n      automountServiceAccountToken: true\n\
      securityContext:\n        runAsNonRoot: true\n        runAsUser: 65532\n        runAsGroup: 65532\n        seccompProfile:\n          type: RuntimeDefault\n\
      containers:\n        - name: uplink\n          image: {image}\n          args: [\"run\", \"--activation\", \"/etc/uplink/activation\", \"--state-secret\", \"uplink/uplink-state\"]\n\
          securityContext:\n            allowPrivilegeEscalation: false\n            readOnlyRootFilesystem: true\n            capabilities:\n              drop: [\"ALL\"]\n\
          resources:\n            requests:\n              cpu: 10m\n              memory: 16Mi\n            limits:\n              memory: 64Mi\n\
          livenessProbe:\n            exec:\n              command: [\"/uplink\", \"status\", \"--live\"]\n            periodSeconds: 20\n\
          readinessProbe:\n            exec:\n              command: [\"/uplink\", \"status\", \"--ready\"]\n            periodSeconds: 10\n\
          volumeMounts:\n            - name: activation\n              mountPath: /etc/uplink/activation\n              readOnly: true\n\
      volumes:\n        - name: activation\n          secret:\n            secretName: uplink-activation\n",
            cluster = install.activation.cluster,
            image = install.image,
            activation = indent(&activation, 4),
        )
    }

    /// What the admin may still remove in the cluster after deregistering.
    pub fn cleanup_instructions(cluster: &str) -> String {
        format!(
            "Cluster {cluster} is deregistered; its agent was told to stop and its credential is revoked.\n\
             Nothing in the cluster was touched. To remove the agent:\n\
             \x20 pod install:     kubectl delete namespace uplink && kubectl delete clusterrole,clusterrolebinding uplink-impersonate\n\
             \x20 systemd install: systemctl disable --now uplink && rm -rf /etc/uplink /var/lib/uplink\n"
        )
    }
}
