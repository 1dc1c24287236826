//! Signing in with the organisation's identity provider, against a real
//! provider process of our own (`tests/support/idp.rs`, HTTPS with its
//! own CA) and a real `uplink-hub serve`:
//!
//! ```text
//!  idp (discovery, JWKS, authorize, token, device) ◄── hub --oidc-issuer …
//!  bearer ID tokens: good (ES256, RS256), and each bad one refused with its reason
//!  key rotation: unknown kid ─► JWKS fetched again (rate-limited); removed keys stop
//!  revocation of an OIDC person: the next request with a valid token is refused
//!  browser sign-in (followed by hand with a cookie jar): PKCE, state, nonce,
//!    session cookie, CSRF, Origin, replayed state and nonce, sign-out
//!  kubectl ─exec─► uplink-hub login (device grant, cache, refresh)
//!    ─► hub ─► agent ─► stand-in API server: the IdP group reaches the
//!    cluster as Impersonate-Group and its RBAC decides
//! ```
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use hub_support::{HubProc, KillOnDrop, fails, hub_cli, ok, temp_dir, wait_for, write_kube_credentials};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};
use support::idp::{CLIENT_ID, Idp, Key, Person, now};
use uplink::hub::client::{Client, Reply};

fn ann() -> Person {
    Person { sub: "42".into(), email: "ann@example.com".into(), groups: vec!["dev".into(), "hub-admins-not".into()] }
}

