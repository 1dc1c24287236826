//! Shared test support, used by several integration-test files through
//! `mod support;`. Not every file uses every helper.
#![allow(dead_code)]

pub mod https;
pub mod idp;
pub mod kube;
pub mod kubectl;
pub mod nginx;
pub mod pg;
pub mod relay;

/// Whether curl (with HTTP/2, nghttp2) is here for the tests that drive
/// the hub with it. Without it they skip loudly, and fail when
/// `UPLINK_REQUIRE_CURL=1` (CI) says they must run.
pub fn have_curl() -> bool {
    let ok = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("HTTP2"));
    if !ok {
        assert!(std::env::var_os("UPLINK_REQUIRE_CURL").is_none(), "UPLINK_REQUIRE_CURL=1 but no curl with HTTP/2");
        eprintln!("\n!!!!! SKIPPING: no curl with HTTP/2 !!!!!\n");
    }
    ok
}
