//! Signed webhooks as a Standard Webhooks sender makes them, for the tests and benchmarks that
//! post to `/v1/connectors/{name}/webhook`.

use std::time::{SystemTime, UNIX_EPOCH};

use connectors::WebhookSecret;
use reqwest::RequestBuilder;

/// The secret the test connectors verify with (and sign their deliveries with).
pub const TEST_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Seconds since the Unix epoch, as a `webhook-timestamp`.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// `request` with a JSON `body`, signed by `secret` as webhook `id` sent at `timestamp`.
pub fn signed(
    request: RequestBuilder,
    secret: &WebhookSecret,
    id: &str,
    timestamp: i64,
    body: Vec<u8>,
) -> RequestBuilder {
    let signature = secret.sign(id, timestamp, &body);
    request
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
}
