//! The request pipeline: TLS accept, authentication, impersonation,
//! authorization, then the handlers (discovery, CRUD, watch, logs, exec,
//! port-forward, reviews). Mirrors kube-apiserver's filter order.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use super::discovery::{self, ResDef};
use super::http::{Conn, MAX_BODY, POLL, ReadError, Request};
use super::rbac::{self, Attrs, UserInfo};
use super::store::{self, Store, StoreError};
use super::{RequestRecord, Shared, proto, spdy, status, ws};

// ---- TLS ----------------------------------------------------------------------

/// A fresh CA, a server certificate for 127.0.0.1/localhost signed by it,
/// and a rustls config that asks for (but does not require) client certs.
pub fn tls_config() -> (rcgen::Certificate, rcgen::KeyPair, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "standin-kube-ca");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().expect("ca key");
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");

    let mut sp =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string(), "kubernetes".to_string()])
            .expect("server params");
    sp.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().expect("server key");
    let server_cert = sp.signed_by(&server_key, &ca_cert, &ca_key).expect("server cert");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).expect("root");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .expect("verifier");
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server_cert.der().clone()], key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca_cert, ca_key, cfg)
}

pub fn accept_loop(listener: TcpListener, config: Arc<rustls::ServerConfig>, shared: Arc<Shared>) {
    for sock in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(sock) = sock else { continue };
        let (config, shared) = (config.clone(), shared.clone());
        // Detached: every connection thread polls `stopping` and ends soon after stop().
        let _ = std::thread::Builder::new().name("standin-conn".into()).spawn(move || serve_conn(sock, config, shared));
    }
}

fn serve_conn(sock: TcpStream, config: Arc<rustls::ServerConfig>, shared: Arc<Shared>) {
    let _ = sock.set_nodelay(true);
    let _ = sock.set_read_timeout(Some(POLL));
    let Ok(tls) = rustls::ServerConnection::new(config) else { return };
    let mut tls = rustls::StreamOwned::new(tls, sock);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tls.conn.is_handshaking() {
        match tls.conn.complete_io(&mut tls.sock) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if Instant::now() > deadline || shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let cert_user = tls.conn.peer_certificates().and_then(|c| c.first()).and_then(|c| rbac::cert_identity(c));
    let mut conn = Conn { tls, buf: Vec::new(), stopping: shared.stopping.clone() };
    loop {
        match conn.read_request() {
            Ok(req) => {
                if !handle(&mut conn, req, cert_user.as_ref(), &shared) {
                    break;
                }
            }
            Err(ReadError::Closed) => break,
            Err(ReadError::BadRequest(m)) => {
                let body = serde_json::to_vec(&status(400, "BadRequest", &m, json!({}))).unwrap_or_default();
                let _ = conn.write_head(400, &[("Content-Type", "application/json".into())], Some(body.len()));
                let _ = conn.write_all(&body);
                break;
            }
            Err(ReadError::HeadTooLarge) => {
                let _ = conn.write_head(431, &[("Connection", "close".into())], Some(0));
                let _ = conn.write_all(b"");
                break;
            }
            Err(ReadError::BodyTooLarge(req)) => {
                let rec = new_record(&req);
                let mut ex = Ex { conn: &mut conn, shared: &shared, rec: Some(rec) };
                let msg = format!("Request entity too large: limit is {MAX_BODY}");
                ex.status(status(413, "RequestEntityTooLarge", &msg, json!({})));
                break;
            }
        }
    }
    conn.tls.conn.send_close_notify();
    let _ = conn.tls.flush_close();
}

trait FlushClose {
    fn flush_close(&mut self) -> std::io::Result<()>;
}

impl FlushClose for super::http::Tls {
    fn flush_close(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        self.flush()
    }
}

// ---- Exchange: one request and its answer ----------------------------------------

pub struct Ex<'a> {
    pub conn: &'a mut Conn,
    pub shared: &'a Shared,
    pub rec: Option<RequestRecord>,
}

impl Ex<'_> {
    /// Writes the head and files the request record.
    pub fn head(&mut self, code: u16, headers: &[(&str, String)], len: Option<usize>) -> std::io::Result<()> {
        if let Some(mut r) = self.rec.take() {
            r.status = code;
            self.shared.records.lock().unwrap_or_else(|e| e.into_inner()).push(r);
        }
        self.conn.write_head(code, headers, len)
    }

    pub fn body(&mut self, code: u16, content_type: &str, body: &[u8]) {
        let h = [("Content-Type", content_type.to_string()), ("Cache-Control", "no-cache, private".to_string())];
        if self.head(code, &h, Some(body.len())).is_ok() {
            let _ = self.conn.write_all(body);
        }
    }

    pub fn json(&mut self, code: u16, v: &Value) {
        let body = serde_json::to_vec(v).unwrap_or_default();
        self.body(code, "application/json", &body);
    }

    pub fn status(&mut self, s: Value) {
        let code = s["code"].as_u64().unwrap_or(500) as u16;
        self.json(code, &s);
    }
}

