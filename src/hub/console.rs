//! The web console: plain HTML, CSS and JavaScript modules compiled into
//! the binary (no CDN, no network beyond the hub: edge sites are often
//! air-gapped; no JavaScript toolchain at build time).
//!
//! ```text
//!  GET /                        index.html   Cache-Control: no-cache
//!  GET /assets/BUILD/app.js     a module     Cache-Control: immutable, 1 year
//!  GET /assets/OTHER/...        404          (an older or newer hub's assets)
//! ```
//!
//! `BUILD` is a digest of every asset, so a new hub binary gets new asset
//! URLs and browsers never mix old and new modules; `index.html` names it
//! (`{{BUILD}}` is replaced when served) and is revalidated on every load.
//! The modules import each other by relative URL, so they stay under the
//! same `BUILD`.
//!
//! Every answer carries a strict Content-Security-Policy: scripts, styles
//! and fetches from the hub only, no inline script or style, no framing.
//! The console talks only to `/api/v1/...` and `/k8s/clusters/NAME/...`
//! (and `/auth/logout`), as the signed-in person: with their bearer
//! token, which it keeps in `sessionStorage` and never puts in a URL, or
//! with the session cookie of a sign-in through the identity provider
//! (`/auth/login`, [`super::oidc::browser`]) plus its CSRF token.
//!
//! Not here: any server-side rendering, or the session itself
//! ([`super::oidc::browser`]); the console is a client of the same REST
//! and kube endpoints as the CLI and kubectl.

use super::http::{Request, Response};
use std::sync::OnceLock;

/// One embedded file.
struct Asset {
    /// Name under `/assets/BUILD/`.
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $ct:expr) => {
        Asset { name: $name, content_type: $ct, body: include_bytes!(concat!("console/", $name)) }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

const ASSETS: &[Asset] = &[
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("icon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("clusters.js", JS),
    asset!("cluster.js", JS),
    asset!("fleet.js", JS),
    asset!("admin.js", JS),
];

const INDEX: &str = include_str!("console/index.html");

/// No inline script or style, nothing from elsewhere, no framing, forms
/// never submit (the modules handle them).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Whether `path` belongs to the console.
pub fn is_console_path(path: &str) -> bool {
    path == "/" || path == "/index.html" || path.starts_with("/assets/")
}

/// The digest of all assets (16 hex digits), computed once.
fn build_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for a in ASSETS {
            ctx.update(a.name.as_bytes());
            ctx.update(&(a.body.len() as u64).to_be_bytes());
            ctx.update(a.body);
        }
        ctx.update(INDEX.as_bytes());
        ctx.finish().as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    })
}

fn secure(r: Response) -> Response {
    r.with_header("Content-Security-Policy", CSP)
        .with_header("X-Frame-Options", "DENY")
        .with_header("Referrer-Policy", "no-referrer")
        .with_header("Cross-Origin-Opener-Policy", "same-origin")
        .with_header("Cross-Origin-Resource-Policy", "same-origin")
}

/// Serves a console path (see [`is_console_path`]); `GET` and `HEAD` only.
pub fn serve(req: &Request) -> Response {
    let path = req.target().split('?').next().unwrap_or("");
    if path == "/" || path == "/index.html" {
        let html = INDEX.replace("{{BUILD}}", build_id());
        return secure(Response::new(200, "text/html; charset=utf-8", html).with_header("Cache-Control", "no-cache"));
    }
    let asset = path
        .strip_prefix("/assets/")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(build, _)| *build == build_id())
        .and_then(|(_, name)| ASSETS.iter().find(|a| a.name == name));
    match asset {
        Some(a) => secure(
            Response::new(200, a.content_type, a.body)
                .with_header("Cache-Control", "public, max-age=31536000, immutable"),
        ),
        None => secure(
            Response::new(
                404,
                "text/plain; charset=utf-8",
                "no such console file; reload the console (the hub may have been upgraded)\n",
            )
            .with_header("Cache-Control", "no-store"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(target: &str) -> Response {
        serve(&Request::new("GET", target, crate::hub::http::Proto::Http11, &[]).unwrap())
    }

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    #[test]
    fn index_names_the_build_and_is_revalidated() {
        let r = get("/");
        assert_eq!(r.status, 200);
        assert!(r.content_type.starts_with("text/html"));
        let body = String::from_utf8(r.body.clone()).unwrap();
        assert!(body.contains(&format!("/assets/{}/app.js", build_id())), "{body}");
        assert!(!body.contains("{{BUILD}}"));
        assert_eq!(header(&r, "cache-control"), Some("no-cache"));
        assert_eq!(header(&r, "content-security-policy"), Some(CSP));
        assert_eq!(header(&r, "x-frame-options"), Some("DENY"));
    }

    #[test]
    fn assets_are_immutable_under_their_build_with_types() {
        for (name, ct) in [("app.js", "text/javascript"), ("style.css", "text/css"), ("icon.svg", "image/svg+xml")] {
            let r = get(&format!("/assets/{}/{name}", build_id()));
            assert_eq!(r.status, 200, "{name}");
            assert!(r.content_type.starts_with(ct), "{name}: {}", r.content_type);
            assert!(header(&r, "cache-control").unwrap().contains("immutable"));
            assert_eq!(header(&r, "content-security-policy"), Some(CSP));
        }
    }

    #[test]
    fn other_builds_and_unknown_names_are_404() {
        for p in ["/assets/0000000000000000/app.js", "/assets/app.js", &format!("/assets/{}/nope.js", build_id())] {
            let r = get(p);
            assert_eq!(r.status, 404, "{p}");
            assert_eq!(header(&r, "cache-control"), Some("no-store"));
        }
        assert!(is_console_path("/") && is_console_path("/assets/x") && !is_console_path("/api/v1/hub"));
    }

    #[test]
    fn csp_forbids_inline_code_and_foreign_origins() {
        assert!(!CSP.contains("unsafe-inline") && !CSP.contains("unsafe-eval") && !CSP.contains("http"));
        // The embedded files follow it: no inline script, style or handlers.
        assert!(!INDEX.contains("<style") && !INDEX.contains("style="));
        let handler = INDEX.split(" on").skip(1).any(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert!(!handler, "no inline event handlers");
        assert_eq!(INDEX.matches("<script").count(), 1);
        for a in ASSETS.iter().filter(|a| a.name.ends_with(".js") || a.name.ends_with(".css")) {
            let text = String::from_utf8_lossy(a.body);
            // Names (IAM ARNs, `<`, `&`, quotes) and cluster data stay text.
            for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "createContextualFragment"] {
                assert!(!text.contains(sink), "{}: build DOM nodes, never HTML strings ({sink})", a.name);
            }
            assert!(!text.contains("http://") && !text.contains("https://"), "{}: no foreign URLs", a.name);
        }
    }
}
