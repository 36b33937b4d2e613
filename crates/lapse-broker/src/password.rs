//! Console passwords at rest: Argon2id PHC strings (`password_argon2` in the
//! config), checked when the config loads and made by `lapse operator hash-password`.

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};

/// Checks that `phc` is an Argon2id PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`).
pub fn check_password_hash(phc: &str) -> Result<(), String> {
    let h = PasswordHash::new(phc).map_err(|e| format!("not a PHC string: {e}"))?;
    if h.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "algorithm `{}` is not accepted; use argon2id",
            h.algorithm
        ));
    }
    if h.hash.is_none() {
        return Err("the PHC string has no hash".into());
    }
    Ok(())
}

/// Hashes a console password with Argon2id and a random salt (OWASP parameters).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use argon2::password_hash::PasswordVerifier;

    #[test]
    fn password_hashes_are_argon2id_and_verify() {
        let phc = hash_password("correct horse").unwrap();
        check_password_hash(&phc).unwrap();
        let h = PasswordHash::new(&phc).unwrap();
        let a = argon2::Argon2::default();
        assert!(a.verify_password(b"correct horse", &h).is_ok());
        assert!(a.verify_password(b"wrong horse", &h).is_err());
    }

    #[test]
    fn other_hash_formats_are_refused() {
        assert!(check_password_hash("plaintext").is_err());
        assert!(
            check_password_hash("$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo")
                .unwrap_err()
                .contains("argon2id")
        );
    }
}
