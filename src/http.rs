//! HTTP/1.1 rules both ends of a proxied request apply: which fields are
//! hop-by-hop (RFC 9110 §7.6.1), how list-valued fields such as
//! `Connection` and `Transfer-Encoding` are read (RFC 9110 §5.6.1, over
//! either side's representation of a field, [`Field`]), the pieces of
//! chunked coding (RFC 9112 §7.1), percent-coding (RFC 3986 §2.1), and
//! which Kubernetes requests stream ([`is_kube_stream`]).
//!
//! The agent's client (`agent::http1`) and the hub's server (`hub::http`)
//! keep their own reading loops and buffers — they read different
//! messages, from different peers, and fail in different ways — but
//! share these rules, so the hub and the agent agree on what is
//! connection-scoped and how a chunk is framed.
//!
//! Not here: what each side adds or refuses (the agent's impersonation
//! policy in `agent::kube::headers`, the hub's refusal of client
//! `Impersonate-*`), reading or buffering bodies, I/O.

use crate::proto::Header;

/// Fields that are hop-by-hop whatever `Connection` says (RFC 9110
/// §7.6.1), plus the proxy credentials (§11.7.1, §11.7.2), which are
/// meant for the next hop only.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Whether a field name (any case) is in [`HOP_BY_HOP`].
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// A header field as one side holds it: the tunnel's [`Header`] or the
/// hub server's `(name, value)` pair.
pub trait Field {
    fn name(&self) -> &[u8];
    fn value(&self) -> &[u8];
}

impl Field for Header {
    fn name(&self) -> &[u8] {
        &self.name
    }
    fn value(&self) -> &[u8] {
        &self.value
    }
}

impl Field for (String, Vec<u8>) {
    fn name(&self) -> &[u8] {
        self.0.as_bytes()
    }
    fn value(&self) -> &[u8] {
        &self.1
    }
}

/// The value of the first field called `name` (any case).
pub fn find<'a, F: Field>(fields: &'a [F], name: &str) -> Option<&'a [u8]> {
    fields.iter().find(|f| f.name().eq_ignore_ascii_case(name.as_bytes())).map(Field::value)
}

/// The members of every comma-separated list field called `name`,
/// trimmed of optional white space (RFC 9110 §5.6.1); empty members are
/// skipped.
fn members<'a, F: Field>(fields: &'a [F], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    fields
        .iter()
        .filter(move |f| f.name().eq_ignore_ascii_case(name.as_bytes()))
        .flat_map(|f| f.value().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a comma-separated field (e.g. `Connection`) lists `token`, in
/// any case.
pub fn has_token<F: Field>(fields: &[F], name: &str, token: &str) -> bool {
    members(fields, name).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The field names `Connection` lists, lower-cased: hop-by-hop for this
/// message only (RFC 9110 §7.6.1).
pub fn connection_options<F: Field>(fields: &[F]) -> Vec<Vec<u8>> {
    members(fields, "connection").map(<[u8]>::to_ascii_lowercase).collect()
}

/// Appends `data` as one chunk of a chunked body (RFC 9112 §7.1).
/// Nothing for empty data: an empty chunk is the last chunk, which only
/// [`LAST_CHUNK`] sends.
pub fn push_chunk(dst: &mut Vec<u8>, data: &[u8]) {
    if !data.is_empty() {
        dst.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        dst.extend_from_slice(data);
        dst.extend_from_slice(b"\r\n");
    }
}

/// `data` as one chunk (see [`push_chunk`]).
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 12);
    push_chunk(&mut out, data);
    out
}

/// The last chunk of a chunked body, with no trailer fields.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The size a chunk-size line (without its line ending) announces;
/// chunk extensions after `;` are ignored (RFC 9112 §7.1.1).
pub fn chunk_size(line: &[u8]) -> Option<u64> {
    let hex = line.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
    // Hex digits only (RFC 9112 §7.1): `from_str_radix` alone would take a
    // leading `+`, and leniency in framing is where request smuggling lives.
    // Sixteen digits is the most a u64 holds.
    if hex.is_empty() || hex.len() > 16 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    std::str::from_utf8(hex).ok().and_then(|h| u64::from_str_radix(h, 16).ok())
}