fn new_record(req: &Request) -> RequestRecord {
    RequestRecord {
        method: req.method.clone(),
        path: req.path.clone(),
        query: req.raw_query.clone(),
        had_authorization: req.header("authorization").is_some(),
        impersonate_headers: req.headers.iter().filter(|(n, _)| n.starts_with("impersonate-")).cloned().collect(),
        ..Default::default()
    }
}

fn not_found_resource() -> Value {
    status(404, "NotFound", "the server could not find the requested resource", json!({}))
}

fn bad_request(msg: &str) -> Value {
    status(400, "BadRequest", msg, json!({}))
}

fn store_error(r: &ResDef, name: &str, e: StoreError) -> Value {
    let mut details = json!({"name": name, "kind": r.plural});
    if !r.group.is_empty() {
        details["group"] = json!(r.group);
    }
    let q = r.qualified();
    match e {
        StoreError::NotFound => status(404, "NotFound", &format!("{q} {name:?} not found"), details),
        StoreError::AlreadyExists => status(409, "AlreadyExists", &format!("{q} {name:?} already exists"), details),
        StoreError::Conflict => status(
            409,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {q} {name:?}: the object has been modified; please apply your changes to the latest version and try again"
            ),
            details,
        ),
        StoreError::Invalid(m) => status(422, "Invalid", &format!("{} {name:?} is invalid: {m}", r.kind), details),
    }
}

// ---- Request info ---------------------------------------------------------------

/// What the path and method say about a request (`RequestInfoFactory`).
#[derive(Clone, Debug, Default)]
pub struct Info {
    pub attrs: Attrs,
    pub version: String,
    /// Path parts after the subresource (unused by the stand-in).
    pub extra_parts: usize,
}

pub fn request_info(req: &Request) -> Info {
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let non_resource = || Info {
        attrs: Attrs { verb: req.method.to_ascii_lowercase(), path: req.path.clone(), ..Default::default() },
        ..Default::default()
    };
    let (group, version, mut rest) = match segs.as_slice() {
        ["api", v, rest @ ..] if !rest.is_empty() => ("", *v, rest.to_vec()),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => (*g, *v, rest.to_vec()),
        _ => return non_resource(),
    };
    let mut verb = match req.method.as_str() {
        "GET" | "HEAD" => "get",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => "",
    }
    .to_string();
    if rest.first() == Some(&"watch") {
        verb = "watch".into();
        rest.remove(0);
    }
    let mut namespace = String::new();
    if rest.first() == Some(&"namespaces") && rest.len() > 1 {
        namespace = rest[1].to_string();
        if rest.len() > 2 && !["status", "finalize"].contains(&rest[2]) {
            rest.drain(..2);
        }
    }
    let resource = rest.first().copied().unwrap_or("").to_string();
    let mut name = rest.get(1).copied().unwrap_or("").to_string();
    let subresource = rest.get(2).copied().unwrap_or("").to_string();
    if name.is_empty() && verb == "get" {
        verb = if req.query_true("watch") { "watch" } else { "list" }.into();
    }
    if name.is_empty() && verb == "delete" {
        verb = "deletecollection".into();
    }
    if name.is_empty() && ["list", "watch"].contains(&verb.as_str()) {
        if let Some(fs) = req.query("fieldSelector") {
            for term in fs.split(',') {
                if let Some(v) = term.strip_prefix("metadata.name=").or_else(|| term.strip_prefix("metadata.name==")) {
                    name = v.to_string();
                }
            }
        }
    }
    Info {
        attrs: Attrs {
            verb,
            resource_request: true,
            namespace,
            api_group: group.to_string(),
            resource,
            subresource,
            name,
            path: req.path.clone(),
        },
        version: version.to_string(),
        extra_parts: rest.len().saturating_sub(3),
    }
}

// ---- Authentication and impersonation ---------------------------------------------

fn authenticate(req: &Request, cert_user: Option<&(String, Vec<String>)>, shared: &Shared) -> Option<UserInfo> {
    if let Some(auth) = req.header("authorization") {
        let token = auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("bearer "))?.trim();
        return shared.lock().tokens.get(token).cloned();
    }
    let (cn, orgs) = cert_user?;
    let mut groups = orgs.clone();
    groups.push("system:authenticated".into());
    Some(UserInfo { name: cn.clone(), groups, ..Default::default() })
}

