//! User and group names as Kubernetes has them, and the one rule uplink
//! adds: they must travel intact in an `Impersonate-User` or
//! `Impersonate-Group` field value.
//!
//! Kubernetes user and group names are free strings: IAM ARNs
//! (`arn:aws:iam::1234567890:user/Alice`), emails, OIDC subjects with
//! their issuer (`oidc:https://idp.example.com#42`), `system:` groups,
//! names with spaces, any UTF-8. The API server compares them byte for
//! byte with the subjects of RBAC bindings. So uplink refuses only what a
//! field value cannot carry unchanged (RFC 9110 §5.5):
//!
//! - control characters (C0 including CR, LF, NUL and TAB, DEL, and the
//!   C1 controls U+0080–U+009F): CR and LF would end the field, and Go's
//!   `net/http` (kube-apiserver) refuses a value with any of them;
//! - a space at either end: a recipient strips optional white space
//!   around a field value (RFC 9110 §5.5), so `" alice"` would reach the
//!   cluster as `"alice"`, another person;
//! - the empty name, which in `Impersonate-User` means "do not
//!   impersonate";
//! - names longer than [`MAX_NAME_BYTES`].
//!
//! Everything else, UTF-8 included, is sent as its bytes: Go's
//! `net/http` accepts bytes 0x80–0xFF in field values (obs-text) and
//! hands them on unchanged.
//!
//! The hub checks names where people give them (users, groups, grants,
//! registrations); the agent checks again before it writes the fields, so
//! neither trusts the other to have done it. Not here: whether a cluster
//! grants anything to a name (its RBAC decides), or how names are quoted
//! in URLs, YAML or shell lines (where they are written).

use std::fmt;

/// Longest name accepted, in bytes of UTF-8. Kubernetes sets no limit;
/// the longest real names are IAM ARNs with a path (a 512-byte path and
/// a 64-byte name, about 600 bytes in all) and OIDC subjects (up to 255
/// bytes) behind their issuer URL. 1 KiB holds those and keeps a person
/// with dozens of groups far below the tunnel's header budget
/// (`proto::MAX_HEADER_BYTES`) and the API server's 1 MiB header limit.
pub const MAX_NAME_BYTES: usize = 1024;

/// What a name is used as; it only changes the words of an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    User,
    Group,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::User => "user name",
            NameKind::Group => "group name",
        })
    }
}

/// Why a name cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameError {
    /// The name is empty.
    Empty(NameKind),
    /// The name is longer than [`MAX_NAME_BYTES`]; `bytes` is its length.
    TooLong { kind: NameKind, bytes: usize },
    /// The name holds the control character `ch` at byte offset `at`.
    Control { kind: NameKind, name: String, ch: char, at: usize },
    /// The name starts or ends with a space, which a recipient would strip.
    EdgeSpace { kind: NameKind, name: String, at: usize },
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty(kind) => write!(f, "a {kind} may not be empty"),
            NameError::TooLong { kind, bytes } => {
                write!(f, "a {kind} of {bytes} bytes is too long; names may be at most {MAX_NAME_BYTES} bytes")
            }
            NameError::Control { kind, name, ch, at } => write!(
                f,
                "{kind} {name:?} has a control character U+{:04X} at byte {at}; names may hold any printable character",
                u32::from(*ch)
            ),
            NameError::EdgeSpace { kind, name, at } => write!(
                f,
                "{kind} {name:?} has a space at byte {at}; names may not start or end with white space, \
                 which HTTP strips from the Impersonate-* field"
            ),
        }
    }
}

impl std::error::Error for NameError {}

/// Checks that `name` can be a Kubernetes user or group name carried in
/// an `Impersonate-*` field, unchanged (see the module docs).
pub fn check(kind: NameKind, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty(kind));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong { kind, bytes: name.len() });
    }
    if let Some((at, ch)) = name.char_indices().find(|(_, c)| c.is_control()) {
        return Err(NameError::Control { kind, name: name.to_owned(), ch, at });
    }
    if name.starts_with(' ') {
        return Err(NameError::EdgeSpace { kind, name: name.to_owned(), at: 0 });
    }
    if name.ends_with(' ') {
        return Err(NameError::EdgeSpace { kind, name: name.to_owned(), at: name.len() - 1 });
    }
    Ok(())
}

/// [`check`] for a user name.
pub fn check_user(name: &str) -> Result<(), NameError> {
    check(NameKind::User, name)
}

/// [`check`] for a group name.
pub fn check_group(name: &str) -> Result<(), NameError> {
    check(NameKind::Group, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names Kubernetes clusters bind to, all accepted as they are.
    pub const ACCEPTED: &[&str] = &[
        "alice",
        "arn:aws:iam::1234567890:user/Alice",
        "arn:aws:iam::1234567890:role/Admins",
        "arn:aws:sts::1234567890:assumed-role/Admins/jane@example.com",
        "jane@example.com",
        "oidc:https://idp.example.com#42",
        "system:masters",
        "system:serviceaccount:uplink:uplink-agent",
        "Jane Doe",
        "Zoë Ångström",
        "山田",
        "a,b",
        "quote\"back\\slash",
        "100% {{curly}} <tag> & 'single'",
        "emoji 🦀",
        "line\u{2028}separator",
        "no\u{a0}break",
    ];

    #[test]
    fn accepted_names() {
        for name in ACCEPTED {
            assert_eq!(check_user(name), Ok(()), "{name:?}");
            assert_eq!(check_group(name), Ok(()), "{name:?}");
        }
        assert_eq!(check_user(&"é".repeat(MAX_NAME_BYTES / 2)), Ok(()));
    }

    #[test]
    fn refused_names_say_which_character_and_where() {
        let cases: &[(&str, &str)] = &[
            ("", "a user name may not be empty"),
            (
                "a\nb",
                r#"user name "a\nb" has a control character U+000A at byte 1; names may hold any printable character"#,
            ),
            (
                "evil\r\nImpersonate-User: root",
                r#"user name "evil\r\nImpersonate-User: root" has a control character U+000D at byte 4"#,
            ),
            ("nul\0", "has a control character U+0000 at byte 3"),
            ("tab\there", "has a control character U+0009 at byte 3"),
            ("del\u{7f}", "has a control character U+007F at byte 3"),
            ("Zoë\u{85}", "has a control character U+0085 at byte 4"),
            ("c1\u{9b}31m", "has a control character U+009B at byte 2"),
            ("esc\u{1b}[0m", "has a control character U+001B at byte 3"),
            (
                " alice",
                r#"user name " alice" has a space at byte 0; names may not start or end with white space, which HTTP strips from the Impersonate-* field"#,
            ),
            ("alice ", r#"user name "alice " has a space at byte 5"#),
        ];
        for (name, message) in cases {
            let e = check_user(name).expect_err(name);
            assert!(e.to_string().contains(message), "{name:?}: {e}");
        }
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(
            check_group(&long).unwrap_err().to_string(),
            "a group name of 1025 bytes is too long; names may be at most 1024 bytes"
        );
        assert_eq!(
            check_group("a\nb").unwrap_err().to_string().split(' ').take(2).collect::<Vec<_>>(),
            ["group", "name"]
        );
    }
}
