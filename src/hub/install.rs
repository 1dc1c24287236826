//! The activation document the hub hands out at registration; the
//! manifest and activation file around it are rendered by
//! [`crate::render`].

use serde::{Deserialize, Serialize};

/// The activation an agent reads (CONVENTIONS.md "Activation"); also the
/// content of the Secret key `activation.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ActivationDoc {
    pub cluster: String,
    pub hub_url: String,
    pub activation_id: String,
    pub activation_code: String,
    /// RFC 3339 UTC.
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_pin_sha256: Option<String>,
}