/// Applies `Impersonate-*` headers (the `WithImpersonation` filter).
fn impersonate(req: &Request, real: &UserInfo, store: &Store) -> Result<Option<UserInfo>, Value> {
    let user = req.header("impersonate-user").unwrap_or("").to_string();
    let groups: Vec<String> =
        req.headers.iter().filter(|(n, _)| n == "impersonate-group").map(|(_, v)| v.clone()).collect();
    let uid = req.header("impersonate-uid").map(str::to_string);
    let mut extra = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (n, v) in &req.headers {
        if let Some(k) = n.strip_prefix("impersonate-extra-") {
            extra.entry(super::http::percent_decode(k).to_ascii_lowercase()).or_default().push(v.clone());
        }
    }
    if user.is_empty() {
        if groups.is_empty() && extra.is_empty() && uid.is_none() {
            return Ok(None);
        }
        let mut reqs: Vec<String> =
            groups.iter().map(|g| format!("{{Group  {g}   authentication.k8s.io/v1  }}")).collect();
        for (k, vs) in &extra {
            for v in vs {
                reqs.push(format!("{{UserExtra {k} {v}   authentication.k8s.io/v1  }}"));
            }
        }
        if let Some(u) = &uid {
            reqs.push(format!("{{UID  {u}   authentication.k8s.io/v1  }}"));
        }
        return Err(bad_request(&format!("requested [{}] without impersonating a user", reqs.join(" "))));
    }
    let check = |a: Attrs| -> Result<(), Value> {
        if rbac::authorize(store, real, &a) { Ok(()) } else { Err(rbac::forbidden_status(&real.name, &a)) }
    };
    let imp = |resource: &str, group: &str, sub: &str, ns: &str, name: &str| Attrs {
        verb: "impersonate".into(),
        resource_request: true,
        namespace: ns.into(),
        api_group: group.into(),
        resource: resource.into(),
        subresource: sub.into(),
        name: name.into(),
        path: req.path.clone(),
    };
    let sa = user.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':'));
    match sa {
        Some((ns, name)) => check(imp("serviceaccounts", "", "", ns, name))?,
        None => check(imp("users", "", "", "", &user))?,
    }
    for g in &groups {
        check(imp("groups", "", "", "", g))?;
    }
    if let Some(u) = &uid {
        check(imp("uids", "authentication.k8s.io", "", "", u))?;
    }
    for (k, vs) in &extra {
        for v in vs {
            check(imp("userextras", "authentication.k8s.io", k, "", v))?;
        }
    }
    let mut all = groups.clone();
    if let Some((ns, _)) = sa {
        if groups.is_empty() {
            all = vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{ns}")];
        }
    }
    if user != "system:anonymous" && !all.iter().any(|g| g == "system:authenticated" || g == "system:unauthenticated") {
        all.push("system:authenticated".into());
    }
    Ok(Some(UserInfo { name: user, uid: uid.unwrap_or_default(), groups: all, extra }))
}

// ---- The pipeline ---------------------------------------------------------------

/// Serves one request; false when the connection must close afterwards.
fn handle(conn: &mut Conn, req: Request, cert_user: Option<&(String, Vec<String>)>, shared: &Shared) -> bool {
    let info = request_info(&req);
    let mut rec = new_record(&req);
    rec.verb = info.attrs.verb.clone();
    let mut ex = Ex { conn, shared, rec: Some(rec) };

    let Some(real) = authenticate(&req, cert_user, shared) else {
        ex.status(status(401, "Unauthorized", "Unauthorized", json!({})));
        return true;
    };
    if let Some(r) = ex.rec.as_mut() {
        r.user = Some(real.name.clone());
        r.groups = real.groups.clone();
    }
    let effective = {
        let st = shared.lock();
        match impersonate(&req, &real, &st.store) {
            Ok(Some(u)) => u,
            Ok(None) => real.clone(),
            Err(s) => {
                drop(st);
                ex.status(s);
                return true;
            }
        }
    };
    if let Some(r) = ex.rec.as_mut() {
        if effective != real {
            r.impersonated_user = Some(effective.name.clone());
            r.impersonated_groups =
                req.headers.iter().filter(|(n, _)| n == "impersonate-group").map(|(_, v)| v.clone()).collect();
        }
        r.effective_user = Some(effective.name.clone());
        r.effective_groups = effective.groups.clone();
    }
    let allowed = rbac::authorize(&shared.lock().store, &effective, &info.attrs);
    if !allowed {
        ex.status(rbac::forbidden_status(&effective.name, &info.attrs));
        return true;
    }
    if !info.attrs.resource_request {
        serve_non_resource(&mut ex, &req);
        return true;
    }
    serve_resource(&mut ex, &req, &info, &effective)
}

