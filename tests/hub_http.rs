//! The hub's HTTP front against clients that misbehave, over real
//! sockets and TLS: strict request framing (RFC 9112 §6), deadlines for
//! slow and idle clients, and connection caps.
#![cfg(feature = "hub")]

mod hub_support;

use hub_support::{HubProc, temp_dir};
use serde_json::json;
use std::io::{Read, Write};
use std::time::Duration;

/// Sends `raw` on a fresh TLS connection and reads until the hub closes
/// it; panics if it does not within 20 s.
fn exchange_until_close(hub: &HubProc, raw: &[u8]) -> String {
    let mut tls = hub.client(None).connect().unwrap();
    tls.sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tls.write_all(raw).unwrap();
    tls.flush().unwrap();
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => {}
        // A TCP close without close_notify still ends the exchange.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("the hub did not close the connection: {e}; got {:?}", String::from_utf8_lossy(&out)),
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn bad_content_length_gets_400_and_the_connection_closes() {
    let dir = temp_dir("framing");
    let hub = HubProc::start(&dir);
    let admin = hub.admin();
    let r = admin.post_json("/api/v1/clusters", &json!({ "name": "edge-1" })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let token = hub.admin_token.clone().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("POST /v1/activate", "Content-Length: +5\r\n", "digits only"),
        ("POST /v1/activate", "Content-Length: -5\r\n", "digits only"),
        ("POST /v1/activate", "Content-Length: 0x5\r\n", "digits only"),
        ("POST /v1/activate", "Content-Length: 5, 5\r\n", "several Content-Length"),
        ("POST /v1/activate", "Content-Length: 5\r\nContent-Length: 5\r\n", "several Content-Length"),
        ("POST /v1/activate", "Content-Length: 5\r\nContent-Length: 6\r\n", "several Content-Length"),
        ("POST /v1/activate", "Content-Length: 99999999999999999999\r\n", "too large"),
        ("POST /v1/activate", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "both Transfer-Encoding"),
        ("POST /v1/activate", "Transfer-Encoding: gzip, chunked\r\n", "only `chunked`"),
        ("POST /api/v1/users", "Content-Length: +5\r\n", "digits only"),
        ("POST /k8s/clusters/edge-1/api/v1/namespaces/default/configmaps", "Content-Length: +5\r\n", "digits only"),
    ];
    for (line, fields, expect) in cases {
        let raw = format!("{line} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n{fields}\r\nhello");
        let answer = exchange_until_close(&hub, raw.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400 "), "{line} {fields:?}: {answer}");
        assert!(answer.contains("Connection: close"), "{answer}");
        assert!(answer.contains(expect), "{fields:?}: {answer}");
        // The body bytes were not read as a second request.
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    }
    assert!(hub.log().contains("request refused"), "{}", hub.log());
    // A well-framed request on the same hub still works.
    assert_eq!(admin.get("/api/v1/whoami").unwrap().status, 200);
    std::fs::remove_dir_all(&dir).ok();
}
