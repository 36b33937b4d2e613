//! `lapse operator token|password`: credentials for a `[[operator]]` entry. The
//! secret is shown once; only its hash goes into the config. The `[[operator]]`
//! snippet printed is complete (roles, groups and audiences from the flags), so it
//! can be pasted into `lapse.toml` as it is; `--json` gives the same as one object.

use crate::exit::{Fail, fail};
use clap::Subcommand;
use lapse_broker::config::Role;
use serde_json::json;
use std::io::BufRead;

/// Who the entry is for and what it may do: the same for tokens and passwords.
#[derive(clap::Args)]
pub struct Entry {
    /// The operator's name.
    name: String,
    /// A role (`admin`, `read`, `revoke`, `introspect`, `approve`, `gate`,
    /// `signal`); repeatable. Default: `read` for a token, `approve` and `read`
    /// for a password.
    #[arg(long = "role", value_parser = parse_role)]
    roles: Vec<Role>,
    /// An approver group (`@approvers("GROUP")` in policy); repeatable.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// For a `gate`: an audience it guards; repeatable (none: any).
    #[arg(long = "audience")]
    audiences: Vec<String>,
}

#[derive(Subcommand)]
pub enum OperatorCmd {
    /// Make a new API token; prints it once (stdout) and the `[[operator]]` entry
    /// with its `token_sha256` (stderr), or both as JSON with `--json`.
    Token {
        #[command(flatten)]
        entry: Entry,
    },
    /// Hash a console password read from standard input (one line); prints the
    /// `[[operator]]` entry with its `password_argon2`, or JSON with `--json`.
    Password {
        #[command(flatten)]
        entry: Entry,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    serde_json::from_value(json!(s)).map_err(|_| {
        format!("`{s}` is not a role; use admin, read, revoke, introspect, approve, gate or signal")
    })
}

fn role_name(r: Role) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| toml_str(i)).collect();
    format!("[{}]", quoted.join(", "))
}

impl Entry {
    fn with_default_roles(mut self, default: &[Role]) -> Self {
        if self.roles.is_empty() {
            self.roles = default.to_vec();
        }
        let mut seen = Vec::new();
        self.roles.retain(|r| {
            let first = !seen.contains(r);
            seen.push(*r);
            first
        });
        self
    }

    /// The `[[operator]]` table with `secret_line` (`token_sha256 = …` or
    /// `password_argon2 = …`); empty groups and audiences are left out, as the
    /// config's defaults are the same.
    fn snippet(&self, secret_line: &str) -> String {
        let roles: Vec<String> = self.roles.iter().map(|r| role_name(*r)).collect();
        let mut s = format!(
            "[[operator]]\nname = {}\n{secret_line}\nroles = {}\n",
            toml_str(&self.name),
            toml_list(&roles)
        );
        if !self.groups.is_empty() {
            s.push_str(&format!("groups = {}\n", toml_list(&self.groups)));
        }
        if !self.audiences.is_empty() {
            s.push_str(&format!("audiences = {}\n", toml_list(&self.audiences)));
        }
        s
    }

    /// What would make the entry do less than its roles suggest.
    fn warnings(&self) {
        if self.roles.contains(&Role::Approve) && self.groups.is_empty() {
            eprintln!(
                "note: `{}` approves nothing until it is in a group that policy names (`--group`)",
                self.name
            );
        }
        if !self.audiences.is_empty() && !self.roles.contains(&Role::Gate) {
            eprintln!("note: `audiences` only matter for the `gate` role");
        }
    }
}

pub fn run(cmd: OperatorCmd, json_out: bool) -> Result<(), Fail> {
    match cmd {
        OperatorCmd::Token { entry } => {
            let entry = entry.with_default_roles(&[Role::Read]);
            let raw: [u8; 32] = rand::random();
            let token = format!("lapse_op_{}", lapse_token::b64::encode(raw));
            let hash = hex::encode(lapse_broker::broker::hash_secret(&token));
            let line = format!("token_sha256 = \"{hash}\"");
            let snippet = entry.snippet(&line);
            if json_out {
                println!(
                    "{}",
                    json!({
                        "name": entry.name,
                        "token": token,
                        "token_sha256": hash,
                        "snippet": snippet,
                    })
                );
            } else {
                eprintln!(
                    "API token for `{}` (shown once; keep it in a secret store):",
                    entry.name
                );
                println!("{token}");
                eprintln!("\n{snippet}");
            }
            entry.warnings();
            Ok(())
        }
        OperatorCmd::Password { entry } => {
            let entry = entry.with_default_roles(&[Role::Approve, Role::Read]);
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| fail(1, format!("cannot read the password: {e}")))?;
            let password = line.trim_end_matches(['\n', '\r']);
            if password.chars().count() < 12 {
                return Err(fail(2, "a console password needs at least 12 characters"));
            }
            let phc = lapse_broker::password::hash_password(password).map_err(|e| fail(1, e))?;
            let line = format!("password_argon2 = {}", toml_str(&phc));
            let snippet = entry.snippet(&line);
            if json_out {
                println!(
                    "{}",
                    json!({
                        "name": entry.name,
                        "password_argon2": phc,
                        "password_argon2_line": line,
                        "snippet": snippet,
                    })
                );
            } else {
                print!("{snippet}");
            }
            entry.warnings();
            Ok(())
        }
    }
}
