//! Frame codec: a `u32` big-endian length, then the postcard encoding of a
//! [`Frame`].
//!
//! Decoding never panics on peer input. The length is checked against the
//! negotiated maximum as soon as its four bytes are in, before the body is
//! buffered or anything is allocated for it. Input that ends mid-frame is
//! `Ok(None)`: wait for more bytes.

use super::frame::{Frame, Header, Identity, MAX_FRAME_LEN, RequestHead, ResponseHead, StreamId};
use std::fmt;

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Why bytes could not be decoded into a frame. Any of these ends the
/// session: after a framing error nothing later in the byte stream can be
/// trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The length prefix announces more than the negotiated maximum.
    TooLarge { len: u32, max: u32 },
    /// A zero length: no frame is empty.
    Empty,
    /// The body is not a valid postcard frame (unknown tag, bad varint,
    /// truncated field, invalid UTF-8 in a string).
    Malformed(String),
    /// The body decoded but left bytes unread inside its length.
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { len, max } => {
                write!(f, "frame length {len} exceeds the maximum of {max} bytes")
            }
            DecodeError::Empty => write!(f, "zero-length frame"),
            DecodeError::Malformed(why) => write!(f, "malformed frame: {why}"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} trailing bytes inside a frame"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Why a frame could not be encoded (local misuse, never peer input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The encoded frame would exceed the peer's maximum frame length.
    TooLarge { len: usize, max: u32 },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::TooLarge { len, max } => {
                write!(f, "encoded frame of {len} bytes exceeds the peer's maximum of {max}")
            }
        }
    }
}

impl std::error::Error for EncodeError {}

/// Appends the length-prefixed encoding of `frame` to `out`. On error `out`
/// is left as it was.
pub fn encode(frame: &Frame, max: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match frame {
        Frame::Data { id, data } => return encode_data(*id, data, max, out),
        Frame::Head { id, head } => {
            let fields = head.headers.iter().map(|h| (h.name.as_slice(), h.value.as_slice()));
            return encode_head(*id, head.status, fields, max, out);
        }
        Frame::End { id } => {
            let start = out.len();
            out.extend_from_slice(&[0; LEN_PREFIX]);
            push_varint(out, END_TAG);
            push_varint(out, id.0);
            return finish_prefix(out, start, max);
        }
        _ => {}
    }
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    // Serializing into a Vec cannot fail: every field type is supported and
    // the sink grows as needed.
    let mut taken = std::mem::take(out);
    taken = postcard::to_extend(frame, taken).expect("postcard into Vec is infallible");
    *out = taken;
    finish_prefix(out, start, max)
}

/// Appends a `Data` frame without building a [`Frame`] first, so payload
/// bytes are copied once, straight into the transmit buffer. Byte for byte
/// identical to `encode(&Frame::Data { .. })`.
pub fn encode_data(id: StreamId, data: &[u8], max: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    push_varint(out, DATA_TAG);
    push_varint(out, id.0);
    push_bytes(out, data);
    finish_prefix(out, start, max)
}

/// Appends a `Head` frame from borrowed fields, so a response head read
/// from the API server goes out without a `Vec` per field name and value
/// first. Byte for byte identical to `encode(&Frame::Head { .. })` with
/// the same fields (postcard: the tag, the id, the status as a varint,
/// the field count, then each name and value length-prefixed).
pub fn encode_head<'a, I>(id: StreamId, status: u16, fields: I, max: u32, out: &mut Vec<u8>) -> Result<(), EncodeError>
where
    I: Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
{
    encode_head_of(id, status, fields.clone().count(), fields, max, out)
}

/// [`encode_head`] when the caller has counted the fields already:
/// `count` must be how many `fields` yields.
pub fn encode_head_of<'a, I>(
    id: StreamId,
    status: u16,
    count: usize,
    fields: I,
    max: u32,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError>
where
    I: Iterator<Item = (&'a [u8], &'a [u8])>,
{
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    push_varint(out, HEAD_TAG);
    push_varint(out, id.0);
    push_varint(out, u32::from(status));
    push_varint(out, count as u32);
    for (name, value) in fields {
        push_bytes(out, name);
        push_bytes(out, value);
    }
    finish_prefix(out, start, max)
}

/// A request head by reference, for [`encode_open`] and `Mux::open_ref`:
/// the hub builds it from the client's request as it holds it (hyper's
/// fields, the person's name and groups from the audit record), so a
/// proxied request's head goes into the transmit buffer without a
/// [`RequestHead`] (a `Vec` per field name and value) built first.
#[derive(Clone, Debug)]
pub struct OpenHead<'a, I> {
    pub method: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// `(name, value)` pairs; walked twice (counted, then written).
    pub fields: I,
    pub user: &'a str,
    pub groups: &'a [String],
    pub uid: Option<&'a str>,
    pub extra: &'a [(String, Vec<String>)],
}

