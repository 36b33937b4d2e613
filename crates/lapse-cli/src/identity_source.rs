//! Where a workload's identity token comes from when `lapse run` starts it.
//!
//! Detected in this order unless `--identity-source` says which: a token file
//! (Kubernetes projected service-account token, a SPIFFE helper's JWT-SVID file),
//! an environment variable, GitHub Actions' OIDC token request, GitLab CI's
//! `id_tokens` variable, and in development the dev issuer. A file is read at each
//! use, never cached, so a rotated token is picked up.

use crate::exit::{Fail, fail};
use crate::local::DEFAULT_DEV_DIR;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    File,
    Env,
    Github,
    Gitlab,
    Dev,
}

#[derive(clap::Args, Debug, Clone)]
pub struct IdentityArgs {
    /// Where the identity token comes from; detected when absent (file, env, github,
    /// gitlab, dev, in that order).
    #[arg(long, value_enum)]
    pub identity_source: Option<SourceKind>,
    /// File holding the identity token, re-read at each use (e.g.
    /// `/var/run/secrets/tokens/lapse` for a Kubernetes projected token).
    #[arg(long, env = "LAPSE_IDENTITY_FILE")]
    pub identity_file: Option<PathBuf>,
    /// Environment variable holding the identity token.
    #[arg(long, default_value = "LAPSE_IDENTITY_TOKEN")]
    pub identity_env: String,
    /// Audience to ask GitHub Actions' token service for: the `audience` of Lapse's
    /// `[[issuer]]` for GitHub.
    #[arg(long, default_value = "lapse")]
    pub identity_audience: String,
    /// GitLab CI: the variable the job's `id_tokens:` section defines.
    #[arg(long, default_value = "LAPSE_ID_TOKEN")]
    pub gitlab_token_var: String,
    /// Development only: mint the identity token from the dev issuer for this workload.
    #[arg(long)]
    pub dev_workload: Option<String>,
    /// The dev folder of `lapse serve --dev` (for --dev-workload).
    #[arg(long, default_value = DEFAULT_DEV_DIR)]
    pub dev_data: PathBuf,
}

/// A resolved source.
#[derive(Debug, Clone)]
pub enum IdentitySource {
    File(PathBuf),
    Env(String),
    Github {
        url: String,
        request_token: String,
        audience: String,
    },
    Gitlab(String),
    Dev {
        workload: String,
        data: PathBuf,
    },
}

const GITHUB_URL: &str = "ACTIONS_ID_TOKEN_REQUEST_URL";
const GITHUB_TOKEN: &str = "ACTIONS_ID_TOKEN_REQUEST_TOKEN";

