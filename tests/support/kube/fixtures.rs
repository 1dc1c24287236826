//! A small, realistic edge cluster: two arm64 k3s nodes, namespaces
//! default / kube-system / kube-public / kube-node-lease / foo / bar /
//! uplink, and workloads with their pods and logs.
//!
//! In `default`: Deployment `web` → ReplicaSet `web-7d4b9c8f6d` → pods
//! `web-7d4b9c8f6d-k2x9p`, `web-7d4b9c8f6d-q8w4z`; DaemonSet `node-exporter`
//! (pods `node-exporter-4hx2m`, `node-exporter-9tq7c`); StatefulSet `db`
//! (pod `db-0`); Job `backup` (pod `backup-7xk2p`, Succeeded). In
//! `kube-system`: Deployment `coredns` (pod `coredns-ccb96694c-x7m2n`),
//! ConfigMap `coredns`. In `foo` and `bar`: pods `foo-app` and `bar-app`.
//! In `uplink`: ServiceAccount `uplink-agent`.

use serde_json::{Value, json};

use super::State;
use super::time;

fn meta(name: &str, ns: &str, age_secs: i64, labels: Value) -> Value {
    let mut m =
        json!({"name": name, "labels": labels, "creationTimestamp": time::rfc3339(time::now_secs() - age_secs)});
    if !ns.is_empty() {
        m["namespace"] = json!(ns);
    }
    m
}

fn container(name: &str, image: &str, port: Option<u16>) -> Value {
    let mut c = json!({"name": name, "image": image, "imagePullPolicy": "IfNotPresent"});
    if let Some(p) = port {
        c["ports"] = json!([{"containerPort": p, "protocol": "TCP"}]);
    }
    c
}

#[allow(clippy::too_many_arguments)]
fn pod(
    name: &str,
    ns: &str,
    node: &str,
    ip: &str,
    labels: Value,
    c: Value,
    owner: Option<(&str, &str)>,
    phase: &str,
) -> Value {
    let ready = phase == "Running";
    let mut p = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta(name, ns, 3 * 86_400, labels),
        "spec": {"containers": [c.clone()], "nodeName": node, "restartPolicy": "Always", "serviceAccountName": "default"},
        "status": {
            "phase": phase,
            "podIP": ip,
            "hostIP": if node == "edge-1" { "10.0.0.11" } else { "10.0.0.12" },
            "startTime": time::rfc3339(time::now_secs() - 3 * 86_400),
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "containerStatuses": [{
                "name": c["name"],
                "image": c["image"],
                "ready": ready,
                "restartCount": 0,
                "started": ready,
                "state": if ready { json!({"running": {"startedAt": time::rfc3339(time::now_secs() - 3 * 86_400)}}) }
                         else { json!({"terminated": {"exitCode": 0, "reason": "Completed"}}) },
            }],
        },
    });
    if let Some((kind, owner)) = owner {
        let api = if kind == "Job" { "batch/v1" } else { "apps/v1" };
        p["metadata"]["ownerReferences"] =
            json!([{"apiVersion": api, "kind": kind, "name": owner, "uid": "", "controller": true}]);
    }
    p
}

fn template(labels: &Value, c: &Value) -> Value {
    json!({"metadata": {"labels": labels}, "spec": {"containers": [c]}})
}

fn node(name: &str, ip: &str, control_plane: bool) -> Value {
    let mut labels = json!({
        "kubernetes.io/arch": "arm64",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": name,
        "beta.kubernetes.io/arch": "arm64",
        "beta.kubernetes.io/os": "linux",
        "node.kubernetes.io/instance-type": "k3s",
    });
    if control_plane {
        labels["node-role.kubernetes.io/control-plane"] = json!("true");
        labels["node-role.kubernetes.io/master"] = json!("true");
    }
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": meta(name, "", 30 * 86_400, labels),
        "spec": {"podCIDR": "10.42.0.0/24"},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
                {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure"},
                {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID"},
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status"},
            ],
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "capacity": {"cpu": "4", "memory": "8048132Ki", "pods": "110"},
            "allocatable": {"cpu": "4", "memory": "8048132Ki", "pods": "110"},
            "nodeInfo": {
                "architecture": "arm64",
                "operatingSystem": "linux",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "kernelVersion": "6.6.51+rpt-rpi-2712",
                "containerRuntimeVersion": "containerd://1.7.23-k3s2",
                "kubeletVersion": "v1.32.3+k3s1",
                "kubeProxyVersion": "v1.32.3+k3s1",
            },
        },
    })
}

fn workload(kind: &str, name: &str, ns: &str, labels: &Value, c: &Value, replicas: i64) -> Value {
    let api = if kind == "Job" { "batch/v1" } else { "apps/v1" };
    let mut o = json!({
        "apiVersion": api,
        "kind": kind,
        "metadata": meta(name, ns, 3 * 86_400, labels.clone()),
        "spec": {"selector": {"matchLabels": labels}, "template": template(labels, c)},
    });
    match kind {
        "Deployment" | "ReplicaSet" | "StatefulSet" => {
            o["spec"]["replicas"] = json!(replicas);
            o["status"] = json!({
                "replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
                "updatedReplicas": replicas, "currentReplicas": replicas, "observedGeneration": 1,
            });
        }
        "DaemonSet" => {
            o["status"] = json!({
                "desiredNumberScheduled": replicas, "currentNumberScheduled": replicas, "numberReady": replicas,
                "updatedNumberScheduled": replicas, "numberAvailable": replicas, "numberMisscheduled": 0,
            });
        }
        "Job" => {
            o["spec"]["completions"] = json!(1);
            o["spec"]["template"]["spec"]["restartPolicy"] = json!("Never");
            o["status"] = json!({
                "succeeded": 1,
                "startTime": time::rfc3339(time::now_secs() - 3 * 86_400),
                "completionTime": time::rfc3339(time::now_secs() - 3 * 86_400 + 12),
                "conditions": [{"type": "Complete", "status": "True"}],
            });
        }
        _ => {}
    }
    o
}

