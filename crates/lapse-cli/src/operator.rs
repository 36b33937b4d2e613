//! `lapse operator token|password`: credentials for a `[[operator]]` entry. The
//! secret is shown once; only its hash goes into the config.

use crate::{Fail, fail};
use clap::Subcommand;
use std::io::BufRead;

#[derive(Subcommand)]
pub enum OperatorCmd {
    /// Make a new API token; prints it once, and the `token_sha256` line for the config.
    Token {
        /// The operator's name (for the config snippet).
        name: String,
    },
    /// Hash a console password read from standard input (one line); prints the
    /// `password_argon2` line for the config.
    Password {
        /// The operator's name (for the config snippet).
        name: String,
    },
}

pub fn run(cmd: OperatorCmd) -> Result<(), Fail> {
    match cmd {
        OperatorCmd::Token { name } => {
            let raw: [u8; 32] = rand::random();
            let token = format!("lapse_op_{}", lapse_token::b64::encode(raw));
            let hash = hex::encode(lapse_server::service::hash_secret(&token));
            eprintln!("API token for `{name}` (shown once; keep it in a secret store):");
            println!("{token}");
            eprintln!(
                "\n[[operator]]\nname = {name:?}\ntoken_sha256 = \"{hash}\"\nroles = [\"read\"]"
            );
            Ok(())
        }
        OperatorCmd::Password { name } => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| fail(1, format!("cannot read the password: {e}")))?;
            let password = line.trim_end_matches(['\n', '\r']);
            if password.chars().count() < 12 {
                return Err(fail(2, "a console password needs at least 12 characters"));
            }
            let phc =
                lapse_server::console::session::hash_password(password).map_err(|e| fail(1, e))?;
            println!(
                "[[operator]]\nname = {name:?}\npassword_argon2 = {phc:?}\nroles = [\"approve\", \"read\"]\ngroups = []"
            );
            Ok(())
        }
    }
}
