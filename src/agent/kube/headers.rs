//! Which headers go to the API server, and which come back.
//!
//! Requests: the hop-by-hop fields of RFC 9110 §7.6.1 are connection
//! scoped and never forwarded — `Connection` and every field it names,
//! `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`,
//! `Upgrade` — nor are the proxy's own `Proxy-Authorization` and
//! `Proxy-Authenticate` (§11.7). An upgrade request (exec, attach,
//! port-forward) keeps `Upgrade` and sends `Connection: Upgrade`, since
//! the upgrade is the point (§7.8). Every client `Authorization` and
//! `Impersonate-*` is dropped: the agent's credential and the identity
//! from the hub replace them, and a request without a user is refused
//! (an empty `Impersonate-User` makes the API server skip impersonation
//! and act as the agent). User and group names go out byte for byte as
//! the hub sent them — IAM ARNs, emails, spaces, UTF-8 — and the agent
//! checks them itself against [`crate::names`] (no control characters,
//! no space at either end) rather than trust the hub to have done it.
//! `Host` is the API server's. Everything else —
//! `Accept` (with `as=Table` or protobuf), `Content-Type`,
//! `Content-Length`, `Accept-Encoding`, `User-Agent` — goes on unchanged.

use crate::http::{Field, connection_names, connection_tokens, has_token, is_hop_by_hop};
use crate::names::{self, NameError};
use crate::proto::{Header, Identity};
use std::fmt;

/// Users and groups the agent agrees to impersonate; `None` allows any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowLists {
    pub users: Option<Vec<String>>,
    pub groups: Option<Vec<String>>,
}

/// Why a request was refused before reaching the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No user to impersonate.
    EmptyUser,
    /// The agent's allow-list does not name this user.
    UserNotAllowed(String),
    /// The agent's allow-list does not name this group.
    GroupNotAllowed(String),
    /// A header or identity value that cannot travel in HTTP/1.1
    /// (a control character, or a name that is not a token).
    BadField(String),
    /// A user or group name that cannot travel unchanged in an
    /// `Impersonate-*` field (see [`crate::names`]).
    BadName(NameError),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::EmptyUser => {
                write!(f, "request carries no user to impersonate; the agent never forwards such requests")
            }
            Refusal::UserNotAllowed(u) => {
                write!(f, "the agent's configuration does not allow impersonating user {u:?}")
            }
            Refusal::GroupNotAllowed(g) => {
                write!(f, "the agent's configuration does not allow impersonating group {g:?}")
            }
            Refusal::BadField(what) => write!(f, "invalid header field: {what}"),
            Refusal::BadName(e) => write!(f, "cannot impersonate: {e}"),
        }
    }
}

/// Whether the request asks for a protocol upgrade.
pub fn is_upgrade(headers: &[Header]) -> bool {
    // A hub may strip `Connection` as hop-by-hop yet keep `Upgrade`: the
    // presence of `Upgrade` decides.
    headers.iter().any(|h| h.name.eq_ignore_ascii_case(b"upgrade"))
}

fn is_token(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A field value as RFC 9110 §5.5 has it: no control bytes but HTAB
/// (CR, LF and NUL would end or corrupt the line; Go's `net/http`, the
/// API server's, refuses the rest too). Bytes 0x80–0xFF (obs-text, the
/// bytes of UTF-8) pass unchanged.
fn is_field_value(v: &[u8]) -> bool {
    !v.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

/// Checks the request line: the method a token, the target an
/// origin-form path and query (RFC 9112 §3.2.1) of visible ASCII, so
/// neither can smuggle a second line into the request to the API server.
pub fn check_request_line(method: &str, path: &str) -> Result<(), Refusal> {
    if !is_token(method.as_bytes()) {
        return Err(Refusal::BadField("method is not an HTTP token".into()));
    }
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Refusal::BadField("request target is not an origin-form path".into()));
    }
    Ok(())
}

