//! Counters for `/metrics` (Prometheus text format 0.0.4).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::rc::Rc;

#[derive(Default)]
pub struct Metrics {
    /// cluster → its proxied requests' counts, keyed by the name so that
    /// counting a request allocates nothing once its cluster is known.
    clusters: RefCell<BTreeMap<String, ClusterCounts>>,
    pub tunnels_accepted: Cell<u64>,
    pub activations: Cell<u64>,
    pub http_requests: Cell<u64>,
    /// Connections refused over a cap (`limits`).
    pub connections_refused: Cell<u64>,
    /// Connections closed for missing a handshake, head or body deadline.
    pub slow_closed: Cell<u64>,
    /// Requests this replica handed to another one (`replicas::handoff`).
    pub handoffs: Cell<u64>,
    /// Dials to another replica that failed (each then tries the next).
    pub handoff_failures: Cell<u64>,
    /// `/v1/peer` requests refused for a missing or wrong credential.
    pub peer_refused: Cell<u64>,
    /// Peer sessions this replica dialled and holds now (shared with
    /// their tasks, which outlive any one request).
    pub peer_sessions_out: Rc<Cell<u64>>,
    /// Peer sessions other replicas dialled to this one.
    pub peer_sessions_in: Cell<u64>,
    /// Handed-off streams this replica splices onto its agent tunnels now.
    pub peer_streams_in: Cell<u64>,
    /// protocol label → (connections open, connections served, requests).
    by_proto: RefCell<BTreeMap<&'static str, (u64, u64, u64)>>,
}

/// One cluster's kube front-end counters.
#[derive(Default)]
struct ClusterCounts {
    /// status code → proxied requests.
    requests: BTreeMap<u16, u64>,
    /// Bytes from clients, bytes to clients.
    bytes: (u64, u64),
}

/// Counts a client connection as open until dropped.
pub struct OpenConnection<'a> {
    metrics: &'a Metrics,
    proto: &'static str,
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.metrics.by_proto.borrow_mut().get_mut(self.proto) {
            e.0 -= 1;
        }
    }
}

impl Metrics {
    pub fn record(&self, cluster: &str, status: u16, bytes_in: u64, bytes_out: u64) {
        let mut clusters = self.clusters.borrow_mut();
        let c = match clusters.get_mut(cluster) {
            Some(c) => c,
            None => clusters.entry(cluster.to_string()).or_default(),
        };
        *c.requests.entry(status).or_default() += 1;
        c.bytes.0 += bytes_in;
        c.bytes.1 += bytes_out;
    }

