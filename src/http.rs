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
//! And on where a body ends: [`content_length`] is the one accepted form
//! of `Content-Length` (RFC 9110 §8.6, RFC 9112 §6.3), for the requests
//! the hub reads and the agent forwards and the responses the agent and
//! the hub's admin client read.
//!
//! Not here: what each side adds or refuses (the agent's impersonation
//! policy in `agent::kube::headers`, the hub's refusal of client
//! `Impersonate-*`), reading or buffering bodies, I/O.

use crate::proto::Header;
use std::fmt;

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
    // By length first: most fields have none of these lengths, and this
    // runs for every field of every request and answer. The same names as
    // HOP_BY_HOP (a test checks).
    let candidates: &[&str] = match name.len() {
        2 => &["te"],
        7 => &["trailer", "upgrade"],
        10 => &["connection", "keep-alive"],
        16 => &["proxy-connection"],
        17 => &["transfer-encoding"],
        18 => &["proxy-authenticate"],
        19 => &["proxy-authorization"],
        _ => return false,
    };
    candidates.iter().any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// A header field as one side holds it: the tunnel's [`Header`], the
/// hub server's `(name, value)` pair or the admin client's.
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

impl Field for (String, String) {
    fn name(&self) -> &[u8] {
        self.0.as_bytes()
    }
    fn value(&self) -> &[u8] {
        self.1.as_bytes()
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

/// The tokens every `Connection` field lists, as they are written.
pub fn connection_tokens<F: Field>(fields: &[F]) -> impl Iterator<Item = &[u8]> {
    members(fields, "connection")
}

/// Whether `Connection` names the field `name` (any case), so that it is
/// hop-by-hop for this message (RFC 9110 §7.6.1). The same answer as
/// looking `name` up in [`connection_options`], without its allocations.
pub fn connection_names<F: Field>(fields: &[F], name: &[u8]) -> bool {
    members(fields, "connection").any(|t| t.eq_ignore_ascii_case(name))
}

/// Why a message's `Content-Length` cannot say where its body ends.
///
/// Leniency here is how request smuggling starts: if the hub read `+5`
/// as 5 and a proxy in front of it read it as an error (or the other way
/// round), the two would disagree on where one request ends and the next
/// begins. So only one form is accepted, and everything else is refused
/// before a body byte is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentLengthError {
    /// An empty value.
    Empty,
    /// A byte that is not an ASCII digit: a sign (`+5`), an inner space
    /// (`1 2`), hex, a unit. The grammar is `1*DIGIT` (RFC 9110 §8.6).
    NotDigits,
    /// More than a `u64` holds.
    Overflow,
    /// Several fields, or one field holding a list (`5, 5`). RFC 9110 §8.6
    /// lets a recipient either collapse identical values or reject; uplink
    /// rejects even identical ones: the field is forwarded hop to hop, and
    /// one rule (exactly one value) is easier for every hop to hold than
    /// "equal after parsing". No Kubernetes client sends a list.
    Several,
}

impl fmt::Display for ContentLengthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContentLengthError::Empty => "empty Content-Length",
            ContentLengthError::NotDigits => "Content-Length must be digits only (no sign, space or other characters)",
            ContentLengthError::Overflow => "Content-Length too large",
            ContentLengthError::Several => "several Content-Length values (send exactly one)",
        })
    }
}

impl std::error::Error for ContentLengthError {}