impl<'a, I> OpenHead<'a, I>
where
    I: Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
{
    /// The head with one more field at the end (a replica naming the
    /// cluster of a handed-off stream), which may live less long.
    pub fn with_field<'b>(
        self,
        name: &'b [u8],
        value: &'b [u8],
    ) -> OpenHead<'b, impl Iterator<Item = (&'b [u8], &'b [u8])> + Clone>
    where
        'a: 'b,
    {
        let shorter = |(n, v): (&'a [u8], &'a [u8])| -> (&'b [u8], &'b [u8]) { (n, v) };
        OpenHead {
            method: self.method,
            path: self.path,
            fields: self.fields.map(shorter).chain(std::iter::once((name, value))),
            user: self.user,
            groups: self.groups,
            uid: self.uid,
            extra: self.extra,
        }
    }

    /// How many fields, and the bytes that count against
    /// [`MAX_HEADER_BYTES`](super::frame::MAX_HEADER_BYTES): the same sums
    /// as `header_bytes` and `identity_bytes` of the owned head.
    pub fn size(&self) -> (usize, usize) {
        let (count, fields) = self.fields.clone().fold((0, 0), |(c, b), (n, v)| (c + 1, b + n.len() + v.len()));
        let identity = self.user.len()
            + self.groups.iter().map(String::len).sum::<usize>()
            + self.uid.map_or(0, str::len)
            + self.extra.iter().map(|(k, v)| k.len() + v.iter().map(String::len).sum::<usize>()).sum::<usize>();
        (count, fields + identity)
    }

    /// The owned head (tests, and callers that must keep one).
    pub fn to_owned(&self) -> RequestHead {
        RequestHead {
            method: self.method.to_string(),
            path: self.path.to_string(),
            headers: self.fields.clone().map(|(n, v)| Header::new(n, v)).collect(),
            identity: Identity {
                user: self.user.to_string(),
                groups: self.groups.to_vec(),
                uid: self.uid.map(str::to_string),
                extra: self.extra.to_vec(),
            },
        }
    }
}

impl RequestHead {
    /// This head by reference, for [`encode_open`] and `Mux::open_ref`.
    pub fn as_open(&self) -> OpenHead<'_, impl Iterator<Item = (&[u8], &[u8])> + Clone> {
        OpenHead {
            method: &self.method,
            path: &self.path,
            fields: self.headers.iter().map(|h| (h.name.as_slice(), h.value.as_slice())),
            user: &self.identity.user,
            groups: &self.identity.groups,
            uid: self.identity.uid.as_deref(),
            extra: &self.identity.extra,
        }
    }
}

/// Appends an `Open` frame from a borrowed head; `count` must be how many
/// fields `head.fields` yields. Byte for byte identical to
/// `encode(&Frame::Open { .. })` of the same head (postcard: the tag, the
/// id, method and path length-prefixed, the field count and each name
/// and value, then the identity: user, groups, uid as an `Option`, extra
/// as a sequence of key and values).
pub fn encode_open<'a, I>(
    id: StreamId,
    head: &OpenHead<'a, I>,
    count: usize,
    max: u32,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError>
where
    I: Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
{
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    push_varint(out, OPEN_TAG);
    push_varint(out, id.0);
    push_bytes(out, head.method.as_bytes());
    push_bytes(out, head.path.as_bytes());
    push_varint(out, count as u32);
    for (name, value) in head.fields.clone() {
        push_bytes(out, name);
        push_bytes(out, value);
    }
    push_bytes(out, head.user.as_bytes());
    push_strings(out, head.groups);
    match head.uid {
        None => out.push(0),
        Some(uid) => {
            out.push(1);
            push_bytes(out, uid.as_bytes());
        }
    }
    push_varint(out, head.extra.len() as u32);
    for (key, values) in head.extra {
        push_bytes(out, key.as_bytes());
        push_strings(out, values);
    }
    finish_prefix(out, start, max)
}

fn push_bytes(out: &mut Vec<u8>, b: &[u8]) {
    push_varint(out, b.len() as u32);
    out.extend_from_slice(b);
}

fn push_strings(out: &mut Vec<u8>, v: &[String]) {
    push_varint(out, v.len() as u32);
    for s in v {
        push_bytes(out, s.as_bytes());
    }
}

