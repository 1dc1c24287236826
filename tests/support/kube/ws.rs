//! WebSocket (RFC 6455) for `pods/exec`, `pods/attach` (the
//! `v5.channel.k8s.io` / `v4.channel.k8s.io` stream protocols) and for the
//! port-forward tunnel (`SPDY/3.1+portforward.k8s.io`).
//!
//! Channel protocol: every binary message starts with a channel byte:
//! 0 stdin, 1 stdout, 2 stderr, 3 error (a `Status` JSON at the end),
//! 4 resize; v5 adds 255, "close": `[255, channel]` half-closes a stream.
//!
//! The exec'd "container" is a tiny shell: `echo ARGS`, `cat` (echoes
//! stdin until it closes), `true`, `false`, `exit N`, `sleep N`, joined with
//! `;` or `&&` inside `sh -c '...'`; `echo ... >&2` writes to stderr.

use std::io;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use super::http::{Conn, POLL, Request};
use super::server::Ex;
use super::status;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest message the stand-in accepts from a client.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

pub fn offered_protocols(req: &Request) -> Vec<String> {
    req.headers
        .iter()
        .filter(|(n, _)| n == "sec-websocket-protocol")
        .flat_map(|(_, v)| v.split(',').map(|p| p.trim().to_string()))
        .filter(|p| !p.is_empty())
        .collect()
}

/// Answers the opening handshake with `protocol`.
pub fn accept(ex: &mut Ex, req: &Request, protocol: &str) -> io::Result<()> {
    let key = req.header("sec-websocket-key").unwrap_or("");
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, format!("{key}{GUID}").as_bytes());
    let accept = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
    let h = [
        ("Upgrade", "websocket".to_string()),
        ("Connection", "Upgrade".to_string()),
        ("Sec-WebSocket-Accept", accept),
        ("Sec-WebSocket-Protocol", protocol.to_string()),
    ];
    ex.head(101, &h, Some(0))?;
    ex.conn.write_all(b"")
}

/// One complete message (fragments joined).
pub enum Msg {
    Binary(Vec<u8>),
    Text(Vec<u8>),
    Close,
}

/// Server side of a WebSocket on a [`Conn`].
pub struct WsPipe<'a> {
    pub conn: &'a mut Conn,
    partial: Vec<u8>,
    partial_op: u8,
    closed: bool,
}

impl<'a> WsPipe<'a> {
    pub fn new(conn: &'a mut Conn) -> Self {
        conn.set_read_timeout(Duration::from_millis(10));
        WsPipe { conn, partial: Vec::new(), partial_op: 0, closed: false }
    }

    /// Parses one frame from the buffer.
    fn frame(&mut self) -> io::Result<Option<(bool, u8, Vec<u8>)>> {
        let b = &self.conn.buf;
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        let op = b[0] & 0x0f;
        let masked = b[1] & 0x80 != 0;
        let mut len = (b[1] & 0x7f) as usize;
        let mut at = 2;
        if len == 126 {
            if b.len() < 4 {
                return Ok(None);
            }
            len = u16::from_be_bytes([b[2], b[3]]) as usize;
            at = 4;
        } else if len == 127 {
            if b.len() < 10 {
                return Ok(None);
            }
            let l = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
            if l > MAX_MESSAGE as u64 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "websocket frame too large"));
            }
            len = l as usize;
            at = 10;
        }
        let mask = if masked {
            if b.len() < at + 4 {
                return Ok(None);
            }
            let m = [b[at], b[at + 1], b[at + 2], b[at + 3]];
            at += 4;
            Some(m)
        } else {
            None
        };
        if b.len() < at + len {
            return Ok(None);
        }
        let mut payload = b[at..at + len].to_vec();
        if let Some(m) = mask {
            for (i, x) in payload.iter_mut().enumerate() {
                *x ^= m[i % 4];
            }
        }
        self.conn.buf.drain(..at + len);
        Ok(Some((fin, op, payload)))
    }

    /// The next message, waiting at most about one poll interval.
    /// `Ok(None)` means nothing yet; an error means the peer is gone.
    pub fn recv_msg(&mut self) -> io::Result<Option<Msg>> {
        if self.closed {
            return Ok(Some(Msg::Close));
        }
        loop {
            while let Some((fin, op, payload)) = self.frame()? {
                match op {
                    0x8 => {
                        let _ = self.send_frame(0x8, &payload[..payload.len().min(2)]);
                        self.closed = true;
                        return Ok(Some(Msg::Close));
                    }
                    0x9 => self.send_frame(0xA, &payload)?,
                    0xA => {}
                    0x0..=0x2 => {
                        if op != 0 {
                            self.partial_op = op;
                            self.partial.clear();
                        }
                        self.partial.extend_from_slice(&payload);
                        if self.partial.len() > MAX_MESSAGE {
                            return Err(io::Error::new(io::ErrorKind::InvalidData, "websocket message too large"));
                        }
                        if fin {
                            let data = std::mem::take(&mut self.partial);
                            return Ok(Some(if self.partial_op == 1 { Msg::Text(data) } else { Msg::Binary(data) }));
                        }
                    }
                    _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "unknown websocket opcode")),
                }
            }
            if self.conn.stopping.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(io::ErrorKind::ConnectionAborted.into());
            }
            match self.conn.fill()? {
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }

    pub fn send_frame(&mut self, op: u8, payload: &[u8]) -> io::Result<()> {
        let mut h = vec![0x80 | op];
        match payload.len() {
            n if n < 126 => h.push(n as u8),
            n if n < 65536 => {
                h.push(126);
                h.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                h.push(127);
                h.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        h.extend_from_slice(payload);
        self.conn.write_all(&h)
    }

    pub fn send_binary(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send_frame(0x2, payload)
    }

    pub fn close(&mut self) {
        let _ = self.send_frame(0x8, &1000u16.to_be_bytes());
        self.closed = true;
    }
}

impl Drop for WsPipe<'_> {
    fn drop(&mut self) {
        self.conn.set_read_timeout(POLL);
    }
}