/// Decodes `%XX` escapes (RFC 3986 §2.1); an invalid escape is kept as
/// it is. `+` stays `+`: form decoding replaces it first.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decodes one path segment (RFC 3986 §3.3) strictly: every `%` starts
/// a valid `%XX` escape and the result is UTF-8, else `None`. The caller
/// splits the path on `/` first, so `%2F` stays inside its segment (a
/// name such as `arn:aws:iam::1234567890:user/Alice` is one segment).
/// Strict where [`percent_decode`] is lenient because a segment names
/// something (a user to revoke): a guess could name someone else.
pub fn percent_decode_segment(segment: &str) -> Option<String> {
    let b = segment.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes `s` for one path segment or query value: everything
/// but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`) as `%XX`
/// of its UTF-8 bytes, so `/`, `?`, `#`, `&`, `+`, `%` and spaces all
/// survive a round trip through [`percent_decode_segment`] and form
/// decoding alike.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a Kubernetes API request (path and query) asks for a body that
/// streams for as long as the client wants and may stay quiet meanwhile:
/// a watch (`?watch=true`, the `/watch/` paths) or followed logs
/// (`?follow=true`). The agent never cuts such a body for being quiet; the
/// hub ends it at once when it shuts down, rather than drain it.
pub fn is_kube_stream(path: &str) -> bool {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    // The deprecated watch paths: /api/v1/watch/..., /apis/G/V/watch/...
    let segs: Vec<&str> = path.split('/').collect();
    let watch_path = match segs.get(1) {
        Some(&"api") => segs.get(3) == Some(&"watch"),
        Some(&"apis") => segs.get(4) == Some(&"watch"),
        _ => false,
    };
    watch_path || query.split('&').any(|kv| matches!(kv, "watch=true" | "watch=1" | "follow=true" | "follow=1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_hop_by_hop() {
        let fields = vec![
            Header::new("Connection", "keep-alive, X-Hop ,"),
            Header::new("connection", "Upgrade"),
            Header::new("Transfer-Encoding", "gzip,chunked"),
        ];
        assert_eq!(connection_options(&fields), [&b"keep-alive"[..], b"x-hop", b"upgrade"]);
        assert!(has_token(&fields, "connection", "upgrade"));
        assert!(has_token(&fields, "transfer-encoding", "CHUNKED"));
        assert!(!has_token(&fields, "transfer-encoding", "deflate"));
        assert_eq!(find(&fields, "CONNECTION"), Some(&b"keep-alive, X-Hop ,"[..]));
        let pairs = vec![("TE".to_string(), b"trailers".to_vec())];
        assert_eq!(find(&pairs, "te"), Some(&b"trailers"[..]));
        assert!(is_hop_by_hop(b"Proxy-Connection") && is_hop_by_hop(b"TE"));
        assert!(!is_hop_by_hop(b"Content-Length") && !is_hop_by_hop(b"Authorization"));
    }

    #[test]
    fn chunks_and_escapes() {
        assert_eq!(chunk(b"hello world!!!!!!"), b"11\r\nhello world!!!!!!\r\n");
        assert_eq!(chunk(b""), b"");
        assert!(has_token(&[Header::new("Connection", "keep-alive, Upgrade")], "connection", "upgrade"));
        assert_eq!(chunk_size(b"1aF"), Some(0x1af));
        assert_eq!(chunk_size(b"6 ;ext=1"), Some(6));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"x"), None);
        assert_eq!(percent_decode("a%20b+c%2B%zz%4"), "a b+c+%zz%4");
    }

    #[test]
    fn segments_round_trip_names() {
        for name in ["arn:aws:iam::1234567890:user/Alice", "Zoë Ångström", "山田", "a+b%2F c?d#e&f=g", "~._-"] {
            let enc = percent_encode(name);
            assert!(enc.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)), "{enc}");
            assert_eq!(percent_decode_segment(&enc).as_deref(), Some(name));
        }
        assert_eq!(percent_encode("arn:aws:iam::1:user/Alice"), "arn%3Aaws%3Aiam%3A%3A1%3Auser%2FAlice");
        assert_eq!(percent_decode_segment("arn:aws:iam::1:user%2fAlice").as_deref(), Some("arn:aws:iam::1:user/Alice"));
        assert_eq!(percent_decode_segment("a+b").as_deref(), Some("a+b"), "+ is a plus in a path");
        for bad in ["%", "%4", "%zz", "a%2", "%C3", "%FF", "%+1"] {
            assert_eq!(percent_decode_segment(bad), None, "{bad}");
        }
    }

    #[test]
    fn chunk_sizes_are_hex_digits_only() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"FF;name=value"), Some(255));
        assert_eq!(chunk_size(b"0"), Some(0));
        for bad in [&b"+5"[..], b"-1", b"", b" ", b"0x10", b"1 2", b"11111111111111111"] {
            assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn kube_streams() {
        for p in [
            "/api/v1/pods?watch=true",
            "/api/v1/namespaces/a/pods?labelSelector=x&watch=1",
            "/api/v1/watch/pods",
            "/apis/apps/v1/watch/namespaces/a/deployments",
        ] {
            assert!(super::is_kube_stream(p), "{p}");
        }
        assert!(super::is_kube_stream("/api/v1/namespaces/a/pods/p/log?container=c&follow=true"));
        for p in ["/api/v1/pods", "/api/v1/pods?watch=false", "/api/v1/namespaces/watch/pods", "/x?follow=false"] {
            assert!(!super::is_kube_stream(p), "{p}");
        }
    }
}