fn serve_non_resource(ex: &mut Ex, req: &Request) {
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    if req.method != "GET" && req.method != "HEAD" {
        ex.status(status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            json!({}),
        ));
        return;
    }
    let v = match segs.as_slice() {
        ["version"] => Some(discovery::version()),
        ["healthz"] | ["livez"] | ["readyz"] => {
            ex.body(200, "text/plain; charset=utf-8", b"ok");
            return;
        }
        ["api"] => Some(discovery::api_versions()),
        ["apis"] => Some(discovery::api_group_list()),
        ["api", v] => discovery::resource_list("", v),
        ["apis", g] => discovery::api_group(g),
        ["apis", g, v] => discovery::resource_list(g, v),
        _ => None,
    };
    match v {
        Some(v) => ex.json(200, &v),
        None => ex.status(status(404, "NotFound", "the server could not find the requested resource", json!({}))),
    }
}

fn serve_resource(ex: &mut Ex, req: &Request, info: &Info, user: &UserInfo) -> bool {
    let a = &info.attrs;
    let Some(r) = discovery::find(&a.api_group, &info.version, &a.resource) else {
        ex.status(not_found_resource());
        return true;
    };
    if info.extra_parts > 0 || (!a.subresource.is_empty() && !r.has_sub(&a.subresource)) {
        ex.status(not_found_resource());
        return true;
    }
    let ns = if r.namespaced { a.namespace.as_str() } else { "" };
    if r.is_review() {
        if a.verb != "create" {
            ex.status(status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                json!({}),
            ));
        } else {
            review(ex, req, r, user);
        }
        return true;
    }
    match (a.verb.as_str(), a.subresource.as_str()) {
        ("get", "log") => return logs(ex, req, ns, &a.name),
        (_, "exec" | "attach") => return super::ws::exec_entry(ex, req, ns, &a.name, &a.subresource),
        (_, "portforward") => return portforward(ex, req, ns, &a.name),
        ("watch", _) => return watch(ex, req, r, ns, &a.name),
        ("list", _) => list(ex, req, r, ns),
        ("get", _) => {
            let st = ex.shared.lock();
            let got = st.store.get(r, ns, &a.name).cloned();
            drop(st);
            match got {
                Some(o) if discovery::wants_table(req.header("accept")) => {
                    let rv = o["metadata"]["resourceVersion"].as_str().unwrap_or("").to_string();
                    ex.json(200, &discovery::table(r, &[o], &rv, None, req.query("includeObject"), true))
                }
                Some(o) => ex.json(200, &o),
                None => ex.status(store_error(r, &a.name, StoreError::NotFound)),
            }
        }
        ("create", "") => {
            let Some(obj) = parse_body(ex, req) else { return true };
            if !check_ns(ex, r, ns) {
                return true;
            }
            if let Some(k) = obj["kind"].as_str() {
                if k != r.kind {
                    let msg = format!(
                        "the API version in the data ({}) does not match the expected API version ({})",
                        obj["apiVersion"].as_str().unwrap_or(""),
                        r.api_version()
                    );
                    if obj["apiVersion"].as_str().is_some_and(|v| v != r.api_version()) {
                        ex.status(bad_request(&msg));
                        return true;
                    }
                }
            }
            if r.namespaced {
                if let Some(body_ns) = obj["metadata"]["namespace"].as_str() {
                    if !body_ns.is_empty() && body_ns != ns {
                        ex.status(bad_request(
                            "the namespace of the provided object does not match the namespace sent on the request",
                        ));
                        return true;
                    }
                }
            }
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            let res = ex.shared.lock().store.create(r, ns, obj);
            ex.shared.changed.notify_all();
            match res {
                Ok(o) => ex.json(201, &o),
                Err(e) => ex.status(store_error(r, &name, e)),
            }
        }
        ("update", "" | "status") => {
            let Some(obj) = parse_body(ex, req) else { return true };
            let res = ex.shared.lock().store.update(r, ns, &a.name, obj);
            ex.shared.changed.notify_all();
            match res {
                Ok(o) => ex.json(200, &o),
                Err(e) => ex.status(store_error(r, &a.name, e)),
            }
        }
        ("patch", "" | "status") => patch(ex, req, r, ns, &a.name),
        ("delete", "") => {
            let res = ex.shared.lock().store.delete(r, ns, &a.name);
            ex.shared.changed.notify_all();
            match res {
                Ok(o) => ex.json(200, &o),
                Err(e) => ex.status(store_error(r, &a.name, e)),
            }
        }
        ("deletecollection", "") => {
            let Some((labels, fields)) = selectors(ex, req, r) else { return true };
            let mut st = ex.shared.lock();
            let victims: Vec<String> = st
                .store
                .list(r, ns)
                .into_iter()
                .filter(|o| store::labels_match(&labels, o) && store::fields_match(r, &fields, o))
                .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_string))
                .collect();
            let mut items = Vec::new();
            for n in victims {
                let ons = if r.namespaced && ns.is_empty() { String::new() } else { ns.to_string() };
                if let Ok(o) = st.store.delete(r, &ons, &n) {
                    items.push(o);
                }
            }
            let rv = st.store.rv.to_string();
            drop(st);
            ex.shared.changed.notify_all();
            ex.json(200, &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": {"resourceVersion": rv}, "items": items}));
        }
        _ => ex.status(status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            json!({}),
        )),
    }
    true
}