// ---- exec / attach ----------------------------------------------------------------

const EXEC_PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// Entry point for `pods/exec` and `pods/attach`; false closes the connection.
pub fn exec_entry(ex: &mut Ex, req: &Request, ns: &str, name: &str, sub: &str) -> bool {
    let pods = super::discovery::find("", "v1", "pods").expect("pods");
    let Some(pod) = ex.shared.lock().store.get(pods, ns, name).cloned() else {
        ex.status(status(404, "NotFound", &format!("pods {name:?} not found"), json!({"name": name, "kind": "pods"})));
        return true;
    };
    if let Some(c) = req.query("container").filter(|c| !c.is_empty()) {
        let ok = pod["spec"]["containers"].as_array().is_some_and(|cs| cs.iter().any(|x| x["name"] == c));
        if !ok {
            ex.status(status(400, "BadRequest", &format!("container {c} is not valid for pod {name}"), json!({})));
            return true;
        }
    }
    if pod["status"]["phase"] != "Running" {
        let phase = pod["status"]["phase"].as_str().unwrap_or("Unknown");
        let msg = format!("cannot exec into a container in a completed pod; current phase is {phase}");
        ex.status(status(400, "BadRequest", &msg, json!({})));
        return true;
    }
    let mut command = req.query_all("command");
    if sub == "attach" {
        command = vec!["cat".into()];
    }
    if sub == "exec" && command.is_empty() {
        ex.status(status(400, "BadRequest", "you must specify at least 1 command", json!({})));
        return true;
    }
    match req.upgrade().as_deref() {
        Some("websocket") => {}
        Some(_) => {
            // SPDY is not spoken for exec: kubectl only falls back to it when
            // the WebSocket upgrade is refused, and this one never is.
            ex.status(status(400, "BadRequest", "the stand-in speaks exec over WebSocket only", json!({})));
            return true;
        }
        None => {
            ex.status(status(400, "BadRequest", "Upgrade request required", json!({})));
            return true;
        }
    }
    let offered = offered_protocols(req);
    let Some(proto) = offered.iter().find(|p| EXEC_PROTOCOLS.contains(&p.as_str())).cloned() else {
        ex.status(status(
            400,
            "BadRequest",
            &format!("unable to upgrade: no supported protocol in {offered:?}"),
            json!({}),
        ));
        return true;
    };
    if accept(ex, req, &proto).is_err() {
        return false;
    }
    let stdin = req.query_true("stdin") || req.query_true("input");
    let mut ws = WsPipe::new(ex.conn);
    let mut sh = Shell { ws: &mut ws, v5: proto.starts_with("v5"), stdin_open: stdin, pending: Vec::new(), exit: None };
    let code = sh.run(&command);
    let st = if code == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else {
        json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command [{}], exit code {code}", command.join(" ")),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        })
    };
    let mut msg = vec![3u8];
    msg.extend(serde_json::to_vec(&st).unwrap_or_default());
    let _ = ws.send_binary(&msg);
    ws.close();
    // Give the client a moment to read the close before the TLS close.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        match ws.recv_msg() {
            Ok(Some(Msg::Close)) | Err(_) => break,
            _ => {}
        }
    }
    false
}