/// The request fields for the API server, handed to `field` one by one
/// (the proxy writes them straight into the request head), or why the
/// request is refused (then what `field` got is to be thrown away).
/// `authorization` is the agent's own `Authorization` value, if it uses a
/// token.
pub fn request_fields(
    client: &[Header],
    identity: &Identity,
    allow: &AllowLists,
    authorization: Option<&str>,
    mut field: impl FnMut(&[u8], &[u8]),
) -> Result<(), Refusal> {
    check_identity(identity, allow)?;
    let upgrade = is_upgrade(client);
    // Whether `Connection` names a field that is not hop-by-hop anyway:
    // only then is each field looked up in it.
    let names_others = connection_tokens(client).any(|t| !is_hop_by_hop(t));
    for h in client {
        if !is_token(&h.name) || !is_field_value(&h.value) {
            return Err(Refusal::BadField(String::from_utf8_lossy(&h.name).into_owned()));
        }
        // Compared in any case without a lower-cased copy: an allocation
        // per header per request.
        let name = h.name.as_slice();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        let keep_upgrade = upgrade && is("upgrade");
        if !keep_upgrade
            && (is_hop_by_hop(name)
                || (names_others && connection_names(client, name) && !is("upgrade"))
                || is("host")
                || is("authorization")
                || name.get(..12).is_some_and(|p| p.eq_ignore_ascii_case(b"impersonate-")))
        {
            continue;
        }
        field(name, &h.value);
    }
    if upgrade {
        field(b"Connection", b"Upgrade");
    }
    if let Some(auth) = authorization {
        field(b"Authorization", auth.as_bytes());
    }
    impersonation(identity, &mut field);
    Ok(())
}

fn check_identity(identity: &Identity, allow: &AllowLists) -> Result<(), Refusal> {
    if identity.user.trim().is_empty() {
        return Err(Refusal::EmptyUser);
    }
    names::check_user(&identity.user).map_err(Refusal::BadName)?;
    for g in &identity.groups {
        names::check_group(g).map_err(Refusal::BadName)?;
    }
    for v in identity.uid.iter().chain(identity.extra.iter().flat_map(|(_, v)| v)) {
        if !is_field_value(v.as_bytes()) {
            return Err(Refusal::BadField("identity value with a control character".into()));
        }
    }
    if identity.extra.iter().any(|(k, _)| k.is_empty()) {
        return Err(Refusal::BadField("empty Impersonate-Extra key".into()));
    }
    if let Some(users) = &allow.users {
        if !users.contains(&identity.user) {
            return Err(Refusal::UserNotAllowed(identity.user.clone()));
        }
    }
    if let Some(groups) = &allow.groups {
        if let Some(g) = identity.groups.iter().find(|g| !groups.contains(g)) {
            return Err(Refusal::GroupNotAllowed(g.clone()));
        }
    }
    Ok(())
}

/// `Impersonate-User`, one `Impersonate-Group` per group, `-Uid`, and one
/// `Impersonate-Extra-KEY` per value.
fn impersonation(identity: &Identity, field: &mut impl FnMut(&[u8], &[u8])) {
    field(b"Impersonate-User", identity.user.as_bytes());
    for g in &identity.groups {
        field(b"Impersonate-Group", g.as_bytes());
    }
    if let Some(uid) = identity.uid.as_ref().filter(|u| !u.is_empty()) {
        field(b"Impersonate-Uid", uid.as_bytes());
    }
    for (key, values) in &identity.extra {
        let name = format!("Impersonate-Extra-{}", escape_extra_key(key));
        for v in values {
            field(name.as_bytes(), v.as_bytes());
        }
    }
}

