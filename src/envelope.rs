//! The envelope of the answers the gateway writes itself, in the upstream's shape
//! (`success`, `data` or `error`, `metadata`): refusals (`GatewayError::into_response`) and the
//! status cache's hits. One serde type, so the two cannot drift apart. The upstream's own
//! answers are read by `upstream::UpstreamAnswer`, not here.
//!
//! Fields are declared in the order `serde_json::json!` wrote them (sorted), so the bytes are
//! what they were.

use serde::Serialize;

#[derive(Serialize)]
struct Envelope<'a, D: Serialize> {
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<D>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorPart<'a>>,
    metadata: Metadata<'a>,
    success: bool,
}

#[derive(Serialize)]
struct ErrorPart<'a> {
    code: &'a str,
    message: &'a str,
    source: &'static str,
}

#[derive(Serialize)]
struct Metadata<'a> {
    action: &'a str,
    credits_consumed: u64,
    timestamp: String,
}

fn to_vec<D: Serialize>(e: &Envelope<'_, D>) -> Vec<u8> {
    serde_json::to_vec(e).unwrap_or_default()
}

/// A refusal: `error.source` is `"gateway"`, nothing was charged.
pub fn refusal(code: &str, message: &str, action: &str) -> Vec<u8> {
    to_vec(&Envelope::<()> {
        data: None,
        error: Some(ErrorPart {
            code,
            message,
            source: "gateway",
        }),
        metadata: Metadata {
            action,
            credits_consumed: 0,
            timestamp: crate::util::now_rfc3339(),
        },
        success: false,
    })
}

/// A success the gateway answers for free (`credits_consumed` 0) with `data`.
pub fn free_success<D: Serialize>(data: D, action: &str) -> Vec<u8> {
    to_vec(&Envelope {
        data: Some(data),
        error: None,
        metadata: Metadata {
            action,
            credits_consumed: 0,
            timestamp: crate::util::now_rfc3339(),
        },
        success: true,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bytes_as_the_json_macro_wrote() {
        let v: serde_json::Value =
            serde_json::from_slice(&refusal("RATE_LIMITED", "slow \"down\"", "profiles")).unwrap();
        let ts = v["metadata"]["timestamp"].as_str().unwrap().to_owned();
        let want = serde_json::json!({
            "success": false,
            "error": {"code": "RATE_LIMITED", "message": "slow \"down\"", "source": "gateway"},
            "metadata": {"action": "profiles", "credits_consumed": 0, "timestamp": ts},
        });
        assert_eq!(v, want);
        let again = refusal("RATE_LIMITED", "slow \"down\"", "profiles");
        // Sorted keys, as before: the byte form is stable apart from the timestamp.
        let s = String::from_utf8(again).unwrap();
        assert!(s.starts_with(r#"{"error":{"code":"RATE_LIMITED""#), "{s}");
        assert!(s.ends_with(r#""success":false}"#), "{s}");

        let ok = free_success(
            serde_json::json!({"account_id": "acc_1", "status": "connected"}),
            "checkpoint",
        );
        let v: serde_json::Value = serde_json::from_slice(&ok).unwrap();
        assert_eq!(v["success"], true);
        assert_eq!(v["data"]["status"], "connected");
        assert_eq!(v["metadata"]["credits_consumed"], 0);
        assert!(v.get("error").is_none());
    }
}