/// The postcard variant indexes of the frames encoded or decoded by hand.
const OPEN_TAG: u32 = 2;
const HEAD_TAG: u32 = 3;
const DATA_TAG: u32 = 4;
const WINDOW_TAG: u32 = 5;
const END_TAG: u32 = 6;

fn finish_prefix(out: &mut Vec<u8>, start: usize, max: u32) -> Result<(), EncodeError> {
    let len = out.len() - start - LEN_PREFIX;
    if len > max as usize {
        out.truncate(start);
        return Err(EncodeError::TooLarge { len, max });
    }
    out[start..start + LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

fn push_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Decodes one frame from the front of `buf`.
///
/// Returns the frame and how many bytes it took, `Ok(None)` when `buf`
/// holds only part of a frame, or an error when the bytes can never form
/// a valid frame.
pub fn decode(buf: &[u8], max: u32) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else { return Ok(None) };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    let max = max.min(MAX_FRAME_LEN);
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(DecodeError::Empty);
    }
    let end = LEN_PREFIX + len as usize;
    let Some(body) = buf.get(LEN_PREFIX..end) else { return Ok(None) };
    if let Some((frame, rest)) = decode_fast(body) {
        return if rest == 0 { Ok(Some((frame, end))) } else { Err(DecodeError::TrailingBytes(rest)) };
    }
    match postcard::take_from_bytes::<Frame>(body) {
        Ok((frame, [])) => Ok(Some((frame, end))),
        Ok((_, rest)) => Err(DecodeError::TrailingBytes(rest.len())),
        Err(e) => Err(DecodeError::Malformed(e.to_string())),
    }
}

/// Every whole frame in `bytes`, for tests that look at what a queue or
/// a mux wrote.
#[cfg(test)]
pub(crate) fn decode_all(bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some((f, n)) = decode(&bytes[at..], MAX_FRAME_LEN).unwrap() {
        frames.push(f);
        at += n;
    }
    frames
}

/// Decodes the frames every request and answer carries (`Open`, `Head`,
/// `Data`, `Window`, `End`) without serde, which at the crate's size
/// optimisation cost the agent more than the allocations themselves.
/// Returns the frame and how many bytes of `body` are left after it, or
/// `None` for any other frame and for any input it does not take, which
/// then goes to postcard: so errors keep postcard's words, and this path
/// may only ever accept what postcard accepts, as postcard decodes it (a
/// proptest compares them, also on damaged input).
pub fn decode_fast(body: &[u8]) -> Option<(Frame, usize)> {
    let mut r = Reader(body);
    let frame = match r.u32()? {
        OPEN_TAG => {
            let id = StreamId(r.u32()?);
            let method = r.string()?;
            let path = r.string()?;
            let headers = r.headers()?;
            let identity = r.identity()?;
            Frame::Open { id, head: RequestHead { method, path, headers, identity } }
        }
        HEAD_TAG => {
            let id = StreamId(r.u32()?);
            let status = r.u16()?;
            let headers = r.headers()?;
            Frame::Head { id, head: ResponseHead { status, headers } }
        }
        DATA_TAG => {
            let id = StreamId(r.u32()?);
            let data = r.bytes()?.to_vec();
            Frame::Data { id, data }
        }
        WINDOW_TAG => {
            let id = StreamId(r.u32()?);
            let increment = r.u32()?;
            Frame::Window { id, increment }
        }
        END_TAG => Frame::End { id: StreamId(r.u32()?) },
        _ => return None,
    };
    Some((frame, r.0.len()))
}

