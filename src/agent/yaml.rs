//! The YAML subset that kubeconfig files (k3s's `k3s.yaml`, kubectl's
//! `~/.kube/config`) and the agent's config file use, read into a
//! `serde_json::Value` so serde does the typing.
//!
//! Supported: block mappings and sequences by indentation (including a
//! sequence at its key's indentation, and `- key: value` items), plain,
//! single- and double-quoted scalars, comments, `---`, and flow
//! collections of scalars (`{}`, `[]`, `[a, "b"]`). Every scalar is a
//! string. Not supported, and reported as an error: block scalars (`|`,
//! `>`), anchors and aliases, tags, multi-line flow collections, nested
//! flow collections. A full YAML library would cost more binary than the
//! agent's whole kubeconfig reader.

use serde_json::{Map, Value};

/// Where and why a document could not be read.
#[derive(Debug, PartialEq, Eq)]
pub struct YamlError {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for YamlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

struct Line {
    no: usize,
    indent: usize,
    text: String,
}

/// Parses one document.
pub fn parse(input: &str) -> Result<Value, YamlError> {
    let mut lines = Vec::new();
    for (i, raw) in input.lines().enumerate() {
        let trimmed = raw.trim_end();
        let content = trimmed.trim_start_matches(' ');
        if content.is_empty() || content.starts_with('#') || content == "---" || content == "..." {
            continue;
        }
        if content.starts_with('\t') {
            return Err(YamlError { line: i + 1, message: "tab used for indentation".into() });
        }
        lines.push(Line { no: i + 1, indent: trimmed.len() - content.len(), text: strip_comment(content).to_string() });
    }
    if lines.is_empty() {
        return Ok(Value::Null);
    }
    let mut p = Parser { lines, pos: 0 };
    let indent = p.lines[0].indent;
    let v = p.block(indent)?;
    if let Some(l) = p.lines.get(p.pos) {
        return Err(YamlError { line: l.no, message: "unexpected indentation".into() });
    }
    Ok(v)
}

/// Removes a ` # comment` outside quotes.
fn strip_comment(s: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\'' if !double => single = !single,
            b'"' if !single && (i == 0 || bytes[i - 1] != b'\\') => double = !double,
            b'#' if !single && !double && (i == 0 || bytes[i - 1] == b' ') => return s[..i].trim_end(),
            _ => {}
        }
    }
    s
}

struct Parser {
    lines: Vec<Line>,
    pos: usize,
}

fn is_seq_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

impl Parser {
    fn err(&self, message: impl Into<String>) -> YamlError {
        let line = self.lines.get(self.pos).or(self.lines.last()).map_or(0, |l| l.no);
        YamlError { line, message: message.into() }
    }

    fn block(&mut self, indent: usize) -> Result<Value, YamlError> {
        if is_seq_item(&self.lines[self.pos].text) { self.seq(indent) } else { self.map(indent) }
    }

    fn map(&mut self, indent: usize) -> Result<Value, YamlError> {
        let mut map = Map::new();
        while let Some(line) = self.lines.get(self.pos) {
            if line.indent < indent || (line.indent == indent && is_seq_item(&line.text)) {
                break;
            }
            if line.indent > indent {
                return Err(self.err("unexpected indentation"));
            }
            let (key, rest) = split_key(&line.text).ok_or_else(|| self.err("expected `key: value`"))?;
            let key = scalar(key).map_err(|m| self.err(m))?;
            let key = match key {
                Value::String(s) => s,
                _ => return Err(self.err("a key must be a scalar")),
            };
            self.pos += 1;
            let value = if rest.is_empty() {
                match self.lines.get(self.pos) {
                    Some(next) if next.indent > indent => {
                        let i = next.indent;
                        self.block(i)?
                    }
                    Some(next) if next.indent == indent && is_seq_item(&next.text) => self.seq(indent)?,
                    _ => Value::Null,
                }
            } else {
                scalar(rest).map_err(|m| YamlError { line: self.lines[self.pos - 1].no, message: m })?
            };
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }

    fn seq(&mut self, indent: usize) -> Result<Value, YamlError> {
        let mut items = Vec::new();
        while let Some(line) = self.lines.get(self.pos) {
            if line.indent != indent || !is_seq_item(&line.text) {
                if line.indent > indent {
                    return Err(self.err("unexpected indentation"));
                }
                break;
            }
            let rest = line.text[1..].trim_start_matches(' ');
            if rest.is_empty() {
                self.pos += 1;
                match self.lines.get(self.pos) {
                    Some(next) if next.indent > indent => {
                        let i = next.indent;
                        items.push(self.block(i)?);
                    }
                    _ => items.push(Value::Null),
                }
                continue;
            }
            if is_seq_item(rest) || split_key(rest).is_some() {
                // `- key: value`: the item is a block starting at the
                // column of `key`; rewrite this line and parse it so.
                let col = line.indent + (line.text.len() - rest.len());
                let text = rest.to_string();
                self.lines[self.pos] = Line { no: line.no, indent: col, text };
                items.push(self.block(col)?);
                continue;
            }
            let v = scalar(rest).map_err(|m| self.err(m))?;
            self.pos += 1;
            items.push(v);
        }
        Ok(Value::Array(items))
    }
}

/// Splits `key: rest` (or `key:`) at the first `: ` outside quotes.
fn split_key(text: &str) -> Option<(&str, &str)> {
    let bytes = text.as_bytes();
    let mut i = 0;
    if matches!(bytes.first(), Some(b'"') | Some(b'\'')) {
        let q = bytes[0];
        i = 1;
        while i < bytes.len() && bytes[i] != q {
            i += if bytes[i] == b'\\' && q == b'"' { 2 } else { 1 };
        }
        i += 1;
    }
    while i < bytes.len() {
        if bytes[i] == b':' && (i + 1 == bytes.len() || bytes[i + 1] == b' ') {
            return Some((text[..i].trim_end(), text[i + 1..].trim()));
        }
        if i == 0 && (bytes[0] == b'{' || bytes[0] == b'[') {
            return None;
        }
        i += 1;
    }
    None
}

fn scalar(s: &str) -> Result<Value, String> {
    let s = s.trim();
    if s.starts_with('|') || s.starts_with('>') {
        return Err("block scalars (| and >) are not supported".into());
    }
    if s.starts_with('&') || s.starts_with('*') || s.starts_with('!') {
        return Err("anchors, aliases and tags are not supported".into());
    }
    if let Some(inner) = s.strip_prefix('{') {
        let inner = inner.strip_suffix('}').ok_or("unterminated flow mapping")?;
        if !inner.trim().is_empty() {
            return Err("non-empty flow mappings are not supported".into());
        }
        return Ok(Value::Object(Map::new()));
    }
    if let Some(inner) = s.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or("unterminated flow sequence")?;
        if inner.contains(['[', '{']) {
            return Err("nested flow collections are not supported".into());
        }
        let items = split_flow(inner)?;
        return items.iter().map(|i| scalar(i)).collect::<Result<Vec<_>, _>>().map(Value::Array);
    }
    if let Some(inner) = s.strip_prefix('\'') {
        let inner = inner.strip_suffix('\'').ok_or("unterminated single-quoted string")?;
        return Ok(Value::String(inner.replace("''", "'")));
    }
    if let Some(inner) = s.strip_prefix('"') {
        let inner = inner.strip_suffix('"').ok_or("unterminated double-quoted string")?;
        return unescape(inner).map(Value::String);
    }
    if s == "~" || s == "null" {
        return Ok(Value::Null);
    }
    Ok(Value::String(s.to_string()))
}

