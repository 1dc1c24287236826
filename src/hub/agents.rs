//! The agents' side of the hub: `POST /v1/activate` and `GET /v1/tunnel`
//! (CONVENTIONS.md "Agent ↔ hub HTTP contract").
//!
//! A tunnel's life:
//!
//! ```text
//!  GET /v1/tunnel + credential ─► 401 unknown | 403 deregistered
//!            │ valid
//!            ▼
//!  101 ─► Session (Mux::hub) ─► Hello/Welcome ─► registered in Tunnels,
//!            │                                 cluster ACTIVE, event
//!            ▼ session ends (EOF, timeout, GoAway)
//!  removed; last one gone ─► DISCONNECTED, event
//! ```

use super::clock::now_ms;
use super::http::{Incoming, Reply, Request, Response, Upgraded};
use super::store::{ActivateError, AgentFacts, CredentialStatus};
use super::tunnels::AgentConn;
use super::{Hub, api, status};
use crate::driver::Session;
use crate::proto::{GoAwayCode, Mux};
use crate::secret::{Secret, sha256_hex};
use log::{info, warn};
use serde::Deserialize;
use serde_json::json;
use smol::Timer;
use smol::future::FutureExt;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long an agent has, after the 101, to say `Hello`.
const HANDSHAKE: Duration = Duration::from_secs(20);

#[derive(Deserialize)]
struct ActivateBody {
    activation_id: String,
    activation_code: String,
    #[serde(default)]
    agent_version: String,
    #[serde(default)]
    arch: String,
    #[serde(default)]
    kube_version: String,
    #[serde(default)]
    node_count: u32,
}

/// `POST /v1/activate`: consumes the one-time code, issues the credential.
pub async fn activate(hub: &Hub, _req: &Request, body: &mut Incoming) -> Response {
    let bytes = match body.read_to_end(64 * 1024).await {
        Ok(b) => b,
        Err(e) => return api::error(400, "bad_request", &e.to_string()),
    };
    let b: ActivateBody = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => return api::error(400, "bad_request", &format!("invalid activation request: {e}")),
    };
    let credential = Secret::new(format!("uc_{}", Secret::random(32).expose()));
    let facts = AgentFacts {
        agent_version: b.agent_version,
        arch: b.arch,
        kube_version: b.kube_version,
        node_count: b.node_count,
    };
    let again = "renew the activation with `uplink-hub cluster renew NAME` (or register the cluster if it is not \
                 registered) and install the new activation";
    match hub.store.activate(
        &b.activation_id,
        &sha256_hex(&b.activation_code),
        &sha256_hex(credential.expose()),
        &facts,
        now_ms(),
    ) {
        Ok(c) => {
            super::metrics::Metrics::bump(&hub.metrics.activations);
            info!("cluster activated cluster={} agent_version={} arch={}", c.name, facts.agent_version, facts.arch);
            hub.bus.publish(&c.name, "activated", status(hub, &c));
            Response::json(
                200,
                &json!({
                    "cluster_id": c.id,
                    "cluster": c.name,
                    "credential": credential.expose(),
                    "hub_url": hub.public_url,
                }),
            )
        }
        Err(ActivateError::Unknown) => {
            warn!("activation refused reason=unknown activation_id={:?}", b.activation_id);
            api::error(
                404,
                "unknown_activation",
                &format!("this hub knows no such activation (id or code wrong): {again}"),
            )
        }
        Err(ActivateError::Expired) => {
            api::error(410, "activation_expired", &format!("the activation code expired before it was used: {again}"))
        }
        Err(ActivateError::Used) => api::error(
            409,
            "activation_used",
            "the activation code was already used; an agent of this cluster activated before (reuse its saved state) or \
             deregister the cluster with `uplink-hub cluster deregister NAME`, register it again with \
             `uplink-hub cluster register NAME` and install the new activation",
        ),
        Err(ActivateError::Replaced) => api::error(
            410,
            "activation_replaced",
            "this activation was replaced by a newer one (`uplink-hub cluster renew` or `cluster register --force`): \
             install the newer activation instead",
        ),
        Err(ActivateError::Deregistered) => api::error(
            410,
            "cluster_deregistered",
            "the cluster was deregistered: register it again with `uplink-hub cluster register NAME` and install \
             the new activation",
        ),
        Err(ActivateError::Store(e)) => {
            log::error!("store failed during activation error={e}");
            api::error(500, "internal", "the hub's store failed; retry later")
        }
    }
}

/// Whether the request carries a live agent credential (the connection
/// limits' question; [`tunnel`] answers each refusal in its own words).
pub fn credential_valid(hub: &Hub, req: &Request) -> bool {
    api::bearer(req).is_some_and(|t| matches!(hub.store.credential(&sha256_hex(t)), Ok(CredentialStatus::Valid(_))))
}