/// The hub's `--oidc-*` flags for `idp` (CA written into `dir`).
fn oidc_flags(idp: &Idp, dir: &Path) -> Vec<String> {
    let ca = dir.join("idp-ca.pem");
    std::fs::write(&ca, &idp.ca_pem).unwrap();
    [
        "--oidc-issuer",
        &idp.issuer(),
        "--oidc-client-id",
        CLIENT_ID,
        "--oidc-ca",
        ca.to_str().unwrap(),
        "--oidc-user-prefix",
        "oidc:",
        "--oidc-group-prefix",
        "oidc:",
        "--oidc-admin-group",
        "oidc:hub-admins",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start_hub(idp: &Idp, dir: &Path, free_port: bool) -> HubProc {
    if free_port {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        start_hub_on(idp, dir, port)
    } else {
        let mut args = oidc_flags(idp, dir);
        args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        HubProc::start_with(dir, &args)
    }
}

/// On `port`, public URL `https://127.0.0.1:PORT` (again after a restart).
fn start_hub_on(idp: &Idp, dir: &Path, port: u16) -> HubProc {
    let mut args = oidc_flags(idp, dir);
    args.extend([
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--public-url".into(),
        format!("https://127.0.0.1:{port}"),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    HubProc::start_with(dir, &args)
}

fn whoami(hub: &HubProc, token: &str) -> Reply {
    hub.client(Some(token)).get("/api/v1/whoami").unwrap()
}

#[track_caller]
fn refused(hub: &HubProc, token: &str, reason: &str) {
    let r = whoami(hub, token);
    assert_eq!(r.status, 401, "{reason}: {}", r.text());
    let msg = r.json()["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains(reason), "expected {reason:?} in {msg:?}");
}

#[test]
fn id_tokens_are_verified_and_each_bad_one_is_refused_with_its_reason() {
    let dir = temp_dir("oidc-tokens");
    let idp = Idp::start(ann());
    let hub = start_hub(&idp, &dir, false);

    // A good ES256 token: the person, prefixed, with their prefixed groups,
    // and a hub user record created on first sign-in.
    let good = idp.id_token(&ann());
    let r = whoami(&hub, &good);
    assert_eq!(r.status, 200, "{}", r.text());
    let me = r.json();
    assert_eq!(me["name"], "oidc:ann@example.com");
    assert_eq!(me["groups"], json!(["oidc:dev", "oidc:hub-admins-not"]));
    assert_eq!(me["admin"], false);
    let users = hub.admin().get("/api/v1/users").unwrap().json();
    assert!(users["users"].as_array().unwrap().iter().any(|u| u["name"] == "oidc:ann@example.com"), "{users}");
    // The fixture RSA key (RS256) verifies as well.
    let rsa = idp.mint(&idp.key("rsa-1"), json!({}), &idp.claims(&ann(), None));
    assert_eq!(whoami(&hub, &rsa).status, 200);
    // Members of the admin group are hub admins.
    let boss = Person { sub: "7".into(), email: "boss@example.com".into(), groups: vec!["hub-admins".into()] };
    let r = hub.client(Some(&idp.id_token(&boss))).get("/api/v1/users").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    let k1 = idp.key("k1");
    let claims = |f: &dyn Fn(&mut Value)| {
        let mut c = idp.claims(&ann(), None);
        f(&mut c);
        c
    };
    let t = now();
    let expired = idp.mint(
        &k1,
        json!({}),
        &claims(&|c| {
            c["iat"] = json!(t - 600);
            c["exp"] = json!(t - 120);
        }),
    );
    refused(&hub, &expired, "the ID token expired");
    let wrong_aud = idp.mint(&k1, json!({}), &claims(&|c| c["aud"] = json!("another-app")));
    refused(&hub, &wrong_aud, "is not meant for this hub (audience)");
    let wrong_iss = idp.mint(&k1, json!({}), &claims(&|c| c["iss"] = json!("https://evil.example.com")));
    refused(&hub, &wrong_iss, "was issued by \"https://evil.example.com\"");
    let unsigned = {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.", b.encode(json!({"alg": "none"}).to_string()), b.encode(claims(&|_| {}).to_string()))
    };
    refused(&hub, &unsigned, "unsigned (alg none)");
    // Signed by another key under k1's name.
    let forged = idp.mint(&Key::new_ec("k1"), json!({}), &claims(&|_| {}));
    refused(&hub, &forged, "signature does not verify");
    // A key the provider never published.
    let stranger = idp.mint(&Key::new_ec("ghost"), json!({}), &claims(&|_| {}));
    refused(&hub, &stranger, "names key \"ghost\", which is not in the identity provider's key set");
    let hs = idp.mint(&k1, json!({"alg": "HS256"}), &claims(&|_| {}));
    refused(&hub, &hs, "algorithm \"HS256\" is not allowed");
    let unverified = idp.mint(&k1, json!({}), &claims(&|c| c["email_verified"] = json!(false)));
    refused(&hub, &unverified, "has not verified your email");

    // The kube front end says the same in a Kubernetes Status.
    let r = hub.client(Some(&expired)).get("/k8s/clusters/edge-1/api/v1/namespaces").unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["kind"], "Status", "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("the ID token expired"), "{}", r.text());

    // Each refusal is logged with its reason, never with the token.
    let log = hub.log();
    assert!(log.matches("oidc token refused").count() >= 8, "{log}");
    for t in [&good, &expired, &forged, &stranger] {
        let signature = t.rsplit('.').next().unwrap();
        assert!(!log.contains(signature), "a token reached the log");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rotated_keys_are_fetched_on_an_unknown_kid_and_removed_keys_stop_working() {
    let dir = temp_dir("oidc-rotate");
    let idp = Idp::start(ann());
    let hub = start_hub(&idp, &dir, false);
    let started = Instant::now();
    let old = idp.id_token(&ann());
    assert_eq!(whoami(&hub, &old).status, 200);
    assert_eq!(idp.jwks_fetches(), 1, "fetched once at start");

    // Past the refresh rate limit (5 s), the provider rotates.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(started.elapsed()));
    let k2 = idp.rotate();
    let new = idp.id_token(&ann());
    assert!(new.len() > 10 && k2 == "k2");
    let r = whoami(&hub, &new);
    assert_eq!(r.status, 200, "the new key is fetched on its unknown kid: {}", r.text());
    assert_eq!(idp.jwks_fetches(), 2);
    assert_eq!(whoami(&hub, &old).status, 200, "the old key is still published");

    // Made-up kids do not make the hub hammer the provider.
    for i in 0..5 {
        let ghost = idp.mint(&Key::new_ec(&format!("ghost-{i}")), json!({}), &idp.claims(&ann(), None));
        refused(&hub, &ghost, "not in the identity provider's key set");
    }
    assert_eq!(idp.jwks_fetches(), 2, "rate-limited to one fetch per 5 s");

    // The provider drops k1; once the hub fetches again (the next unknown
    // kid after the rate limit), tokens of k1 stop verifying.
    idp.remove_key("k1");
    std::thread::sleep(Duration::from_secs(6));
    idp.rotate();
    assert_eq!(whoami(&hub, &idp.id_token(&ann())).status, 200);
    assert_eq!(idp.jwks_fetches(), 3);
    refused(&hub, &old, "names key \"k1\", which is not in the identity provider's key set");
    assert_eq!(whoami(&hub, &new).status, 200, "k2 is still published");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn revoking_an_oidc_person_takes_effect_at_once() {
    let dir = temp_dir("oidc-revoke");
    let idp = Idp::start(ann());
    let hub = start_hub(&idp, &dir, false);
    let token = idp.id_token(&ann());
    assert_eq!(whoami(&hub, &token).status, 200);
    let r = hub.admin().delete("/api/v1/users/oidc%3Aann%40example.com").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // The same, still valid, token; and a fresh one.
    refused(&hub, &token, "user oidc:ann@example.com was revoked by a hub admin");
    refused(&hub, &idp.id_token(&ann()), "was revoked by a hub admin");
    let r = hub.client(Some(&token)).get("/k8s/clusters/edge-1/api/v1/namespaces").unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    // Another person of the provider is unaffected; a hub-token user's
    // name cannot be taken over through the provider.
    let bob = Person { sub: "43".into(), email: "bob@example.com".into(), groups: vec![] };
    assert_eq!(whoami(&hub, &idp.id_token(&bob)).status, 200);
    let r = hub.admin().post_json("/api/v1/users", &json!({ "name": "oidc:eve@example.com", "admin": true })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let eve = Person { sub: "44".into(), email: "eve@example.com".into(), groups: vec![] };
    refused(&hub, &idp.id_token(&eve), "user oidc:eve@example.com is a hub-token user");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_provider_that_is_down_does_not_stop_the_hub() {
    let dir = temp_dir("oidc-down");
    let idp = Idp::start(ann());
    let ca = dir.join("idp-ca.pem");
    std::fs::write(&ca, &idp.ca_pem).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let issuer = format!("https://127.0.0.1:{closed}");
    let args = ["--listen", "127.0.0.1:0", "--oidc-issuer", &issuer, "--oidc-client-id", CLIENT_ID];
    let hub = HubProc::start_with(&dir, &[&args[..], &["--oidc-ca", ca.to_str().unwrap()]].concat());
    assert!(wait_for(30, || hub.log().contains("oidc fetch failed")), "{}", hub.log());
    // ID tokens are refused saying why; hub tokens work; the browser flow waits.
    refused(&hub, &idp.id_token(&ann()), "could not fetch the identity provider's keys yet");
    assert_eq!(hub.admin().get("/api/v1/whoami").unwrap().status, 200);
    assert_eq!(hub.client(None).request("GET", "/auth/login", &[], None).unwrap().status, 503);
    std::fs::remove_dir_all(&dir).ok();
}

/// A minimal cookie jar: name → value, from `Set-Cookie` fields.
#[derive(Default)]
struct Jar(Vec<(String, String)>);

impl Jar {
    fn take(&mut self, r: &Reply) {
        for (n, v) in &r.headers {
            if n.eq_ignore_ascii_case("set-cookie") {
                let pair = v.split(';').next().unwrap();
                let (k, val) = pair.split_once('=').unwrap();
                self.0.retain(|(x, _)| x != k);
                if !val.is_empty() && !v.contains("Max-Age=0") {
                    self.0.push((k.to_string(), val.to_string()));
                }
            }
        }
    }
    fn header(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

fn set_cookie<'a>(r: &'a Reply, name: &str) -> &'a str {
    r.headers
        .iter()
        .find(|(n, v)| n.eq_ignore_ascii_case("set-cookie") && v.starts_with(&format!("{name}=")))
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no Set-Cookie {name} in {:?}", r.headers))
}

/// `path` of an absolute URL on `base` (scheme and authority).
fn path_of<'a>(url: &'a str, base: &str) -> &'a str {
    url.strip_prefix(base).unwrap_or_else(|| panic!("{url} is not under {base}"))
}

/// The browser's part up to the callback: `/auth/login` then the
/// provider's authorize. Returns the callback path (with code and state).
fn start_sign_in(hub: &HubProc, idp: &Idp, jar: &mut Jar) -> String {
    let r = hub.client(None).request("GET", "/auth/login", &[], None).unwrap();
    assert_eq!(r.status, 302, "{}", r.text());
    jar.take(&r);
    let state_cookie = set_cookie(&r, "uplink_auth");
    assert!(
        state_cookie.contains("HttpOnly") && state_cookie.contains("Secure") && state_cookie.contains("SameSite=Lax")
    );
    let location = r.header("location").unwrap().to_string();
    for want in
        ["code_challenge_method=S256", "code_challenge=", "state=", "nonce=", "scope=openid", "client_id=uplink-hub"]
    {
        assert!(location.contains(want), "{want} missing in {location}");
    }
    let idp_client = Client::new(&idp.issuer(), Some(&idp.ca_pem), None).unwrap();
    let r = idp_client.request("GET", path_of(&location, &idp.issuer()), &[], None).unwrap();
    assert_eq!(r.status, 302, "{}", r.text());
    let back = r.header("location").unwrap().to_string();
    path_of(&back, &hub.url).to_string()
}

#[test]
fn console_sign_in_with_pkce_state_nonce_cookie_and_csrf() {
    let dir = temp_dir("oidc-browser");
    let idp = Idp::start(ann());
    let mut hub = start_hub(&idp, &dir, true);
    let admin_token = hub.admin_token.clone().unwrap();
    let admin = hub.admin();
    assert_eq!(admin.get("/api/v1/hub").unwrap().json()["oidc"]["login_path"], "/auth/login");
    let reg = admin.post_json("/api/v1/clusters", &json!({"name": "edge-dev"})).unwrap();
    assert_eq!(reg.status, 201);
    admin.post_json("/api/v1/clusters", &json!({"name": "prod-1"})).unwrap();
    assert_eq!(
        admin.post_json("/api/v1/grants", &json!({"group": "oidc:dev", "clusters": "edge-*"})).unwrap().status,
        201
    );

    let mut jar = Jar::default();
    let callback = start_sign_in(&hub, &idp, &mut jar);
    let cookie = jar.header();
    let r = hub.client(None).request("GET", &callback, &[("Cookie", &cookie)], None).unwrap();
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location"), Some("/"));
    let session = set_cookie(&r, "uplink_session");
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(session.contains(attr), "{attr} missing in {session}");
    }
    jar.take(&r);
    assert!(jar.get("uplink_auth").is_none(), "the state cookie is cleared");
    let sid = jar.get("uplink_session").unwrap().to_string();
    assert!(sid.len() >= 43);
    let db = [
        std::fs::read(dir.join("data/hub.db")).unwrap(),
        std::fs::read(dir.join("data/hub.db-wal")).unwrap_or_default(),
    ]
    .concat();
    assert!(!db.windows(sid.len()).any(|w| w == sid.as_bytes()), "only the session's hash is stored");

    // The session is in the store (hashed): it survives a restart.
    let port = hub.addr.port();
    hub.terminate();
    let hub = start_hub_on(&idp, &dir, port);
    let admin = hub.client(Some(&admin_token));

    // The clusters page as that person: the group grant decides.
    let with_cookie = format!("uplink_session={sid}");
    let get = |path: &str, extra: &[(&str, &str)]| {
        let mut h = vec![("Cookie", with_cookie.as_str())];
        h.extend_from_slice(extra);
        hub.client(None).request("GET", path, &h, None).unwrap()
    };
    let me = get("/api/v1/whoami", &[]).json();
    assert_eq!(me["name"], "oidc:ann@example.com");
    let csrf = me["csrf_token"].as_str().unwrap().to_string();
    let clusters = get("/api/v1/clusters", &[]).json();
    let names: Vec<&str> =
        clusters["clusters"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["edge-dev"], "{clusters}");

    // Another site's page cannot use the session.
    let r = get("/api/v1/whoami", &[("Origin", "https://evil.example.com")]);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.text().contains("origin \\\"https://evil.example.com\\\""), "{}", r.text());
    // State-changing calls with the cookie need the CSRF token.
    let post = |path: &str, extra: &[(&str, &str)]| {
        let mut h = vec![("Cookie", with_cookie.as_str()), ("Content-Type", "application/json")];
        h.extend_from_slice(extra);
        hub.client(None).request("POST", path, &h, Some(b"{}")).unwrap()
    };
    let r = post("/api/v1/clusters/edge-dev/activation", &[]);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.text().contains("X-CSRF-Token"), "{}", r.text());
    let r = post("/api/v1/clusters/edge-dev/activation", &[("X-CSRF-Token", "wrong")]);
    assert_eq!(r.status, 401);
    let r = post("/api/v1/clusters/edge-dev/activation", &[("X-CSRF-Token", &csrf)]);
    assert_eq!(r.status, 403, "past CSRF, the person is simply no admin: {}", r.text());
    // Hub tokens keep working beside the cookie.
    assert_eq!(admin.get("/api/v1/whoami").unwrap().json()["name"], "admin");

    // The callback is single use: replaying it is refused.
    let r = hub.client(None).request("GET", &callback, &[("Cookie", &cookie)], None).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("unknown, already used or expired"), "{}", r.text());
    // A callback without this browser's state cookie (login CSRF) is refused.
    let mut other = Jar::default();
    let cb = start_sign_in(&hub, &idp, &mut other);
    let r = hub.client(None).request("GET", &cb, &[], None).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("started in another browser"), "{}", r.text());
    // An ID token carrying a replayed nonce is refused.
    idp.force_nonce(Some("a-nonce-from-an-earlier-sign-in"));
    let mut jar2 = Jar::default();
    let cb = start_sign_in(&hub, &idp, &mut jar2);
    let r = hub.client(None).request("GET", &cb, &[("Cookie", &jar2.header())], None).unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.text().contains("nonce does not match"), "{}", r.text());
    assert!(hub.log().contains("oidc browser sign-in refused"), "{}", hub.log());
    idp.force_nonce(None);

    // Sign-out (CSRF-checked) deletes the session.
    let r = hub.client(None).request("POST", "/auth/logout", &[("Cookie", &with_cookie)], None).unwrap();
    assert_eq!(r.status, 403, "sign-out without the CSRF token: {}", r.text());
    let r = hub
        .client(None)
        .request("POST", "/auth/logout", &[("Cookie", &with_cookie), ("X-CSRF-Token", &csrf)], None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(set_cookie(&r, "uplink_session").contains("Max-Age=0"));
    assert_eq!(get("/api/v1/whoami", &[]).status, 401);

    // A new session ends when an admin revokes the person.
    let mut jar3 = Jar::default();
    let cb = start_sign_in(&hub, &idp, &mut jar3);
    let r = hub.client(None).request("GET", &cb, &[("Cookie", &jar3.header())], None).unwrap();
    jar3.take(&r);
    let c3 = format!("uplink_session={}", jar3.get("uplink_session").unwrap());
    assert_eq!(hub.client(None).request("GET", "/api/v1/whoami", &[("Cookie", &c3)], None).unwrap().status, 200);
    assert_eq!(admin.delete("/api/v1/users/oidc%3Aann%40example.com").unwrap().status, 200);
    assert_eq!(hub.client(None).request("GET", "/api/v1/whoami", &[("Cookie", &c3)], None).unwrap().status, 401);
    std::fs::remove_dir_all(&dir).ok();
}

const DEV_READER: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: pod-reader
  namespace: default
rules:
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["get", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: dev-pod-reader
  namespace: default
subjects:
  - kind: Group
    name: "oidc:dev"
    apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: Role
  name: pod-reader
  apiGroup: rbac.authorization.k8s.io
"#;

#[test]
fn kubectl_signs_in_through_the_exec_plugin_and_the_idp_group_decides_in_the_cluster() {
    use support::kube::{Config, StandIn};
    use support::kubectl::Kubectl;
    let Some(admin_kc) = Kubectl::find("oidc-admin") else { return };
    let dir = temp_dir("oidc-kubectl");
    let idp = Idp::start(ann());
    let k = StandIn::start(Config::default());
    k.kubeconfig_for_token(admin_kc.path(), &k.admin_token()).unwrap();
    k.load_rbac_yaml(DEV_READER).unwrap();
    let hub = start_hub(&idp, &dir, true);
    let admin_token = hub.admin_token.clone().unwrap();
    let cli = |args: &[&str]| hub_cli(&hub, &admin_token, args);

    // The cluster may impersonate the person and the IdP group (not the
    // person's other group); access is granted to the group.
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    ok(&cli(&[
        "cluster",
        "register",
        "edge-oidc",
        "--out-dir",
        out.to_str().unwrap(),
        "--user",
        "oidc:ann@example.com",
        "--group",
        "oidc:dev",
    ]));
    ok(&admin_kc.run(&["apply", "--validate=false", "-f", out.join("uplink-edge-oidc.yaml").to_str().unwrap()]));
    ok(&cli(&["grant", "add", "--group", "oidc:dev", "--clusters", "edge-oidc"]));
    std::fs::copy(out.join("uplink-edge-oidc-activation.json"), dir.join("activation.json")).unwrap();
    write_kube_credentials(&dir, &k.agent_token(), &k.ca_pem());
    let (activation, state) = (dir.join("activation.json"), dir.join("state"));
    let flags = ["--activation".as_ref(), activation.as_os_str(), "--state".as_ref(), state.as_os_str()];
    let _agent = KillOnDrop(hub_support::spawn_agent(&flags, &k.url(), &dir, &dir.join("agent.log")));
    let admin = hub.admin();
    assert!(wait_for(60, || admin.get("/api/v1/clusters/edge-oidc").unwrap().json()["status"] == "ACTIVE"));

    // `uplink-hub login` once by hand (device grant) for the kubeconfig.
    let cache = dir.join("cache");
    let idp_ca = dir.join("idp-ca.pem");
    let login = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_uplink-hub"))
            .args(["login", "--issuer", &idp.issuer(), "--client-id", CLIENT_ID, "--ca-file", idp_ca.to_str().unwrap()])
            .args(extra)
            .env("XDG_CACHE_HOME", &cache)
            .output()
            .unwrap()
    };
    let o = login(&["--print-token"]);
    let token = ok(&o).trim().to_string();
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(said.contains("/activate?user_code=WDJB-MJHT") && said.contains("WDJB-MJHT"), "{said}");
    assert_eq!(
        idp.token_requests(),
        [
            ("urn:ietf:params:oauth:grant-type:device_code".to_string(), false),
            ("urn:ietf:params:oauth:grant-type:device_code".to_string(), true)
        ],
        "pending once, then approved"
    );
    let files: Vec<_> = std::fs::read_dir(cache.join("uplink")).unwrap().flatten().collect();
    assert_eq!(files.len(), 1);
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(files[0].metadata().unwrap().permissions().mode() & 0o777, 0o600);
    }
    // The ExecCredential, from the cache this time.
    let cred: Value = serde_json::from_str(&ok(&login(&[]))).unwrap();
    assert_eq!(cred["kind"], "ExecCredential");
    assert_eq!(cred["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(cred["status"]["token"], token.as_str());
    assert!(cred["status"]["expirationTimestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(idp.token_requests().len(), 2, "served from the cache");

    // The hub writes an exec kubeconfig for an OIDC person.
    let kc = Kubectl::find("oidc-ann").unwrap();
    ok(&hub_cli(&hub, &token, &["kubeconfig", "--cluster", "edge-oidc", "--out", kc.path().to_str().unwrap()]));
    let text = std::fs::read_to_string(kc.path()).unwrap();
    for want in ["exec:", "client.authentication.k8s.io/v1", "command: uplink-hub", "- login", "UPLINK_OIDC_CA_PEM"] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    assert!(!text.contains(&token), "no copy of the short-lived token in the kubeconfig");

    let bin_dir = Path::new(env!("CARGO_BIN_EXE_uplink-hub")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let kubectl = |args: &[&str]| kc.command(args).env("PATH", &path).env("XDG_CACHE_HOME", &cache).output().unwrap();

    let pods = kubectl(&["get", "pods", "-n", "default"]);
    assert!(ok(&pods).contains("web-7d4b9c8f6d-k2x9p"), "allowed through the group binding");
    fails(
        &kubectl(&["get", "pods", "-n", "kube-system"]),
        r#"User "oidc:ann@example.com" cannot list resource "pods" in API group "" in the namespace "kube-system""#,
    );
    let seen: Vec<_> =
        k.requests().into_iter().filter(|r| r.impersonated_user.as_deref() == Some("oidc:ann@example.com")).collect();
    assert!(seen.len() >= 2, "{seen:?}");
    for r in &seen {
        assert_eq!(r.impersonated_groups, ["oidc:dev"], "the IdP group, filtered to what the cluster may impersonate");
    }

    // A token near its end is refreshed with the cached refresh token.
    idp.set_lifetime(30);
    std::fs::remove_file(files[0].path()).ok();
    ok(&login(&[])); // device grant again, short-lived token cached
    let before = idp.token_requests().len();
    ok(&kubectl(&["get", "pods", "-n", "default"]));
    let after = idp.token_requests();
    assert!(after[before..].iter().any(|(g, ok)| g == "refresh_token" && *ok), "{after:?}");

    // Revoked: kubectl is refused at once, with the reason.
    assert_eq!(admin.delete("/api/v1/users/oidc%3Aann%40example.com").unwrap().status, 200);
    fails(&kubectl(&["get", "pods", "-n", "default"]), "You must be logged in to the server");
    assert!(
        hub.client(Some(&token))
            .get("/k8s/clusters/edge-oidc/api/v1/namespaces/default/pods")
            .unwrap()
            .text()
            .contains("revoked"),
    );
    std::fs::remove_dir_all(&dir).ok();
}