/// Percent-encodes an extra key as client-go does (`headerKeyEscape`):
/// every byte that is not a header-token character, and `%` itself, as
/// `%XX` in upper-case hex, so `example.com/scopes` becomes
/// `example.com%2Fscopes`. The API server unescapes and lower-cases it.
pub fn escape_extra_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for &b in key.as_bytes() {
        if b != b'%' && (b.is_ascii_alphanumeric() || b"!#$&'*+-.^_`|~".contains(&b)) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Response fields for the hub, borrowed where the server's head lies:
/// hop-by-hop fields dropped, except that a `101` keeps `Upgrade` and
/// `Connection: Upgrade`. Nothing is copied; the tunnel frame is encoded
/// from these.
pub fn response_fields<'a, F: Field>(
    status: u16,
    server: &'a [F],
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone + 'a {
    let upgrade = status == 101;
    let upgrade_token = upgrade && has_token(server, "connection", "upgrade");
    // Whether `Connection` names a field that is not hop-by-hop anyway
    // (`keep-alive`, the usual, is): only then is each field looked up in
    // it.
    let names_others = connection_tokens(server).any(|t| !is_hop_by_hop(t));
    server
        .iter()
        .filter(move |h| {
            let name = h.name();
            if upgrade && name.eq_ignore_ascii_case(b"upgrade") {
                return true;
            }
            !(is_hop_by_hop(name) || (names_others && connection_names(server, name)))
        })
        .map(|h| (h.name(), h.value()))
        .chain(upgrade_token.then_some((&b"Connection"[..], &b"Upgrade"[..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(h: &[Header]) -> Vec<String> {
        h.iter()
            .map(|h| format!("{}: {}", String::from_utf8_lossy(&h.name), String::from_utf8_lossy(&h.value)))
            .collect()
    }

    fn alice() -> Identity {
        Identity {
            user: "alice".into(),
            groups: vec!["dev".into(), "ops".into()],
            uid: Some("u-1".into()),
            extra: vec![("example.com/scopes".into(), vec!["a".into(), "b".into()])],
        }
    }

    #[test]
    fn strips_hop_by_hop_auth_and_impersonation() {
        let client = vec![
            Header::new("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"),
            Header::new("Connection", "keep-alive, X-Secret-Hop"),
            Header::new("X-Secret-Hop", "1"),
            Header::new("Keep-Alive", "timeout=5"),
            Header::new("TE", "trailers"),
            Header::new("Trailer", "X"),
            Header::new("Transfer-Encoding", "chunked"),
            Header::new("Proxy-Authorization", "Basic x"),
            Header::new("Proxy-Connection", "keep-alive"),
            Header::new("Authorization", "Bearer client-token"),
            Header::new("impersonate-user", "root"),
            Header::new("Impersonate-Group", "system:masters"),
            Header::new("Host", "hub.example.com"),
            Header::new("Content-Type", "application/strategic-merge-patch+json"),
            Header::new("Accept-Encoding", "gzip"),
        ];
        let out = request_headers(&client, &alice(), &AllowLists::default(), Some("Bearer agent")).unwrap();
        assert_eq!(
            names(&out),
            vec![
                "Accept: application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
                "Content-Type: application/strategic-merge-patch+json",
                "Accept-Encoding: gzip",
                "Authorization: Bearer agent",
                "Impersonate-User: alice",
                "Impersonate-Group: dev",
                "Impersonate-Group: ops",
                "Impersonate-Uid: u-1",
                "Impersonate-Extra-example.com%2Fscopes: a",
                "Impersonate-Extra-example.com%2Fscopes: b",
            ]
        );
    }

    #[test]
    fn upgrade_keeps_upgrade() {
        let client = vec![
            Header::new("Connection", "Upgrade"),
            Header::new("Upgrade", "SPDY/3.1"),
            Header::new("X-Stream-Protocol-Version", "v4.channel.k8s.io"),
        ];
        let out = request_headers(&client, &alice(), &AllowLists::default(), None).unwrap();
        let n = names(&out);
        assert_eq!(
            &n[..3],
            ["Upgrade: SPDY/3.1", "X-Stream-Protocol-Version: v4.channel.k8s.io", "Connection: Upgrade"]
        );
        assert!(!n.iter().any(|h| h.starts_with("Authorization")));
    }

    #[test]
    fn refuses_empty_user_and_bad_fields() {
        let mut id = alice();
        id.user = " ".into();
        assert_eq!(request_headers(&[], &id, &AllowLists::default(), None), Err(Refusal::EmptyUser));
        let mut id = alice();
        id.groups.push("evil\r\nImpersonate-User: root".into());
        let refused = request_headers(&[], &id, &AllowLists::default(), None).unwrap_err();
        assert_eq!(
            refused.to_string(),
            r#"cannot impersonate: group name "evil\r\nImpersonate-User: root" has a control character U+000D at byte 4; names may hold any printable character"#
        );
        let mut id = alice();
        id.uid = Some("u\u{7f}".into());
        assert!(matches!(request_headers(&[], &id, &AllowLists::default(), None), Err(Refusal::BadField(_))));
        let bad = vec![Header::new("X-A", "1\r\nX-B: 2")];
        assert!(matches!(request_headers(&bad, &alice(), &AllowLists::default(), None), Err(Refusal::BadField(_))));
    }

    /// Names as Kubernetes has them go out byte for byte; control
    /// characters and edge spaces (which HTTP would strip) are refused
    /// by the agent itself, whatever the hub sent.
    #[test]
    fn names_travel_unchanged_and_controls_are_refused() {
        for name in ["arn:aws:iam::1234567890:user/Alice", "jane@example.com", "Jane Doe", "Zoë Ångström", "山田"]
        {
            let id = Identity {
                user: name.into(),
                groups: vec![name.into(), "system:masters".into()],
                ..Default::default()
            };
            let out = request_headers(&[], &id, &AllowLists::default(), None).unwrap();
            assert_eq!(out[0], Header::new("Impersonate-User", name));
            assert_eq!(out[0].value, name.as_bytes());
            assert_eq!(out[1], Header::new("Impersonate-Group", name));
            assert_eq!(out[2], Header::new("Impersonate-Group", "system:masters"));
        }
        for (bad, at) in
            [("a\u{85}b", "U+0085 at byte 1"), ("a\u{7f}", "U+007F at byte 1"), ("a\tb", "U+0009 at byte 1")]
        {
            let id = Identity { user: bad.into(), ..Default::default() };
            let e = request_headers(&[], &id, &AllowLists::default(), None).unwrap_err();
            assert!(matches!(e, Refusal::BadName(_)) && e.to_string().contains(at), "{bad:?}: {e}");
        }
        let id = Identity { user: "alice ".into(), ..Default::default() };
        let e = request_headers(&[], &id, &AllowLists::default(), None).unwrap_err();
        assert!(e.to_string().contains("has a space at byte 5"), "{e}");
        // Client fields: UTF-8 bytes pass, control bytes other than HTAB do not.
        let utf8 = vec![Header::new("X-Name", "Zoë\tÅ")];
        assert!(request_headers(&utf8, &alice(), &AllowLists::default(), None).is_ok());
        let del = vec![Header::new("X-Name", "a\u{7f}")];
        assert!(matches!(request_headers(&del, &alice(), &AllowLists::default(), None), Err(Refusal::BadField(_))));
    }

    #[test]
    fn allow_lists() {
        let allow = AllowLists { users: Some(vec!["alice".into()]), groups: Some(vec!["dev".into()]) };
        assert_eq!(request_headers(&[], &alice(), &allow, None), Err(Refusal::GroupNotAllowed("ops".into())));
        let mut id = alice();
        id.groups.truncate(1);
        assert!(request_headers(&[], &id, &allow, None).is_ok());
        id.user = "bob".into();
        assert_eq!(request_headers(&[], &id, &allow, None), Err(Refusal::UserNotAllowed("bob".into())));
    }

    #[test]
    fn request_line_cannot_smuggle() {
        assert!(check_request_line("GET", "/api/v1/pods?labelSelector=app%3Dweb").is_ok());
        assert!(check_request_line("GET", "/api HTTP/1.1\r\nX-Evil: 1").is_err());
        assert!(check_request_line("GET", "/a b").is_err());
        assert!(check_request_line("GET", "http://elsewhere/").is_err());
        assert!(check_request_line("GET", "").is_err());
        assert!(check_request_line("GE T", "/").is_err());
        assert!(check_request_line("", "/").is_err());
    }

    #[test]
    fn extra_key_escaping() {
        assert_eq!(escape_extra_key("scopes"), "scopes");
        assert_eq!(escape_extra_key("example.com/a b%"), "example.com%2Fa%20b%25");
        assert_eq!(escape_extra_key("ü"), "%C3%BC");
    }

    fn request_headers(
        client: &[Header],
        identity: &Identity,
        allow: &AllowLists,
        authorization: Option<&str>,
    ) -> Result<Vec<Header>, Refusal> {
        let mut out = Vec::new();
        request_fields(client, identity, allow, authorization, |n, v| out.push(Header::new(n, v)))?;
        Ok(out)
    }

    fn response_headers(status: u16, server: &[Header]) -> Vec<Header> {
        response_fields(status, server).map(|(n, v)| Header::new(n, v)).collect()
    }

    #[test]
    fn response_filtering() {
        let server = vec![
            Header::new("Content-Type", "application/json"),
            Header::new("Transfer-Encoding", "chunked"),
            Header::new("Connection", "close"),
            Header::new("Audit-Id", "x"),
        ];
        assert_eq!(names(&response_headers(200, &server)), vec!["Content-Type: application/json", "Audit-Id: x"]);
        let up = vec![Header::new("Connection", "Upgrade"), Header::new("Upgrade", "SPDY/3.1")];
        assert_eq!(names(&response_headers(101, &up)), vec!["Upgrade: SPDY/3.1", "Connection: Upgrade"]);
        // Fields that `Connection` names are this hop's only.
        let named = vec![
            Header::new("Connection", "keep-alive, X-Hop"),
            Header::new("x-hop", "1"),
            Header::new("Keep-Alive", "timeout=5"),
            Header::new("X-Kept", "2"),
        ];
        assert_eq!(names(&response_headers(200, &named)), vec!["X-Kept: 2"]);
        // Not an upgrade: `Upgrade` goes too.
        assert_eq!(names(&response_headers(200, &up)), Vec::<String>::new());
    }
}