fn check_ns(ex: &mut Ex, r: &ResDef, ns: &str) -> bool {
    if !r.namespaced {
        return true;
    }
    let nsdef = discovery::find("", "v1", "namespaces").expect("namespaces");
    if ex.shared.lock().store.get(nsdef, "", ns).is_some() {
        return true;
    }
    ex.status(status(
        404,
        "NotFound",
        &format!("namespaces {ns:?} not found"),
        json!({"name": ns, "kind": "namespaces"}),
    ));
    false
}

fn parse_body(ex: &mut Ex, req: &Request) -> Option<Value> {
    let ct = req.header("content-type").unwrap_or("application/json");
    if ct.starts_with("application/vnd.kubernetes.protobuf") {
        if let Some(v) = proto::decode_object(&req.body) {
            return Some(v);
        }
        ex.status(status(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml",
            json!({}),
        ));
        return None;
    }
    let parsed: Result<Value, String> = if ct.starts_with("application/yaml") {
        serde_yaml::from_slice::<Value>(&req.body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice::<Value>(&req.body).map_err(|e| e.to_string())
    };
    match parsed {
        Ok(v) if v.is_object() => Some(v),
        Ok(_) => {
            ex.status(bad_request("the object provided is unrecognized (must be of type object)"));
            None
        }
        Err(e) => {
            ex.status(bad_request(&format!("error decoding request body: {e}")));
            None
        }
    }
}

fn selectors(ex: &mut Ex, req: &Request, r: &ResDef) -> Option<(Vec<store::LabelReq>, Vec<store::FieldReq>)> {
    let labels = match store::parse_labels(req.query("labelSelector").unwrap_or("")) {
        Ok(l) => l,
        Err(e) => {
            ex.status(bad_request(&e));
            return None;
        }
    };
    let fields = match store::parse_fields(r, req.query("fieldSelector").unwrap_or("")) {
        Ok(f) => f,
        Err(e) => {
            ex.status(bad_request(&e));
            return None;
        }
    };
    Some((labels, fields))
}

fn list(ex: &mut Ex, req: &Request, r: &ResDef, ns: &str) {
    let Some((labels, fields)) = selectors(ex, req, r) else { return };
    let limit: usize = match req.query("limit").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            ex.status(bad_request("invalid limit"));
            return;
        }
    };
    let start_after = match req.query("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => match base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(c)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
        {
            Some(s) => Some(s),
            None => {
                ex.status(bad_request("continue key is not valid: illegal base64 data"));
                return;
            }
        },
    };
    let st = ex.shared.lock();
    let rv = st.store.rv.to_string();
    let all: Vec<Value> = st
        .store
        .list(r, ns)
        .into_iter()
        .filter(|o| store::labels_match(&labels, o) && store::fields_match(r, &fields, o))
        .collect();
    drop(st);
    let key = |o: &Value| {
        format!(
            "{}/{}",
            o["metadata"]["namespace"].as_str().unwrap_or(""),
            o["metadata"]["name"].as_str().unwrap_or("")
        )
    };
    let mut items: Vec<Value> = all.into_iter().filter(|o| start_after.as_ref().is_none_or(|s| key(o) > *s)).collect();
    let mut cont = None;
    let mut remaining = 0;
    if limit > 0 && items.len() > limit {
        remaining = items.len() - limit;
        items.truncate(limit);
        cont = items.last().map(|o| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key(o)));
    }
    if discovery::wants_table(req.header("accept")) {
        ex.json(200, &discovery::table(r, &items, &rv, cont.as_deref(), req.query("includeObject"), true));
        return;
    }
    let mut meta = json!({"resourceVersion": rv});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
        meta["remainingItemCount"] = json!(remaining);
    }
    ex.json(
        200,
        &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": meta, "items": items}),
    );
}