    /// A client connection speaking `proto` (`h2`, `http/1.1`) opened.
    pub fn connection_opened(&self, proto: &'static str) -> OpenConnection<'_> {
        let mut m = self.by_proto.borrow_mut();
        let e = m.entry(proto).or_default();
        e.0 += 1;
        e.1 += 1;
        OpenConnection { metrics: self, proto }
    }

    /// A request over `proto` arrived.
    pub fn request(&self, proto: &'static str) {
        self.by_proto.borrow_mut().entry(proto).or_default().2 += 1;
        Self::bump(&self.http_requests);
    }

    pub fn bump(c: &Cell<u64>) {
        c.set(c.get() + 1);
    }

    /// Renders everything; `agents` is (cluster, connected agents).
    pub fn render(&self, agents: &[(String, usize)], streams: usize) -> String {
        let mut s = String::new();
        let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        s +=
            "# HELP uplink_hub_agents_connected Agents with a live tunnel.\n# TYPE uplink_hub_agents_connected gauge\n";
        let total: usize = agents.iter().map(|(_, n)| n).sum();
        let _ = writeln!(s, "uplink_hub_agents_connected {total}");
        s += "# HELP uplink_hub_cluster_agents Agents with a live tunnel per cluster.\n# TYPE uplink_hub_cluster_agents gauge\n";
        for (c, n) in agents {
            let _ = writeln!(s, "uplink_hub_cluster_agents{{cluster=\"{}\"}} {n}", esc(c));
        }
        s += "# HELP uplink_hub_streams_open Streams open on all tunnels.\n# TYPE uplink_hub_streams_open gauge\n";
        let _ = writeln!(s, "uplink_hub_streams_open {streams}");
        s += "# HELP uplink_hub_kube_requests_total Kube front-end requests by cluster and status.\n# TYPE uplink_hub_kube_requests_total counter\n";
        let clusters = self.clusters.borrow();
        for (c, counts) in clusters.iter() {
            for (code, n) in &counts.requests {
                let _ = writeln!(s, "uplink_hub_kube_requests_total{{cluster=\"{}\",code=\"{code}\"}} {n}", esc(c));
            }
        }
        s += "# HELP uplink_hub_kube_bytes_total Kube front-end body bytes by cluster and direction.\n# TYPE uplink_hub_kube_bytes_total counter\n";
        for (c, ClusterCounts { bytes: (i, o), .. }) in clusters.iter() {
            let _ = writeln!(s, "uplink_hub_kube_bytes_total{{cluster=\"{}\",direction=\"in\"}} {i}", esc(c));
            let _ = writeln!(s, "uplink_hub_kube_bytes_total{{cluster=\"{}\",direction=\"out\"}} {o}", esc(c));
        }
        for (name, help, v) in [
            ("uplink_hub_tunnels_accepted_total", "Agent tunnels accepted.", self.tunnels_accepted.get()),
            ("uplink_hub_activations_total", "Successful activations.", self.activations.get()),
            ("uplink_hub_http_requests_total", "HTTP requests served.", self.http_requests.get()),
            (
                "uplink_hub_connections_refused_total",
                "Connections refused over a connection cap.",
                self.connections_refused.get(),
            ),
            (
                "uplink_hub_slow_clients_closed_total",
                "Connections closed for missing a handshake, head or body deadline.",
                self.slow_closed.get(),
            ),
            ("uplink_hub_handoffs_total", "Requests handed to another replica.", self.handoffs.get()),
            (
                "uplink_hub_handoff_failures_total",
                "Dials to another replica for a hand-off that failed.",
                self.handoff_failures.get(),
            ),
            (
                "uplink_hub_peer_refused_total",
                "Peer-hop requests refused for a missing or wrong credential.",
                self.peer_refused.get(),
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let by_proto = self.by_proto.borrow();
        s += "# HELP uplink_hub_connections Client connections open, by protocol (ALPN).\n# TYPE uplink_hub_connections gauge\n";
        for proto in ["h2", "http/1.1"] {
            let _ =
                writeln!(s, "uplink_hub_connections{{proto=\"{proto}\"}} {}", by_proto.get(proto).map_or(0, |e| e.0));
        }
        s += "# HELP uplink_hub_connections_total Client connections served, by protocol.\n# TYPE uplink_hub_connections_total counter\n";
        for proto in ["h2", "http/1.1"] {
            let _ = writeln!(
                s,
                "uplink_hub_connections_total{{proto=\"{proto}\"}} {}",
                by_proto.get(proto).map_or(0, |e| e.1)
            );
        }
        s += "# HELP uplink_hub_requests_total HTTP requests, by protocol.\n# TYPE uplink_hub_requests_total counter\n";
        for proto in ["h2", "http/1.1"] {
            let _ = writeln!(
                s,
                "uplink_hub_requests_total{{proto=\"{proto}\"}} {}",
                by_proto.get(proto).map_or(0, |e| e.2)
            );
        }
        s += "# HELP uplink_hub_peer_sessions Peer sessions between replicas, by who dialled.\n# TYPE uplink_hub_peer_sessions gauge\n";
        let _ = writeln!(s, "uplink_hub_peer_sessions{{direction=\"out\"}} {}", self.peer_sessions_out.get());
        let _ = writeln!(s, "uplink_hub_peer_sessions{{direction=\"in\"}} {}", self.peer_sessions_in.get());
        s += "# HELP uplink_hub_peer_streams_open Handed-off streams spliced onto this replica's tunnels.\n# TYPE uplink_hub_peer_streams_open gauge\n";
        let _ = writeln!(s, "uplink_hub_peer_streams_open {}", self.peer_streams_in.get());
        s
    }
}

/// The shared store's calls that reached PostgreSQL, by store call
/// (`call="audit_batch"`: batches the audit thread wrote). A proxied
/// request on a warm cache adds none.
pub fn store_queries(queries: &[(&'static str, u64)]) -> String {
    if queries.is_empty() {
        return String::new();
    }
    let mut s = "# HELP uplink_hub_store_queries_total Store calls that reached PostgreSQL, by call.\n\
                 # TYPE uplink_hub_store_queries_total counter\n"
        .to_string();
    for (call, n) in queries {
        let _ = writeln!(s, "uplink_hub_store_queries_total{{call=\"{call}\"}} {n}");
    }
    s
}
