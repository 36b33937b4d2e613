//! SCRAM-SHA-256 verifiers (RFC 5802, RFC 7677) in the form PostgreSQL stores:
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
//!
//! Sending PostgreSQL a verifier instead of the password keeps the secret out of
//! its statement log. It does not spare the server the key stretching: on every
//! `CREATE ROLE … PASSWORD`, PostgreSQL checks that the verifier is not one of the
//! empty password, which runs the whole PBKDF2 again on its side. The iteration
//! count is therefore paid twice per credential (here and in the database) and
//! once more by the client at each login; see [`DEFAULT_ITERATIONS`] for why Lapse
//! can keep it low.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Iterations when the config says nothing: PostgreSQL's own default and RFC
/// 7677's minimum.
///
/// Key stretching exists to slow offline guessing of a *low-entropy* password from
/// a stolen verifier. Lapse's passwords are 256 bits from the CSPRNG, so guessing
/// is out of reach at any count, and the other attacks on a stolen verifier
/// (impersonating the server, logging in with a captured exchange) do not depend
/// on it. An operator may therefore lower `scram_iterations` (e.g. to 64) to spare
/// the target database the stretching it repeats on every role creation: about five
/// times the grants per second on the benchmark machine (BENCHMARKS.md). The
/// default stays at 4,096 so that no audit of the target has to be argued with.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// The most a config may ask for: beyond this one credential would cost seconds.
pub const MAX_ITERATIONS: u32 = 1_000_000;

const SALT_LEN: usize = 16;

/// The verifier of `password` with a fresh random salt.
///
/// `password` must already be in SASLprep normal form; Lapse's generated secrets
/// are base64url ASCII, which is.
pub fn verifier(password: &str, iterations: u32) -> String {
    let salt: [u8; SALT_LEN] = rand::random();
    verifier_with_salt(password, &salt, iterations)
}

#[expect(
    clippy::expect_used,
    reason = "HMAC accepts keys of any length; `new_from_slice` never fails for it"
)]
fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

pub(crate) fn verifier_with_salt(password: &str, salt: &[u8], iterations: u32) -> String {
    let iterations = iterations.clamp(1, MAX_ITERATIONS);
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Plays the server side of a SCRAM-SHA-256 exchange with `verifier` against
    /// tokio-postgres's own client implementation (an independent one): the client
    /// must be accepted with the right password, and must accept the server's
    /// signature.
    fn authenticate(verifier: &str, password: &str) -> bool {
        let (head, keys) = verifier
            .strip_prefix("SCRAM-SHA-256$")
            .unwrap()
            .split_once('$')
            .unwrap();
        let (iterations, salt) = head.split_once(':').unwrap();
        let (stored, server) = keys.split_once(':').unwrap();
        let stored = STANDARD.decode(stored).unwrap();
        let server_key = STANDARD.decode(server).unwrap();

        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let first = String::from_utf8(client.message().to_vec()).unwrap();
        let first_bare = first.strip_prefix("n,,").unwrap().to_owned();
        let client_nonce = first_bare.split_once("r=").unwrap().1.to_owned();
        let server_first = format!("r={client_nonce}srvnonce,s={salt},i={iterations}");
        client.update(server_first.as_bytes()).unwrap();
        let last = String::from_utf8(client.message().to_vec()).unwrap();
        let (without_proof, proof) = last.rsplit_once(",p=").unwrap();
        let proof = STANDARD.decode(proof).unwrap();
        let auth_message = format!("{first_bare},{server_first},{without_proof}");
        let signature = hmac(&stored, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        if Sha256::digest(&client_key)[..] != stored[..] {
            return false;
        }
        let server_signature = hmac(&server_key, auth_message.as_bytes());
        let server_final = format!("v={}", STANDARD.encode(server_signature));
        client.finish(server_final.as_bytes()).is_ok()
    }

    #[test]
    fn a_client_authenticates_against_the_verifier() {
        for iterations in [1, 64, DEFAULT_ITERATIONS] {
            let v = verifier("correct horse", iterations);
            assert!(
                v.starts_with(&format!("SCRAM-SHA-256${iterations}:")),
                "{v}"
            );
            assert!(authenticate(&v, "correct horse"), "{iterations}");
            assert!(!authenticate(&v, "wrong horse"), "{iterations}");
        }
    }

    #[test]
    fn known_vector() {
        // Computed independently with Python's hashlib/hmac (pbkdf2_hmac, 4096
        // iterations, salt = 16 bytes 0x00..0x0f, password "pencil").
        let salt: Vec<u8> = (0u8..16).collect();
        assert_eq!(verifier_with_salt("pencil", &salt, 4096), KNOWN);
    }

    const KNOWN: &str = "SCRAM-SHA-256$4096:AAECAwQFBgcICQoLDA0ODw==$zHCdol2044/ZyWzPLi7oxApCkamKw9Z+E4U/QApd/5Y=:dd5peBOitVnLNFu7VmwP+HiDaaw4OUCv396eVCWhYiE=";

    #[test]
    fn salts_differ_and_counts_are_clamped() {
        assert_ne!(verifier("x", 1), verifier("x", 1));
        assert!(verifier_with_salt("x", &[0; 16], 0).starts_with("SCRAM-SHA-256$1:"));
    }
}