fn patch(ex: &mut Ex, req: &Request, r: &ResDef, ns: &str, name: &str) {
    let ct = req.header("content-type").unwrap_or("").split(';').next().unwrap_or("").trim().to_string();
    let patch: Value = match serde_json::from_slice(&req.body) {
        Ok(p) => p,
        Err(e) => {
            ex.status(bad_request(&format!("error decoding patch: {e}")));
            return;
        }
    };
    let mut st = ex.shared.lock();
    let Some(mut obj) = st.store.get(r, ns, name).cloned() else {
        drop(st);
        ex.status(store_error(r, name, StoreError::NotFound));
        return;
    };
    let applied = match ct.as_str() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            if !patch.is_object() {
                Err("patch must be a JSON object".to_string())
            } else {
                store::merge_patch(&mut obj, &patch);
                Ok(())
            }
        }
        "application/json-patch+json" => store::json_patch(&mut obj, &patch),
        other => {
            drop(st);
            ex.status(status(
                415,
                "UnsupportedMediaType",
                &format!("the server does not support the patch type {other:?}"),
                json!({}),
            ));
            return;
        }
    };
    if let Err(e) = applied {
        drop(st);
        ex.status(status(422, "Invalid", &e, json!({"name": name, "kind": r.plural})));
        return;
    }
    // A patch never conflicts on resourceVersion unless the patch says so.
    if patch.pointer("/metadata/resourceVersion").is_none() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
    }
    let res = st.store.update(r, ns, name, obj);
    drop(st);
    ex.shared.changed.notify_all();
    match res {
        Ok(o) => ex.json(200, &o),
        Err(e) => ex.status(store_error(r, name, e)),
    }
}

// ---- Watch ------------------------------------------------------------------------