pub fn load(st: &mut State) {
    let mut objs = Vec::new();
    for (ns, age) in [
        ("default", 30),
        ("kube-system", 30),
        ("kube-public", 30),
        ("kube-node-lease", 30),
        ("foo", 10),
        ("bar", 10),
        ("uplink", 2),
    ] {
        objs.push(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": meta(ns, "", age * 86_400, json!({"kubernetes.io/metadata.name": ns})),
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }));
        objs.push(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("default", ns, age * 86_400, json!({}))}));
    }
    objs.push(node("edge-1", "10.0.0.11", true));
    objs.push(node("edge-2", "10.0.0.12", false));

    // default: a deployment with its replicaset and pods.
    let web = json!({"app": "web"});
    let web_c = container("web", "nginx:1.27-alpine", Some(8080));
    objs.push(workload("Deployment", "web", "default", &web, &web_c, 2));
    let mut rs_labels = web.clone();
    rs_labels["pod-template-hash"] = json!("7d4b9c8f6d");
    let mut rs = workload("ReplicaSet", "web-7d4b9c8f6d", "default", &rs_labels, &web_c, 2);
    rs["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "", "controller": true}]);
    objs.push(rs);
    let owner = Some(("ReplicaSet", "web-7d4b9c8f6d"));
    objs.push(pod(
        "web-7d4b9c8f6d-k2x9p",
        "default",
        "edge-1",
        "10.42.0.10",
        rs_labels.clone(),
        web_c.clone(),
        owner,
        "Running",
    ));
    objs.push(pod(
        "web-7d4b9c8f6d-q8w4z",
        "default",
        "edge-2",
        "10.42.1.11",
        rs_labels.clone(),
        web_c.clone(),
        owner,
        "Running",
    ));

    let ne = json!({"app": "node-exporter"});
    let ne_c = container("node-exporter", "prom/node-exporter:v1.8.2", Some(9100));
    objs.push(workload("DaemonSet", "node-exporter", "default", &ne, &ne_c, 2));
    let owner = Some(("DaemonSet", "node-exporter"));
    objs.push(pod(
        "node-exporter-4hx2m",
        "default",
        "edge-1",
        "10.42.0.12",
        ne.clone(),
        ne_c.clone(),
        owner,
        "Running",
    ));
    objs.push(pod(
        "node-exporter-9tq7c",
        "default",
        "edge-2",
        "10.42.1.13",
        ne.clone(),
        ne_c.clone(),
        owner,
        "Running",
    ));

    let db = json!({"app": "db"});
    let db_c = container("postgres", "postgres:16-alpine", Some(5432));
    objs.push(workload("StatefulSet", "db", "default", &db, &db_c, 1));
    objs.push(pod("db-0", "default", "edge-2", "10.42.1.14", db.clone(), db_c, Some(("StatefulSet", "db")), "Running"));

    let backup = json!({"job-name": "backup"});
    let backup_c = container("backup", "busybox:1.36", None);
    objs.push(workload("Job", "backup", "default", &backup, &backup_c, 1));
    objs.push(pod(
        "backup-7xk2p",
        "default",
        "edge-1",
        "10.42.0.15",
        backup.clone(),
        backup_c,
        Some(("Job", "backup")),
        "Succeeded",
    ));

    // kube-system: coredns.
    let dns = json!({"k8s-app": "kube-dns"});
    let dns_c = container("coredns", "rancher/mirrored-coredns-coredns:1.12.0", Some(53));
    objs.push(workload("Deployment", "coredns", "kube-system", &dns, &dns_c, 1));
    let mut dns_rs = dns.clone();
    dns_rs["pod-template-hash"] = json!("ccb96694c");
    objs.push(workload("ReplicaSet", "coredns-ccb96694c", "kube-system", &dns_rs, &dns_c, 1));
    objs.push(pod(
        "coredns-ccb96694c-x7m2n",
        "kube-system",
        "edge-1",
        "10.42.0.2",
        dns_rs,
        dns_c,
        Some(("ReplicaSet", "coredns-ccb96694c")),
        "Running",
    ));
    objs.push(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("coredns", "kube-system", 30 * 86_400, json!({})),
        "data": {"Corefile": ".:53 {\n    errors\n    health\n    forward . /etc/resolv.conf\n}\n"},
    }));

    // foo and bar: one app each.
    for ns in ["foo", "bar"] {
        let l = json!({"app": format!("{ns}-app")});
        objs.push(pod(
            &format!("{ns}-app"),
            ns,
            "edge-2",
            "10.42.1.20",
            l,
            container("app", "busybox:1.36", Some(8080)),
            None,
            "Running",
        ));
    }

    objs.push(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("uplink-agent", "uplink", 2 * 86_400, json!({}))}));
    objs.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": meta("web-config", "default", 3 * 86_400, json!({})),
        "data": {"password": "aHVudGVyMg=="},
    }));

    for o in objs {
        super::server::apply(&mut st.store, o).expect("fixture");
    }
    for (ns, p) in [
        ("default", "web-7d4b9c8f6d-k2x9p"),
        ("default", "web-7d4b9c8f6d-q8w4z"),
        ("default", "db-0"),
        ("kube-system", "coredns-ccb96694c-x7m2n"),
        ("foo", "foo-app"),
        ("bar", "bar-app"),
    ] {
        st.logs.insert((ns.into(), p.into()), vec![format!("{p}: starting"), format!("{p}: listening")]);
    }
}
