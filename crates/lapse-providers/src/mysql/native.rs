//! The `mysql_native_password` verifier of a password: `*` and the uppercase
//! hex of SHA1(SHA1(password)), as MariaDB stores it.
//!
//! MariaDB writes `CREATE USER … IDENTIFIED BY '<password>'` to its general log
//! as sent, password included (checked on 10.11; it cannot be a
//! bound parameter either). `IDENTIFIED BY PASSWORD '<verifier>'` hands over the
//! verifier instead, so the password itself never reaches the server. The
//! verifier is unsalted, which is harmless for Lapse's 256-bit random passwords.

use sha1::{Digest, Sha1};

pub fn verifier(password: &str) -> String {
    let twice = Sha1::digest(Sha1::digest(password.as_bytes()));
    let mut out = String::with_capacity(41);
    out.push('*');
    for b in twice {
        out.push_str(&format!("{b:02X}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_server() {
        // `SELECT PASSWORD('p'), PASSWORD('a')` on MariaDB 10.11.
        assert_eq!(verifier("p"), "*7B9EBEED26AA52ED10C0F549FA863F13C39E0209");
        assert_eq!(verifier("a"), "*667F407DE7C6AD07358FA38DAED7828A72014B4E");
    }
}