/// The body length the `Content-Length` fields of a message announce:
/// `Ok(None)` without one, the value when there is exactly one field
/// holding `1*DIGIT` (RFC 9110 §8.6) with optional white space around it
/// (RFC 9110 §5.5), an error for anything else (RFC 9112 §6.3 item 5:
/// an invalid length is unrecoverable; the connection must close).
///
/// The caller decides what to do with Transfer-Encoding beside it
/// (RFC 9112 §6.1): the hub refuses such a request, the agent such a
/// request or response.
pub fn content_length<F: Field>(fields: &[F]) -> Result<Option<u64>, ContentLengthError> {
    let mut values = fields.iter().filter(|f| f.name().eq_ignore_ascii_case(b"content-length")).map(Field::value);
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ContentLengthError::Several);
    }
    // Only SP and HTAB are optional white space (RFC 9110 §5.6.3).
    let start = value.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(value.len());
    let end = value.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |i| i + 1);
    let v = &value[start..end];
    if v.is_empty() {
        return Err(ContentLengthError::Empty);
    }
    if v.contains(&b',') {
        return Err(ContentLengthError::Several);
    }
    if !v.iter().all(u8::is_ascii_digit) {
        return Err(ContentLengthError::NotDigits);
    }
    // Digits only, so the one failure left is overflow. `parse` alone
    // would also take a leading `+`, which the check above refused.
    std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok()).map(Some).ok_or(ContentLengthError::Overflow)
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
        assert!(connection_names(&fields, b"X-HOP") && connection_names(&fields, b"upgrade"));
        assert!(!connection_names(&fields, b"x") && !connection_names(&fields, b"connection"));
        assert!(has_token(&fields, "connection", "upgrade"));
        assert!(has_token(&fields, "transfer-encoding", "CHUNKED"));
        assert!(!has_token(&fields, "transfer-encoding", "deflate"));
        assert_eq!(find(&fields, "CONNECTION"), Some(&b"keep-alive, X-Hop ,"[..]));
        let pairs = vec![("TE".to_string(), b"trailers".to_vec())];
        assert_eq!(find(&pairs, "te"), Some(&b"trailers"[..]));
        assert!(is_hop_by_hop(b"Proxy-Connection") && is_hop_by_hop(b"TE"));
        assert!(!is_hop_by_hop(b"Content-Length") && !is_hop_by_hop(b"Authorization"));
        for h in HOP_BY_HOP {
            assert!(is_hop_by_hop(h.as_bytes()) && is_hop_by_hop(h.to_ascii_uppercase().as_bytes()), "{h}");
        }
        assert!(!is_hop_by_hop(b"x-trailer") && !is_hop_by_hop(b"tf") && !is_hop_by_hop(b"upgradx"));
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
    fn content_length_is_one_field_of_digits() {
        let cl = |values: &[&str]| {
            let fields: Vec<Header> = values.iter().map(|v| Header::new("Content-Length", *v)).collect();
            content_length(&fields)
        };
        assert_eq!(cl(&[]), Ok(None));
        assert_eq!(cl(&["5"]), Ok(Some(5)));
        assert_eq!(cl(&[" \t42 "]), Ok(Some(42)));
        assert_eq!(cl(&["0"]), Ok(Some(0)));
        assert_eq!(cl(&["007"]), Ok(Some(7)));
        assert_eq!(cl(&["18446744073709551615"]), Ok(Some(u64::MAX)));
        assert_eq!(cl(&["18446744073709551616"]), Err(ContentLengthError::Overflow));
        assert_eq!(cl(&[&"9".repeat(100)]), Err(ContentLengthError::Overflow));
        for bad in ["+5", "-5", "5 5", "0x10", "5a", "½", "5\u{b}", "\u{b}5", "1e3", "5.0"] {
            assert_eq!(cl(&[bad]), Err(ContentLengthError::NotDigits), "{bad:?}");
        }
        assert_eq!(cl(&[""]), Err(ContentLengthError::Empty));
        assert_eq!(cl(&["  "]), Err(ContentLengthError::Empty));
        assert_eq!(cl(&["5, 5"]), Err(ContentLengthError::Several));
        assert_eq!(cl(&["5,"]), Err(ContentLengthError::Several));
        assert_eq!(cl(&["5", "5"]), Err(ContentLengthError::Several));
        assert_eq!(cl(&["5", "6"]), Err(ContentLengthError::Several));
        // Any case of the name; other fields are not looked at.
        let fields = vec![Header::new("CONTENT-length", "3"), Header::new("Content-Type", "+5")];
        assert_eq!(content_length(&fields), Ok(Some(3)));
        let pairs = vec![("content-length".to_string(), b"+5".to_vec())];
        assert_eq!(content_length(&pairs), Err(ContentLengthError::NotDigits));
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
