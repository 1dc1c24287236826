//! Kubernetes `Status` (meta/v1) failures, written as the API server
//! writes them, for the errors the agent and the hub answer themselves:
//! kubectl then prints them as it prints the cluster's own ("Error from
//! server (Forbidden): ...").
//!
//! Not here: which code or reason an error gets (each caller decides),
//! `details`, success statuses.

use serde_json::{Value, json};

/// A `Status` with `status: Failure`. `reason` is a Kubernetes
/// `StatusReason` (`Forbidden`, `ServiceUnavailable`, ...) matching `code`.
pub fn failure(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}