fn watch(ex: &mut Ex, req: &Request, r: &ResDef, ns: &str, name: &str) -> bool {
    let Some((labels, mut fields)) = selectors(ex, req, r) else { return true };
    if !name.is_empty() && !fields.iter().any(|(k, _, _)| k == "metadata.name") {
        fields.push(("metadata.name".into(), name.into(), true));
    }
    let table = discovery::wants_table(req.header("accept"));
    let include = req.query("includeObject").map(str::to_string);
    let bookmarks = req.query_true("allowWatchBookmarks");
    let deadline = req
        .query("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|s| Instant::now() + Duration::from_secs(s));
    let since: Option<u64> =
        req.query("resourceVersion").filter(|v| !v.is_empty() && *v != "0").and_then(|v| v.parse().ok());
    let matches = |o: &Value| {
        (ns.is_empty() || o["metadata"]["namespace"].as_str() == Some(ns))
            && store::labels_match(&labels, o)
            && store::fields_match(r, &fields, o)
    };
    let id = store::res_id(r);
    let (mut initial, mut next) = {
        let st = ex.shared.lock();
        let initial: Vec<(&'static str, Value)> = match since {
            None => st.store.list(r, ns).into_iter().filter(|o| matches(o)).map(|o| ("ADDED", o)).collect(),
            Some(v) => st
                .store
                .events
                .iter()
                .filter(|e| e.rv > v && e.key.0 == id && matches(&e.object))
                .map(|e| (e.kind, e.object.clone()))
                .collect(),
        };
        (initial, st.store.events.len())
    };
    let h = [("Content-Type", "application/json".to_string()), ("Cache-Control", "no-cache, private".to_string())];
    if ex.head(200, &h, None).is_err() {
        return false;
    }
    let mut first = true;
    let mut encode = |kind: &str, o: Value| -> Vec<u8> {
        let obj = if table && kind != "BOOKMARK" {
            let rv = o["metadata"]["resourceVersion"].as_str().unwrap_or("").to_string();
            let t = discovery::table(r, &[o], &rv, None, include.as_deref(), first);
            first = false;
            t
        } else {
            o
        };
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap_or_default();
        line.push(b'\n');
        line
    };
    let bookmark = |rv: u64| json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
    let mut out = Vec::new();
    for (k, o) in initial.drain(..) {
        out.extend(encode(k, o));
    }
    if bookmarks && req.query_true("sendInitialEvents") {
        let rv = ex.shared.lock().store.rv;
        out.extend(encode("BOOKMARK", bookmark(rv)));
    }
    if ex.conn.write_chunk(&out).is_err() {
        return false;
    }
    let mut last_bookmark = Instant::now();
    loop {
        let mut out = Vec::new();
        {
            let st = ex.shared.lock();
            let (st, _) = ex
                .shared
                .changed
                .wait_timeout_while(st, POLL * 2, |st| {
                    st.store.events.len() == next && !ex.shared.stopping.load(Ordering::SeqCst)
                })
                .unwrap_or_else(|e| e.into_inner());
            for e in &st.store.events[next..] {
                if e.key.0 == id && since.is_none_or(|v| e.rv > v) && matches(&e.object) {
                    out.push((e.kind, e.object.clone()));
                }
            }
            next = st.store.events.len();
            if bookmarks && last_bookmark.elapsed() > Duration::from_secs(5) {
                let rv = st.store.rv;
                out.push(("BOOKMARK", json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": rv.to_string()}})));
                last_bookmark = Instant::now();
            }
        }
        let bytes: Vec<u8> = out.into_iter().flat_map(|(k, o)| encode(k, o)).collect();
        if ex.conn.write_chunk(&bytes).is_err() {
            return false;
        }
        if ex.shared.stopping.load(Ordering::SeqCst) || deadline.is_some_and(|d| Instant::now() > d) {
            let _ = ex.conn.end_chunks();
            return !ex.shared.stopping.load(Ordering::SeqCst);
        }
        if ex.conn.peer_gone() {
            return false;
        }
    }
}

// ---- Logs -------------------------------------------------------------------------

fn pod_or_404(ex: &mut Ex, ns: &str, name: &str) -> Option<Value> {
    let pods = discovery::find("", "v1", "pods").expect("pods");
    let pod = ex.shared.lock().store.get(pods, ns, name).cloned();
    if pod.is_none() {
        ex.status(store_error(pods, name, StoreError::NotFound));
    }
    pod
}

fn check_container(ex: &mut Ex, req: &Request, pod: &Value, name: &str) -> bool {
    let Some(c) = req.query("container").filter(|c| !c.is_empty()) else { return true };
    let known = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(|x| x["name"].as_str() == Some(c)));
    if !known {
        ex.status(bad_request(&format!("container {c} is not valid for pod {name}")));
    }
    known
}

fn logs(ex: &mut Ex, req: &Request, ns: &str, name: &str) -> bool {
    let Some(pod) = pod_or_404(ex, ns, name) else { return true };
    if !check_container(ex, req, &pod, name) {
        return true;
    }
    let key = (ns.to_string(), name.to_string());
    let tail: Option<usize> = req.query("tailLines").and_then(|t| t.parse().ok());
    let lines = ex.shared.lock().logs.get(&key).cloned().unwrap_or_default();
    let skip = tail.map_or(0, |t| lines.len().saturating_sub(t));
    let text: String = lines[skip..].iter().map(|l| format!("{l}\n")).collect();
    if !req.query_true("follow") {
        ex.body(200, "text/plain", text.as_bytes());
        return true;
    }
    if ex.head(200, &[("Content-Type", "text/plain".into())], None).is_err()
        || ex.conn.write_chunk(text.as_bytes()).is_err()
    {
        return false;
    }
    let mut sent = lines.len();
    let pods = discovery::find("", "v1", "pods").expect("pods");
    loop {
        let (more, gone) = {
            let st = ex.shared.lock();
            let (st, _) = ex
                .shared
                .changed
                .wait_timeout_while(st, POLL * 2, |st| {
                    st.logs.get(&key).map_or(0, Vec::len) == sent && !ex.shared.stopping.load(Ordering::SeqCst)
                })
                .unwrap_or_else(|e| e.into_inner());
            let all = st.logs.get(&key).cloned().unwrap_or_default();
            let more: String = all[sent.min(all.len())..].iter().map(|l| format!("{l}\n")).collect();
            sent = all.len();
            (more, st.store.get(pods, ns, name).is_none())
        };
        if ex.conn.write_chunk(more.as_bytes()).is_err() {
            return false;
        }
        if gone || ex.shared.stopping.load(Ordering::SeqCst) {
            let _ = ex.conn.end_chunks();
            return false;
        }
        if ex.conn.peer_gone() {
            return false;
        }
    }
}

// ---- Port-forward -------------------------------------------------------------------

fn portforward(ex: &mut Ex, req: &Request, ns: &str, name: &str) -> bool {
    let Some(_pod) = pod_or_404(ex, ns, name) else { return true };
    match req.upgrade().as_deref() {
        Some("websocket") => {
            let protos = ws::offered_protocols(req);
            if !protos.iter().any(|p| p == spdy::TUNNEL_PROTOCOL) {
                ex.status(bad_request(&format!("unable to upgrade: no supported protocol in {protos:?}")));
                return true;
            }
            if ws::accept(ex, req, spdy::TUNNEL_PROTOCOL).is_err() {
                return false;
            }
            let mut pipe = ws::WsPipe::new(ex.conn);
            spdy::serve_portforward(&mut pipe, ex.shared, ns, name);
            false
        }
        Some(u) if u.starts_with("spdy/3.1") => {
            let h = [
                ("Connection", "Upgrade".to_string()),
                ("Upgrade", "SPDY/3.1".to_string()),
                ("X-Stream-Protocol-Version", "portforward.k8s.io".to_string()),
            ];
            if ex.head(101, &h, Some(0)).is_err() || ex.conn.write_all(b"").is_err() {
                return false;
            }
            let mut pipe = spdy::RawPipe { conn: ex.conn };
            spdy::serve_portforward(&mut pipe, ex.shared, ns, name);
            false
        }
        _ => {
            ex.status(bad_request("Upgrade request required"));
            true
        }
    }
}

// ---- Reviews --------------------------------------------------------------------------

fn review(ex: &mut Ex, req: &Request, r: &ResDef, user: &UserInfo) {
    let ct = req.header("content-type").unwrap_or("");
    let body: Option<Value> = if ct.starts_with("application/vnd.kubernetes.protobuf") {
        proto::decode_review(&req.body)
    } else {
        serde_json::from_slice(&req.body).ok()
    };
    let Some(mut body) = body.filter(Value::is_object) else {
        ex.status(bad_request("error decoding request body"));
        return;
    };
    body["apiVersion"] = json!(r.api_version());
    body["kind"] = json!(r.kind);
    if !body["metadata"].is_object() {
        body["metadata"] = json!({"creationTimestamp": null});
    }
    match r.plural {
        "selfsubjectaccessreviews" | "subjectaccessreviews" => {
            let spec = body["spec"].clone();
            let subject = if r.plural == "subjectaccessreviews" {
                UserInfo {
                    name: spec["user"].as_str().unwrap_or("").into(),
                    groups: spec["groups"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                        .unwrap_or_default(),
                    ..Default::default()
                }
            } else {
                user.clone()
            };
            let attrs = if let Some(ra) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
                let s = |k: &str| ra[k].as_str().unwrap_or("").to_string();
                Attrs {
                    verb: s("verb"),
                    resource_request: true,
                    namespace: s("namespace"),
                    api_group: s("group"),
                    resource: s("resource"),
                    subresource: s("subresource"),
                    name: s("name"),
                    path: String::new(),
                }
            } else if let Some(nr) = spec.get("nonResourceAttributes").filter(|v| v.is_object()) {
                Attrs {
                    verb: nr["verb"].as_str().unwrap_or("").into(),
                    path: nr["path"].as_str().unwrap_or("").into(),
                    ..Default::default()
                }
            } else {
                ex.status(status(
                    422,
                    "Invalid",
                    &format!("{} in version \"v1\" cannot be handled as a {}: exactly one of nonResourceAttributes or resourceAttributes must be specified", r.kind, r.kind),
                    json!({}),
                ));
                return;
            };
            let allowed = rbac::authorize(&ex.shared.lock().store, &subject, &attrs);
            body["status"] = if allowed {
                json!({"allowed": true, "reason": "RBAC: allowed by the stand-in's RBAC"})
            } else {
                json!({"allowed": false})
            };
        }
        "selfsubjectreviews" => {
            let mut ui = json!({"username": user.name, "groups": user.groups});
            if !user.uid.is_empty() {
                ui["uid"] = json!(user.uid);
            }
            if !user.extra.is_empty() {
                ui["extra"] = json!(user.extra);
            }
            body["status"] = json!({"userInfo": ui});
        }
        "selfsubjectrulesreviews" => {
            let ns = body["spec"]["namespace"].as_str().unwrap_or("").to_string();
            let rules = rbac::rules_for(&ex.shared.lock().store, user, &ns);
            let (res, non): (Vec<Value>, Vec<Value>) =
                rules.into_iter().partition(|r| r.get("nonResourceURLs").is_none());
            body["status"] = json!({"resourceRules": res, "nonResourceRules": non, "incomplete": false});
        }
        _ => {}
    }
    ex.json(201, &body);
}

// ---- Loading objects ---------------------------------------------------------------------

/// Creates or replaces one object in the store.
pub fn apply(store: &mut Store, obj: Value) -> Result<Value, String> {
    let api_version = obj["apiVersion"].as_str().unwrap_or("").to_string();
    let kind = obj["kind"].as_str().unwrap_or("").to_string();
    if kind.ends_with("List") {
        if let Some(items) = obj["items"].as_array() {
            for i in items.clone() {
                apply(store, i)?;
            }
            return Ok(obj);
        }
    }
    let r = discovery::find_kind(&api_version, &kind).ok_or_else(|| format!("no kind {kind:?} in {api_version:?}"))?;
    let ns = if r.namespaced {
        obj["metadata"]["namespace"].as_str().unwrap_or("default").to_string()
    } else {
        String::new()
    };
    let name = obj["metadata"]["name"].as_str().ok_or("metadata.name is required")?.to_string();
    let res = if store.get(r, &ns, &name).is_some() {
        let mut o = obj;
        if let Some(m) = o["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        store.update(r, &ns, &name, o)
    } else {
        store.create(r, &ns, obj)
    };
    res.map_err(|e| format!("{kind} {name}: {e:?}"))
}

/// Loads every document of a multi-document YAML stream.
pub fn load_yaml(store: &mut Store, yaml: &str) -> Result<(), String> {
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v = Value::deserialize(doc).map_err(|e| e.to_string())?;
        if v.is_null() {
            continue;
        }
        apply(store, v)?;
    }
    Ok(())
}
