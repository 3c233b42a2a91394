//! Standard Webhooks signing (<https://www.standardwebhooks.com/>), what lets a relay
//! check that a callback comes from this agent and was not replayed:
//!
//! ```text
//! webhook-id:        {event_id}                  (the same on every attempt)
//! webhook-timestamp: {unix seconds of this attempt}
//! webhook-signature: v1,{base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))}
//! ```
//!
//! `key` is the base64-decoded part of the provider's `whsec_…` secret.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::peers::relays::SigningKey;

/// `v1,<base64 signature>` of `body` sent as message `id` at `timestamp`.
pub(crate) fn signature(key: &SigningKey, id: &str, timestamp: u64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key.bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference libraries.
    #[test]
    fn matches_the_reference_vector() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