struct Shell<'a, 'b> {
    ws: &'a mut WsPipe<'b>,
    v5: bool,
    stdin_open: bool,
    /// stdin that arrived before a `cat` asked for it.
    pending: Vec<u8>,
    /// Set by `exit N`.
    exit: Option<i32>,
}

impl Shell<'_, '_> {
    fn out(&mut self, channel: u8, data: &[u8]) -> io::Result<()> {
        let mut m = vec![channel];
        m.extend_from_slice(data);
        self.ws.send_binary(&m)
    }

    /// Runs the command, returning its exit status.
    fn run(&mut self, argv: &[String]) -> i32 {
        let script = match argv {
            [sh, c, script, ..] if (sh == "sh" || sh == "/bin/sh" || sh == "bash") && c == "-c" => script.clone(),
            _ => argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "),
        };
        let mut code = 0;
        for (step, op) in split_script(&script) {
            if op == "&&" && code != 0 {
                continue;
            }
            match self.step(&step) {
                Ok(Some(c)) => code = c,
                Ok(None) => return self.exit.unwrap_or(code),
                Err(_) => return 1,
            }
        }
        code
    }

    /// One simple command. `Ok(None)` means the shell exits now.
    fn step(&mut self, step: &str) -> io::Result<Option<i32>> {
        let words = split_words(step);
        let Some(cmd) = words.first() else { return Ok(Some(0)) };
        let args = &words[1..];
        match cmd.as_str() {
            "echo" => {
                let (args, to_err) = match args.last().map(String::as_str) {
                    Some(">&2" | "1>&2") => (&args[..args.len() - 1], true),
                    _ => (args, false),
                };
                let line = format!("{}\n", args.join(" "));
                self.out(if to_err { 2 } else { 1 }, line.as_bytes())?;
                Ok(Some(0))
            }
            "true" => Ok(Some(0)),
            "false" => Ok(Some(1)),
            "exit" => {
                self.exit = Some(args.first().and_then(|a| a.parse().ok()).unwrap_or(0));
                Ok(None)
            }
            "sleep" => {
                let secs: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(0.0);
                std::thread::sleep(Duration::from_secs_f64(secs.min(30.0)));
                Ok(Some(0))
            }
            "cat" => {
                let pending = std::mem::take(&mut self.pending);
                self.out(1, &pending)?;
                while self.stdin_open {
                    match self.ws.recv_msg()? {
                        None => {}
                        Some(Msg::Close) => {
                            self.stdin_open = false;
                        }
                        Some(Msg::Binary(m)) | Some(Msg::Text(m)) => self.channel_msg(&m, true)?,
                    }
                }
                Ok(Some(0))
            }
            other => {
                self.out(2, format!("sh: {other}: not found\n").as_bytes())?;
                Ok(Some(127))
            }
        }
    }

    fn channel_msg(&mut self, m: &[u8], echo: bool) -> io::Result<()> {
        match m.first() {
            Some(0) if echo => self.out(1, &m[1..]),
            Some(0) => {
                self.pending.extend_from_slice(&m[1..]);
                Ok(())
            }
            Some(255) if self.v5 && m.get(1) == Some(&0) => {
                self.stdin_open = false;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn shell_quote(a: &str) -> String {
    if a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c)) && !a.is_empty() {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// Splits a script on `;` and `&&` outside quotes: `(command, operator before it)`.
fn split_script(s: &str) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    let (mut cur, mut op, mut quote) = (String::new(), ";", None::<char>);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quote) {
            ('\'' | '"', None) => {
                quote = Some(c);
                cur.push(c)
            }
            (q, Some(open)) if q == open => {
                quote = None;
                cur.push(c)
            }
            (';' | '\n', None) => {
                out.push((std::mem::take(&mut cur), op));
                op = ";";
            }
            ('&', None) if chars.peek() == Some(&'&') => {
                chars.next();
                out.push((std::mem::take(&mut cur), op));
                op = "&&";
            }
            _ => cur.push(c),
        }
    }
    out.push((cur, op));
    out.into_iter().filter(|(c, _)| !c.trim().is_empty()).collect()
}

/// Splits a command into words, honouring single and double quotes.
fn split_words(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut quote, mut any) = (Vec::new(), String::new(), None::<char>, false);
    for c in s.chars() {
        match (c, quote) {
            ('\'' | '"', None) => {
                quote = Some(c);
                any = true;
            }
            (q, Some(open)) if q == open => quote = None,
            (w, None) if w.is_whitespace() => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            _ => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}