impl IdentitySource {
    /// Picks the source, reading the environment through `env`.
    pub fn detect(a: &IdentityArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, Fail> {
        let set = |k: &str| env(k).filter(|v| !v.is_empty());
        let file = || a.identity_file.clone().map(Self::File);
        let from_env = || set(&a.identity_env).map(|_| Self::Env(a.identity_env.clone()));
        let github = || match (set(GITHUB_URL), set(GITHUB_TOKEN)) {
            (Some(url), Some(request_token)) => Some(Self::Github {
                url,
                request_token,
                audience: a.identity_audience.clone(),
            }),
            _ => None,
        };
        let gitlab = || {
            set("GITLAB_CI")
                .and(set(&a.gitlab_token_var))
                .map(|_| Self::Gitlab(a.gitlab_token_var.clone()))
        };
        let dev = || {
            a.dev_workload.clone().map(|workload| Self::Dev {
                workload,
                data: a.dev_data.clone(),
            })
        };
        let missing = |what: String| fail(2, format!("identity source `{what}` is not available"));
        match a.identity_source {
            Some(SourceKind::File) => {
                file().ok_or_else(|| missing("file: give --identity-file".into()))
            }
            Some(SourceKind::Env) => from_env()
                .ok_or_else(|| missing(format!("env: `{}` is not set", a.identity_env))),
            Some(SourceKind::Github) => github().ok_or_else(|| {
                missing(format!(
                    "github: `{GITHUB_URL}` and `{GITHUB_TOKEN}` are not set (does the job have `permissions: id-token: write`?)"
                ))
            }),
            Some(SourceKind::Gitlab) => gitlab().ok_or_else(|| {
                missing(format!(
                    "gitlab: `GITLAB_CI` or `{}` is not set (declare it under the job's `id_tokens:`)",
                    a.gitlab_token_var
                ))
            }),
            Some(SourceKind::Dev) => {
                dev().ok_or_else(|| missing("dev: give --dev-workload".into()))
            }
            None => file()
                .or_else(from_env)
                .or_else(github)
                .or_else(gitlab)
                .or_else(dev)
                .ok_or_else(|| {
                    fail(
                        2,
                        format!(
                            "no identity token found: tried --identity-file/LAPSE_IDENTITY_FILE, `{}`, GitHub Actions (`{GITHUB_URL}`), GitLab CI (`{}`), --dev-workload",
                            a.identity_env, a.gitlab_token_var
                        ),
                    )
                }),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Env(_) => "env",
            Self::Github { .. } => "github",
            Self::Gitlab(_) => "gitlab",
            Self::Dev { .. } => "dev",
        }
    }

    /// Variables that hold identity material or say where it is: the command must
    /// not inherit them, so that it cannot ask for more access than this one task's
    /// (with `LAPSE_IDENTITY_FILE`, a nested `lapse run` would get a grant of its own).
    /// The file itself stays readable to a command running as the same user.
    pub fn secret_vars(&self, a: &IdentityArgs) -> Vec<String> {
        vec![
            "LAPSE_IDENTITY_FILE".into(),
            a.identity_env.clone(),
            a.gitlab_token_var.clone(),
            GITHUB_URL.into(),
            GITHUB_TOKEN.into(),
            "LAPSE_TOKEN".into(),
        ]
    }

    /// The current identity token.
    pub async fn token(
        &self,
        http: &reqwest::Client,
        env: &dyn Fn(&str) -> Option<String>,
        now_secs: i64,
    ) -> Result<String, Fail> {
        let t = match self {
            Self::File(p) => std::fs::read_to_string(p)
                .map_err(|e| fail(1, format!("identity file `{}`: {e}", p.display())))?,
            Self::Env(var) | Self::Gitlab(var) => {
                env(var).ok_or_else(|| fail(1, format!("`{var}` is not set")))?
            }
            Self::Github {
                url,
                request_token,
                audience,
            } => github_token(http, url, request_token, audience).await?,
            Self::Dev { workload, data } => {
                lapse_server::dev::dev_token(data, workload, 600, &[], now_secs)
                    .map_err(|e| fail(1, e))?
            }
        };
        let t = t.trim().to_owned();
        if t.is_empty() {
            return Err(fail(
                1,
                format!("the identity token from `{}` is empty", self.name()),
            ));
        }
        Ok(t)
    }
}

/// GitHub Actions' OIDC token request: `GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=…`
/// with the request token as bearer; the answer is `{"value": "<jwt>"}`.
async fn github_token(
    http: &reqwest::Client,
    url: &str,
    request_token: &str,
    audience: &str,
) -> Result<String, Fail> {
    let mut u = reqwest::Url::parse(url)
        .map_err(|e| fail(1, format!("`{GITHUB_URL}` is not a URL: {e}")))?;
    // The request token is a credential: only over TLS, or to a local stand-in.
    let loopback = matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    if u.scheme() != "https" && !loopback {
        return Err(fail(
            1,
            format!("`{GITHUB_URL}` must be https (got `{}`)", u.scheme()),
        ));
    }
    u.query_pairs_mut().append_pair("audience", audience);
    let resp = http
        .get(u)
        .header("Authorization", format!("bearer {request_token}"))
        .header("Accept", "application/json")
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| fail(7, format!("GitHub Actions token request failed: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(fail(
            1,
            format!("GitHub Actions token request answered HTTP {status}"),
        ));
    }
    let v: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| fail(1, format!("GitHub Actions token answer is not JSON: {e}")))?;
    v.get("value")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| fail(1, "GitHub Actions token answer has no `value`"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: IdentityArgs,
    }

    fn args(extra: &[&str]) -> IdentityArgs {
        let mut v = vec!["t"];
        v.extend_from_slice(extra);
        // LAPSE_IDENTITY_FILE from the test's own environment must not leak in.
        let mut a = T::try_parse_from(v).unwrap().a;
        if !extra.contains(&"--identity-file") {
            a.identity_file = None;
        }
        a
    }

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn detection_order_is_file_env_github_gitlab_dev() {
        let all = env(&[
            ("LAPSE_IDENTITY_TOKEN", "e"),
            (
                "ACTIONS_ID_TOKEN_REQUEST_URL",
                "https://x/t?api-version=2.0",
            ),
            ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "r"),
            ("GITLAB_CI", "true"),
            ("LAPSE_ID_TOKEN", "g"),
        ]);
        let with_file = args(&["--identity-file", "/tmp/x", "--dev-workload", "w"]);
        assert_eq!(
            IdentitySource::detect(&with_file, &all).unwrap().name(),
            "file"
        );
        let a = args(&["--dev-workload", "w"]);
        assert_eq!(IdentitySource::detect(&a, &all).unwrap().name(), "env");
        let no_env = env(&[
            ("ACTIONS_ID_TOKEN_REQUEST_URL", "https://x/t"),
            ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "r"),
            ("GITLAB_CI", "true"),
            ("LAPSE_ID_TOKEN", "g"),
        ]);
        assert_eq!(
            IdentitySource::detect(&a, &no_env).unwrap().name(),
            "github"
        );
        let gitlab = env(&[("GITLAB_CI", "true"), ("LAPSE_ID_TOKEN", "g")]);
        assert_eq!(
            IdentitySource::detect(&a, &gitlab).unwrap().name(),
            "gitlab"
        );
        // GitLab's variable alone, outside GitLab CI, is not GitLab.
        let stray = env(&[("LAPSE_ID_TOKEN", "g")]);
        assert_eq!(IdentitySource::detect(&a, &stray).unwrap().name(), "dev");
        let none = env(&[]);
        let e = IdentitySource::detect(&args(&[]), &none).err().unwrap();
        assert_eq!(e.0, 2);
        assert!(e.1.contains("no identity token found"), "{}", e.1);
    }

    #[test]
    fn an_explicit_source_wins_and_says_what_is_missing() {
        let all = env(&[("LAPSE_IDENTITY_TOKEN", "e"), ("GITLAB_CI", "true")]);
        let a = args(&["--identity-source", "gitlab"]);
        let e = IdentitySource::detect(&a, &all).err().unwrap();
        assert!(e.1.contains("id_tokens"), "{}", e.1);
        let a = args(&["--identity-source", "github"]);
        let e = IdentitySource::detect(&a, &all).err().unwrap();
        assert!(e.1.contains("id-token: write"), "{}", e.1);
        let a = args(&["--identity-source", "env", "--identity-env", "MY_TOKEN"]);
        let e = IdentitySource::detect(&a, &all).err().unwrap();
        assert!(e.1.contains("MY_TOKEN"), "{}", e.1);
    }
}
