//! `lapse policy`: validate and test policy folders, print the base schema.

use crate::exit::{Out, fail};
use clap::Subcommand;
use serde_json::json;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
    /// Load and validate a policy folder.
    Validate {
        #[arg(long, default_value = "examples/policies")]
        policies: PathBuf,
    },
    /// Run a policy test file against a policy folder.
    Test {
        file: PathBuf,
        #[arg(long, default_value = "examples/policies")]
        policies: PathBuf,
    },
    /// Print the base schema Lapse contributes.
    Schema,
}

pub(crate) fn run(cmd: PolicyCmd, json_out: bool) -> Out {
    match cmd {
        PolicyCmd::Schema => {
            print!("{}", lapse_policy::schema::BASE_SCHEMA);
            Ok(())
        }
        PolicyCmd::Validate { policies } => {
            let b = lapse_policy::PolicyBundle::load_dir(&policies)
                .map_err(|e| fail(1, e.to_string()))?;
            if json_out {
                println!(
                    "{}",
                    json!({ "valid": true, "policies": b.policy_count, "actions": b.actions() })
                );
            } else {
                println!(
                    "{}: {} policies valid; actions: {}",
                    policies.display(),
                    b.policy_count,
                    b.actions().join(", ")
                );
            }
            Ok(())
        }
        PolicyCmd::Test { file, policies } => {
            let b = lapse_policy::PolicyBundle::load_dir(&policies)
                .map_err(|e| fail(1, e.to_string()))?;
            let text = std::fs::read_to_string(&file)
                .map_err(|e| fail(1, format!("{}: {e}", file.display())))?;
            let cases = lapse_policy::cases::parse(&text).map_err(|e| fail(2, e.to_string()))?;
            let results =
                lapse_policy::cases::run(&b, &cases).map_err(|e| fail(2, e.to_string()))?;
            let failed = results.iter().filter(|r| !r.passed).count();
            if json_out {
                println!("{}", json!({ "results": results, "failed": failed }));
            } else {
                for r in &results {
                    if r.passed {
                        println!("ok    {}", r.name);
                    } else {
                        println!("FAIL  {}: {}", r.name, r.failures.join("; "));
                    }
                }
                println!("{} passed, {} failed", results.len() - failed, failed);
            }
            if failed > 0 {
                Err(fail(6, format!("{failed} policy test(s) failed")))
            } else {
                Ok(())
            }
        }
    }
}