/// `GET /v1/tunnel`: authenticates the credential, answers `101`, and
/// runs the session on the upgraded connection ([`session`]) until it
/// ends. HTTP/1.1 only: today's agents ask so, and the tunnel wants the
/// raw socket (its own multiplexing, `TCP_NOTSENT_LOWAT`), not a stream
/// inside someone else's.
pub fn tunnel(hub: &Rc<Hub>, req: &Request, body: &mut Incoming, peer: SocketAddr) -> Reply {
    let wants = req.upgrade().is_some_and(|u| u.eq_ignore_ascii_case("uplink/1"));
    if !wants {
        return Reply::Send(
            api::error(426, "upgrade_required", "send Connection: Upgrade and Upgrade: uplink/1")
                .with_header("Upgrade", "uplink/1"),
        );
    }
    let Some(token) = api::bearer(req) else {
        return Reply::Send(api::error(
            401,
            "unauthorized",
            "no agent credential: send Authorization: Bearer CREDENTIAL",
        ));
    };
    let cluster = match hub.store.credential(&sha256_hex(token)) {
        Ok(CredentialStatus::Valid(c)) => c,
        Ok(CredentialStatus::Revoked(c)) => {
            info!("tunnel refused reason=deregistered cluster={} peer={peer}", c.name);
            return Reply::Send(api::error(
                403,
                "cluster_deregistered",
                &format!("cluster {} was deregistered; this agent must stop (remove it from the cluster)", c.name),
            ));
        }
        Ok(CredentialStatus::Unknown) => {
            warn!("tunnel refused reason=unknown_credential peer={peer}");
            return Reply::Send(api::error(
                401,
                "unauthorized",
                "this hub does not know the agent credential; activate again",
            ));
        }
        Err(e) => {
            log::error!("store failed error={e}");
            return Reply::Send(api::error(503, "unavailable", "the hub's store failed; retry later"));
        }
    };
    if hub.draining.get() {
        return Reply::Send(api::error(503, "shutting_down", "the hub is shutting down; reconnect"));
    }
    let Some(on) = body.take_upgrade() else {
        return Reply::Send(api::error(400, "bad_request", "the agent tunnel is an HTTP/1.1 upgrade"));
    };
    let hub = hub.clone();
    let fields: &[(&[u8], &[u8])] = &[(b"Connection", b"Upgrade"), (b"Upgrade", b"uplink/1")];
    super::http::switch(on, fields, move |up| session(hub, cluster, up, peer))
        .unwrap_or_else(|| Reply::Send(api::error(500, "internal", "the 101 could not be built")))
}

/// An agent's tunnel session on its upgraded connection: the raw TLS
/// stream and the bytes the agent sent after its request head.
pub async fn session(hub: Rc<Hub>, cluster: super::store::Cluster, up: Upgraded, peer: SocketAddr) {
    if let Err(e) = super::rt::tunnel_socket(up.get_ref()) {
        log::debug!("TCP_NOTSENT_LOWAT not set on the tunnel peer={peer}: {e}");
    }
    let hub = &hub;
    super::metrics::Metrics::bump(&hub.metrics.tunnels_accepted);
    let session_id = hub.tunnels.next_session_id();
    let session = Session::new(Mux::hub(hub.tunnel_config.clone(), session_id, Instant::now()));
    // Sent right after Welcome to an agent that announced CAP_REPLICAS.
    if let Some(set) = hub.replicas.set() {
        session.set_replicas(set);
    }
    let io = up;
    let registered = std::cell::Cell::new(false);
    let setup = async {
        match session
            .connected()
            .or(async {
                Timer::after(HANDSHAKE).await;
                Err(crate::proto::SessionError::Timeout)
            })
            .await
        {
            Ok((Some(hello), _)) => {
                let facts = AgentFacts {
                    agent_version: hello.agent_version,
                    arch: hello.arch,
                    kube_version: hello.kube_version,
                    node_count: hello.node_count,
                };
                let now = now_ms();
                let conn = Rc::new(AgentConn {
                    session: session.clone(),
                    session_id,
                    connected_at: now,
                    facts: facts.clone(),
                    peer: peer.to_string(),
                });
                let first = hub.tunnels.add(&cluster.id, conn);
                // The set may have changed during the handshake, before
                // this tunnel was in the list a change is pushed to.
                if let Some(set) = hub.replicas.set() {
                    session.set_replicas(set);
                }
                registered.set(true);
                let _ = hub.store.agent_connected(&cluster.id, &facts, now);
                let _ = hub.store.add_event(
                    &cluster.id,
                    "connected",
                    &format!(
                        "agent {} ({}) connected from {peer}, session {session_id}",
                        facts.agent_version, facts.arch
                    ),
                    now,
                );
                info!(
                    "agent connected cluster={} session={session_id} peer={peer} agent_version={} arch={} kube_version={} nodes={}",
                    cluster.name, facts.agent_version, facts.arch, facts.kube_version, facts.node_count
                );
                if first {
                    hub.bus.publish(&cluster.name, "connected", "ACTIVE");
                }
                if hub.draining.get() {
                    session.go_away(GoAwayCode::ShuttingDown, "hub shutting down; reconnect");
                }
            }
            Ok((None, _)) => session.close(GoAwayCode::ProtocolError, "no Hello"),
            Err(e) => {
                warn!("tunnel handshake failed cluster={} peer={peer} error={e:?}", cluster.name);
                session.close(GoAwayCode::Timeout, "no Hello in time");
            }
        }
        std::future::pending::<crate::proto::SessionError>().await
    };
    let why = session.run(io).or(setup).await;
    if registered.get() {
        let now = now_ms();
        let last = hub.tunnels.remove(&cluster.id, session_id);
        let _ = hub.store.add_event(&cluster.id, "disconnected", &format!("session {session_id} ended: {why:?}"), now);
        info!("agent disconnected cluster={} session={session_id} reason={why:?}", cluster.name);
        if last {
            let _ = hub.store.agents_gone(&cluster.id, now);
            let st = match hub.store.cluster(&cluster.name) {
                Ok(Some(c)) if c.id == cluster.id => status(hub, &c),
                _ => "DEREGISTERED",
            };
            hub.bus.publish(&cluster.name, "disconnected", st);
        }
    }
}
