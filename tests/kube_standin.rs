//! The stand-in Kubernetes API server (tests/support/kube), driven by real
//! kubectl and by hand-made HTTP requests.

mod support;

use support::kube::{Config, StandIn};
use support::kubectl::{Kubectl, stderr, stdout};

#[test]
fn kubectl_version_and_get_nodes_as_admin() {
    let k = StandIn::start(Config::default());
    let Some(kc) = Kubectl::find("version") else { return };
    k.kubeconfig_for_token(kc.path(), &k.admin_token()).unwrap();
    let o = kc.run(&["get", "nodes", "-o", "wide"]);
    println!("{}\n{}", stdout(&o), stderr(&o));
    assert!(o.status.success());
}
