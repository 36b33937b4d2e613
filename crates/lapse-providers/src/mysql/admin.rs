//! What the admin account holds and what the provider needs from it.
//!
//! The holdings come from `information_schema` (`USER_PRIVILEGES`,
//! `SCHEMA_PRIVILEGES`, `TABLE_PRIVILEGES`), which show the current account's
//! privileges as rows with their grant option (`IS_GRANTABLE`), rather than from
//! parsing `SHOW GRANTS` text (whose lines also carry the admin's password
//! hash). Privileges that reach the admin only through a role are not in those
//! tables: grant them to the admin account directly. Deciding what is missing is
//! a function of those rows, tested here without a server.

use std::fmt;

/// The admin's privileges, as `information_schema` lists them.
#[derive(Debug, Clone, Default)]
pub struct Held {
    /// `(privilege, grantable)` on `*.*`.
    pub global: Vec<(String, bool)>,
    /// `(database pattern, privilege, grantable)` on `db.*`. The pattern is as
    /// granted: `_` and `%` are wildcards, `\` escapes.
    pub databases: Vec<(String, String, bool)>,
    /// `(database, table, privilege, grantable)` on `db.table`.
    pub tables: Vec<(String, String, String, bool)>,
}

/// Where a privilege is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum On {
    Global,
    /// Every table of the database (`db.*`): only a global or database-level
    /// grant covers it.
    Database(String),
    Table(String, String),
}

/// One thing the admin must hold: any of `any_of` on `on`, with the grant
/// option when `grant_option`.
#[derive(Debug, Clone)]
pub struct Need {
    pub any_of: Vec<&'static str>,
    pub on: On,
    pub grant_option: bool,
    pub why: &'static str,
}

impl Need {
    pub fn new(privilege: &'static str, on: On, why: &'static str) -> Self {
        Self {
            any_of: vec![privilege],
            on,
            grant_option: false,
            why,
        }
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.any_of.iter().map(|p| format!("`{p}`")).collect();
        f.write_str(&names.join(" or "))?;
        match &self.on {
            On::Global => f.write_str(" ON *.*")?,
            On::Database(db) => write!(f, " ON `{db}`.*")?,
            On::Table(db, t) => write!(f, " ON `{db}`.`{t}`")?,
        }
        if self.grant_option {
            f.write_str(" WITH GRANT OPTION")?;
        }
        write!(f, " ({})", self.why)
    }
}

impl Held {
    /// Whether `privilege` is held on `on` (with the grant option if asked): at
    /// the global level, or for a database at its level (by pattern), or for a
    /// table at any of the three.
    pub fn allows(&self, on: &On, privilege: &str, grant_option: bool) -> bool {
        let fits = |p: &str, g: bool| p.eq_ignore_ascii_case(privilege) && (g || !grant_option);
        let global = self.global.iter().any(|(p, g)| fits(p, *g));
        let database = |db: &str| {
            self.databases
                .iter()
                .any(|(pattern, p, g)| fits(p, *g) && pattern_matches(pattern, db))
        };
        match on {
            On::Global => global,
            On::Database(db) => global || database(db),
            On::Table(db, table) => {
                global
                    || database(db)
                    || self
                        .tables
                        .iter()
                        .any(|(d, t, p, g)| fits(p, *g) && d == db && t == table)
            }
        }
    }

    /// The needs not met, in the order given.
    pub fn missing<'a>(&self, needs: &'a [Need]) -> Vec<&'a Need> {
        needs
            .iter()
            .filter(|n| {
                !n.any_of
                    .iter()
                    .any(|p| self.allows(&n.on, p, n.grant_option))
            })
            .collect()
    }
}

/// How the server matches a database-level grant's name: `%` is any run of
/// characters, `_` any one, `\` makes the next one literal. Case-sensitive, as
/// database names are on Linux (`lower_case_table_names=0`).
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = name.chars().collect();
    // Iterative matching with one backtrack point for the last `%`: linear in
    // practice, never exponential.
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some('%') => {
                star = Some((pi, si));
                pi += 1;
                continue;
            }
            Some('\\') if p.get(pi + 1) == s.get(si) && p.get(pi + 1).is_some() => {
                pi += 2;
                si += 1;
                continue;
            }
            Some('_') => {
                pi += 1;
                si += 1;
                continue;
            }
            Some(c) if *c != '\\' && Some(c) == s.get(si) => {
                pi += 1;
                si += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|c| *c == '%'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_the_server() {
        assert!(pattern_matches("app", "app"));
        assert!(!pattern_matches("app", "apps"));
        assert!(!pattern_matches("apps", "app"));
        assert!(pattern_matches("app_db", "app_db"));
        assert!(pattern_matches("app_db", "appXdb"), "`_` is a wildcard");
        assert!(pattern_matches("app\\_db", "app_db"));
        assert!(!pattern_matches("app\\_db", "appXdb"));
        assert!(pattern_matches("app%", "app"));
        assert!(pattern_matches("app%", "app_orders"));
        assert!(pattern_matches("%", "anything"));
        assert!(pattern_matches("a%b%c", "aXXbYYc"));
        assert!(!pattern_matches("a%b%c", "aXXbYY"));
        assert!(!pattern_matches("App", "app"), "case-sensitive");
        assert!(!pattern_matches("app\\", "app"));
        assert!(pattern_matches(&"%".repeat(50), &"a".repeat(50)));
    }

    fn held() -> Held {
        Held {
            global: vec![("CREATE USER".into(), false), ("PROCESS".into(), false)],
            databases: vec![
                ("app\\_db".into(), "SELECT".into(), true),
                ("app\\_db".into(), "INSERT".into(), false),
                ("lapse".into(), "CREATE".into(), false),
            ],
            tables: vec![("other".into(), "items".into(), "SELECT".into(), true)],
        }
    }

    #[test]
    fn levels_and_grant_option() {
        let h = held();
        assert!(h.allows(&On::Global, "create user", false));
        assert!(!h.allows(&On::Global, "CREATE USER", true));
        let db = On::Database("app_db".into());
        assert!(h.allows(&db, "SELECT", true));
        assert!(h.allows(&db, "INSERT", false));
        assert!(!h.allows(&db, "INSERT", true), "no grant option");
        assert!(!h.allows(&On::Database("appXdb".into()), "SELECT", false));
        let t = On::Table("app_db".into(), "items".into());
        assert!(h.allows(&t, "SELECT", true), "database level covers tables");
        assert!(h.allows(&On::Table("other".into(), "items".into()), "SELECT", true));
        assert!(
            !h.allows(&On::Database("other".into()), "SELECT", false),
            "a table-level grant does not cover the whole database"
        );
    }

    #[test]
    fn missing_names_each_need() {
        let h = held();
        let needs = vec![
            Need::new("CREATE USER", On::Global, "create users"),
            Need {
                any_of: vec!["CONNECTION ADMIN", "SUPER"],
                on: On::Global,
                grant_option: false,
                why: "end sessions",
            },
            Need {
                any_of: vec!["INSERT"],
                on: On::Database("app_db".into()),
                grant_option: true,
                why: "grant it",
            },
        ];
        let missing: Vec<String> = h.missing(&needs).iter().map(|n| n.to_string()).collect();
        assert_eq!(
            missing,
            vec![
                "`CONNECTION ADMIN` or `SUPER` ON *.* (end sessions)".to_owned(),
                "`INSERT` ON `app_db`.* WITH GRANT OPTION (grant it)".to_owned(),
            ]
        );
    }
}