fn split_flow(inner: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in inner.chars() {
        match (quote, c) {
            (None, ',') => out.push(std::mem::take(&mut cur)),
            (None, '"' | '\'') => {
                quote = Some(c);
                cur.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                cur.push(c);
            }
            _ => cur.push(c),
        }
    }
    if quote.is_some() {
        return Err("unterminated string in flow sequence".into());
    }
    out.push(cur);
    Ok(out.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('"') => out.push('"'),
            Some('\\') => out.push('\\'),
            Some('/') => out.push('/'),
            Some(' ') => out.push(' '),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                let v = u32::from_str_radix(&hex, 16).map_err(|_| "bad \\u escape")?;
                out.push(char::from_u32(v).ok_or("bad \\u escape")?);
            }
            other => return Err(format!("unsupported escape \\{}", other.unwrap_or(' '))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn k3s_yaml() {
        let doc = "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: LS0tQ0E=
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {}
users:
- name: default
  user:
    client-certificate-data: LS0tQ0VSVA==
    client-key-data: LS0tS0VZ
";
        let v = parse(doc).unwrap();
        assert_eq!(v["clusters"][0]["cluster"]["server"], json!("https://127.0.0.1:6443"));
        assert_eq!(v["clusters"][0]["name"], json!("default"));
        assert_eq!(v["contexts"][0]["context"]["user"], json!("default"));
        assert_eq!(v["users"][0]["user"]["client-key-data"], json!("LS0tS0VZ"));
        assert_eq!(v["preferences"], json!({}));
        assert_eq!(v["current-context"], json!("default"));
    }

    #[test]
    fn kubectl_style() {
        let doc = "# written by kubectl
apiVersion: v1
clusters:
  - cluster:
      server: \"https://k.example.com\"   # quoted
      insecure-skip-tls-verify: true
    name: 'prod''s'
users:
  - name: ci
    user:
      token: abc#notacomment
      tokenFile: /var/run/token
contexts: []
list: [a, \"b c\", 'd']
nested:
  -
    - x
  - y
empty:
";
        let v = parse(doc).unwrap();
        assert_eq!(v["clusters"][0]["cluster"]["server"], json!("https://k.example.com"));
        assert_eq!(v["clusters"][0]["cluster"]["insecure-skip-tls-verify"], json!("true"));
        assert_eq!(v["clusters"][0]["name"], json!("prod's"));
        assert_eq!(v["users"][0]["user"]["token"], json!("abc#notacomment"));
        assert_eq!(v["contexts"], json!([]));
        assert_eq!(v["list"], json!(["a", "b c", "d"]));
        assert_eq!(v["nested"], json!([["x"], "y"]));
        assert_eq!(v["empty"], json!(null));
    }

    proptest::proptest! {
        /// Kubeconfigs are operator input: any text gives a value or an
        /// error, never a panic.
        #[test]
        fn never_panics(text in "([ a-z:#'\"\\\\\\[\\]{},|>&*!-]{0,12}\n){0,12}") {
            let _ = parse(&text);
        }

        #[test]
        fn never_panics_on_any_string(text in ".{0,200}") {
            let _ = parse(&text);
        }
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(parse("a: |\n  x\n").unwrap_err().line, 1);
        let e = parse("a:\n  b: 1\n   c: 2\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(parse("a: \"open\n").is_err());
        assert!(parse("just text\n").is_err());
    }
}