/// postcard's wire rules, read by hand: varints of at most the type's
/// length whose last byte holds no bits past the type, lengths as `u64`
/// varints, strings UTF-8, `Option` a 0 or 1 byte.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self, max_bytes: usize, last_max: u8) -> Option<u64> {
        let mut out = 0u64;
        for i in 0..max_bytes {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            out |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return (i + 1 < max_bytes || b <= last_max).then_some(out);
            }
        }
        None
    }

    fn u16(&mut self) -> Option<u16> {
        self.varint(3, 0b11).map(|v| v as u16)
    }

    fn u32(&mut self) -> Option<u32> {
        self.varint(5, 0b1111).map(|v| v as u32)
    }

    fn len(&mut self) -> Option<usize> {
        usize::try_from(self.varint(10, 1)?).ok()
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        if n > self.0.len() {
            return None;
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(b)
    }

    fn string(&mut self) -> Option<String> {
        std::str::from_utf8(self.bytes()?).ok().map(str::to_owned)
    }

    /// A sequence's length, and room for it bounded by the bytes left (an
    /// element takes at least one): a peer's count allocates nothing
    /// beyond what it sent.
    fn seq<T>(&mut self) -> Option<(usize, Vec<T>)> {
        let n = self.len()?;
        Some((n, Vec::with_capacity(n.min(self.0.len()))))
    }

    fn strings(&mut self) -> Option<Vec<String>> {
        let (n, mut v) = self.seq()?;
        for _ in 0..n {
            v.push(self.string()?);
        }
        Some(v)
    }

    fn headers(&mut self) -> Option<Vec<Header>> {
        let (n, mut v) = self.seq()?;
        for _ in 0..n {
            let name = self.bytes()?.to_vec();
            let value = self.bytes()?.to_vec();
            v.push(Header { name, value });
        }
        Some(v)
    }

    fn identity(&mut self) -> Option<Identity> {
        let user = self.string()?;
        let groups = self.strings()?;
        let (&tag, rest) = self.0.split_first()?;
        self.0 = rest;
        let uid = match tag {
            0 => None,
            1 => Some(self.string()?),
            _ => return None,
        };
        let (n, mut extra) = self.seq()?;
        for _ in 0..n {
            let key = self.string()?;
            extra.push((key, self.strings()?));
        }
        Some(Identity { user, groups, uid, extra })
    }
}

/// A receive buffer that accumulates bytes from the socket and yields
/// whole frames. It holds at most one partial frame plus whatever one read
/// brought; consumed bytes are dropped lazily to avoid a shift per frame.
///
/// The driver reads straight into it ([`Decoder::lend`]): a tunnel's
/// bytes are copied once on their way from TLS to a frame, not first into
/// a read buffer and then here. That buffer ([`READ_HOME`]) stays for the
/// session's life, as the driver's own read buffer did before; it grows
/// only for a frame larger than itself and returns to its home size once
/// that frame is decoded. [`Decoder::push`] (tests, benches) allocates only
/// what it is given.
#[derive(Debug)]
pub struct Decoder {
    /// Initialized bytes: `start..end` is undecoded input, `end..` is room.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max: u32,
}

/// The size of a session's receive buffer while it reads straight into it.
pub const READ_HOME: usize = 64 * 1024;
/// The least room a read is given: a whole TLS record's plaintext.
pub const READ_ROOM: usize = 16 * 1024 + 256;

/// The decoder's buffer lent out for one read (see [`Decoder::lend`]).
#[derive(Debug)]
pub struct InputBuf {
    buf: Vec<u8>,
    end: usize,
}

impl InputBuf {
    /// Where the read goes.
    pub fn room(&mut self) -> &mut [u8] {
        &mut self.buf[self.end..]
    }
}

impl Decoder {
    pub fn new(max: u32) -> Self {
        Decoder { buf: Vec::new(), start: 0, end: 0, max }
    }

    /// Moves the undecoded bytes to the front when that makes room for
    /// `want` more; then grows the buffer to fit them if it still must.
    fn make_room(&mut self, want: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.make_room(bytes.len());
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Lends the buffer, with at least [`READ_ROOM`] free at its end, for
    /// a read that may wait: the caller reads into [`InputBuf::room`] and
    /// hands it back with [`Decoder::filled`]. Meanwhile the decoder holds
    /// nothing (it is not fed from anywhere else).
    pub fn lend(&mut self) -> InputBuf {
        if self.buf.len() < READ_HOME {
            // A zeroed allocation, not a resize: the allocator hands out
            // fresh pages untouched (calloc), so an idle tunnel's buffer
            // costs memory only as far as reads have filled it (the hub
            // holds one per agent).
            let held = self.end - self.start;
            let mut home = vec![0u8; READ_HOME.max(held + READ_ROOM)];
            home[..held].copy_from_slice(&self.buf[self.start..self.end]);
            self.buf = home;
            self.start = 0;
            self.end = held;
        }
        self.make_room(READ_ROOM);
        InputBuf { buf: std::mem::take(&mut self.buf), end: self.end }
    }

    /// Takes the lent buffer back with `n` more bytes read into its room.
    pub fn filled(&mut self, lent: InputBuf, n: usize) {
        debug_assert!(lent.end == self.end && n <= lent.buf.len() - lent.end);
        self.buf = lent.buf;
        self.end += n;
    }

    /// The next whole frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        match decode(&self.buf[self.start..self.end], self.max)? {
            Some((frame, used)) => {
                self.start += used;
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Memory held by the buffer.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Drops an oversized idle allocation (after a frame larger than the
    /// home size, or input pushed rather than read in place).
    pub fn shrink(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() != READ_HOME {
                self.buf = Vec::new();
            }
        }
    }
}
