//! What each action's group role should hold, as pure data: the configured
//! privileges, scoped to a schema's every table or to named tables, the
//! sequences those tables need, and `EXECUTE` on every routine of a schema or on
//! named ones. [`Wanted`] rows go to [`MISSING`], one query that finds what the
//! groups lack right now; [`grant_script`] turns its answer into `GRANT`s. No
//! I/O here: the provider runs both.

use super::sql::{self, QuoteError};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// Table privileges an action may map to. Anything else (`CREATE`, `ALL`, role
/// attributes) is refused at config load: a grant's role never owns objects.
pub const TABLE_PRIVILEGES: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "TRUNCATE",
    "REFERENCES",
    "TRIGGER",
];

/// The routine privilege: functions, procedures and aggregates.
pub const EXECUTE: &str = "EXECUTE";

/// `[[postgres.grant]]`: `action` means `privileges` on the relations of
/// `schema` (every one, or those in `tables`), and `EXECUTE` on its routines
/// (every one, or those named in `functions`, all their overloads).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivilegeConfig {
    pub action: String,
    pub schema: String,
    pub privileges: Vec<String>,
    /// Only these tables (views, …) of `schema`; empty: all, also those made later.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Only these routines of `schema` (by name); empty: all. Needs `EXECUTE`.
    #[serde(default)]
    pub functions: Vec<String>,
}

impl PrivilegeConfig {
    /// Checks the entry by itself; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        let a = &self.action;
        sql::ident(&self.schema).map_err(|e| format!("action `{a}`: `schema`: {e}"))?;
        if self.privileges.is_empty() {
            return Err(format!("action `{a}`: no privileges listed"));
        }
        for p in &self.privileges {
            let up = p.to_ascii_uppercase();
            if up != EXECUTE && !TABLE_PRIVILEGES.contains(&up.as_str()) {
                return Err(format!(
                    "action `{a}`: privilege `{p}` is not one of {}, {EXECUTE}",
                    TABLE_PRIVILEGES.join(", ")
                ));
            }
        }
        for t in &self.tables {
            sql::ident(t).map_err(|e| format!("action `{a}`: `tables`: {e}"))?;
        }
        for f in &self.functions {
            sql::ident(f).map_err(|e| format!("action `{a}`: `functions`: {e}"))?;
        }
        if !self.tables.is_empty() && !self.table_privileges().any(|_| true) {
            return Err(format!(
                "action `{a}`: `tables` is set but no table privilege is listed"
            ));
        }
        if !self.functions.is_empty() && !self.executes() {
            return Err(format!(
                "action `{a}`: `functions` is set but `EXECUTE` is not listed"
            ));
        }
        Ok(())
    }

    fn table_privileges(&self) -> impl Iterator<Item = String> + '_ {
        self.privileges
            .iter()
            .map(|p| p.to_ascii_uppercase())
            .filter(|p| p != EXECUTE)
    }

    fn executes(&self) -> bool {
        self.privileges
            .iter()
            .any(|p| p.eq_ignore_ascii_case(EXECUTE))
    }
}

/// The sequence privileges a table privilege needs. A `serial` column's default
/// calls `nextval`, on INSERT and on `UPDATE … SET col = DEFAULT` (USAGE); reading
/// a table's data as pg_dump does reads its sequences' state (SELECT). No table
/// privilege needs `setval` (UPDATE on a sequence). Identity columns need nothing:
/// PostgreSQL does not check privileges on their sequences.
pub fn sequence_privileges(table_privilege: &str) -> &'static [&'static str] {
    match table_privilege {
        "SELECT" => &["SELECT"],
        "INSERT" | "UPDATE" => &["USAGE"],
        _ => &[],
    }
}

/// One privilege a group should hold on one kind of object of a schema:
/// `object` empty means every object of that kind; else a table's name (for
/// `sequence`: the sequences that table owns) or a routine's name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Wanted {
    pub group: String,
    pub schema: String,
    pub kind: &'static str,
    pub privilege: String,
    pub object: String,
}

/// What the groups of `actions` should hold (`groups`: action → group role).
pub fn wanted(
    grants: &[PrivilegeConfig],
    groups: &BTreeMap<String, String>,
    actions: &[String],
) -> BTreeSet<Wanted> {
    let mut out = BTreeSet::new();
    for g in grants.iter().filter(|g| actions.contains(&g.action)) {
        let Some(group) = groups.get(&g.action) else {
            continue;
        };
        let row = |kind, privilege: &str, object: &str| Wanted {
            group: group.clone(),
            schema: g.schema.clone(),
            kind,
            privilege: privilege.to_owned(),
            object: object.to_owned(),
        };
        let tables: Vec<&str> = if g.tables.is_empty() {
            vec![""]
        } else {
            g.tables.iter().map(String::as_str).collect()
        };
        for p in g.table_privileges() {
            for t in &tables {
                out.insert(row("table", &p, t));
                for s in sequence_privileges(&p) {
                    out.insert(row("sequence", s, t));
                }
            }
        }
        if g.executes() {
            if g.functions.is_empty() {
                out.insert(row("routine", EXECUTE, ""));
            }
            for f in &g.functions {
                out.insert(row("routine", EXECUTE, f));
            }
        }
    }
    out
}

/// The five columns of [`MISSING`]'s parameters, in order.
pub fn columns(wanted: &BTreeSet<Wanted>) -> [Vec<&str>; 5] {
    let mut cols: [Vec<&str>; 5] = Default::default();
    for w in wanted {
        let [g, s, k, p, o] = &mut cols;
        g.push(&w.group);
        s.push(&w.schema);
        k.push(w.kind);
        p.push(&w.privilege);
        o.push(&w.object);
    }
    cols
}

/// Finds each object a group lacks a wanted privilege on. Answers `(group,
/// kind, privilege, target, grantable)`: `target` is the object as SQL, quoted
/// by the server (`format('%I.%I', …)`; a routine with its argument types), so
/// overloads are told apart; `grantable` whether the admin holds the privilege
/// with grant option. The privilege functions error on the wrong kind of
/// object: the CASEs keep each to its own (CASE evaluates in order).
pub const MISSING: &str = "
WITH w(grp, schema, kind, priv, obj) AS (
  SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
)
SELECT w.grp, w.kind, w.priv, format('%I.%I', n.nspname, c.relname),
       CASE WHEN w.kind = 'table'
            THEN has_table_privilege(c.oid, w.priv || ' WITH GRANT OPTION')
            ELSE has_sequence_privilege(c.oid, w.priv || ' WITH GRANT OPTION')
       END
FROM w
JOIN pg_namespace n ON n.nspname = w.schema
JOIN pg_class c ON c.relnamespace = n.oid
WHERE CASE
        WHEN w.kind = 'table' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          THEN (w.obj = '' OR c.relname = w.obj)
               AND NOT has_table_privilege(w.grp, c.oid, w.priv)
        WHEN w.kind = 'sequence' AND c.relkind = 'S'
          THEN (w.obj = '' OR EXISTS (
                 SELECT 1 FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid
                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                   AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                   AND t.relname = w.obj AND t.relnamespace = n.oid))
               AND NOT has_sequence_privilege(w.grp, c.oid, w.priv)
        ELSE false
      END
UNION ALL
SELECT w.grp, w.kind, w.priv,
       format('%I.%I(%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)),
       has_function_privilege(p.oid, 'EXECUTE WITH GRANT OPTION')
FROM w
JOIN pg_namespace n ON n.nspname = w.schema
JOIN pg_proc p ON p.pronamespace = n.oid
WHERE w.kind = 'routine' AND (w.obj = '' OR p.proname = w.obj)
  AND NOT has_function_privilege(w.grp, p.oid, 'EXECUTE')";

/// One row of [`MISSING`]'s answer.
#[derive(Debug, Clone)]
pub struct Missing {
    pub group: String,
    pub kind: String,
    pub privilege: String,
    pub target: String,
    pub grantable: bool,
}

/// Taken (per database, for one transaction) by every provider granting privileges
/// to its groups: PostgreSQL refuses concurrent GRANTs on one object ("tuple
/// concurrently updated") instead of queueing them.
pub const GRANT_LOCK: i64 = 0x6c61_7073_655f_6772; // "lapse_gr"

/// The transaction granting what `missing` names and the admin may pass on, and
/// what it may not (to be logged). `None` when there is nothing to grant.
pub fn grant_script(missing: &[Missing]) -> Result<(Option<String>, Vec<String>), QuoteError> {
    // (kind, target, group) -> privileges
    let mut grants: BTreeMap<(&str, &str, &str), Vec<&str>> = BTreeMap::new();
    let mut cannot = Vec::new();
    for m in missing {
        if m.grantable {
            grants
                .entry((&m.kind, &m.target, &m.group))
                .or_default()
                .push(&m.privilege);
        } else {
            cannot.push(format!("{} on {}", m.privilege, m.target));
        }
    }
    if grants.is_empty() {
        return Ok((None, cannot));
    }
    let mut script = format!("BEGIN;\nSELECT pg_advisory_xact_lock({GRANT_LOCK});\n");
    for ((kind, target, group), privileges) in &grants {
        let on = match *kind {
            "sequence" => "SEQUENCE",
            "routine" => "ROUTINE",
            _ => "TABLE",
        };
        // `target` was quoted by the server (format's %I), from the catalog.
        script.push_str(&format!(
            "GRANT {} ON {on} {target} TO {};\n",
            privileges.join(", "),
            sql::ident(group)?
        ));
    }
    script.push_str("COMMIT;");
    Ok((Some(script), cannot))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(privileges: &[&str], tables: &[&str], functions: &[&str]) -> PrivilegeConfig {
        PrivilegeConfig {
            action: "read".into(),
            schema: "orders".into(),
            privileges: privileges.iter().map(|p| (*p).to_owned()).collect(),
            tables: tables.iter().map(|p| (*p).to_owned()).collect(),
            functions: functions.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    fn rows(g: PrivilegeConfig) -> Vec<(String, &'static str, String)> {
        let groups = BTreeMap::from([("read".to_owned(), "g_read".to_owned())]);
        wanted(&[g], &groups, &["read".to_owned()])
            .into_iter()
            .map(|w| (w.privilege, w.kind, w.object))
            .collect()
    }

    #[test]
    fn scoped_tables_bring_their_sequences_and_routines_are_separate() {
        let r = rows(grant(
            &["select", "INSERT", "EXECUTE"],
            &["items"],
            &["total"],
        ));
        let want = [
            ("EXECUTE", "routine", "total"),
            ("INSERT", "table", "items"),
            ("SELECT", "sequence", "items"),
            ("SELECT", "table", "items"),
            ("USAGE", "sequence", "items"),
        ];
        let mut got: Vec<(&str, &str, &str)> = r
            .iter()
            .map(|(p, k, o)| (p.as_str(), *k, o.as_str()))
            .collect();
        got.sort();
        let mut want = want.to_vec();
        want.sort();
        assert_eq!(got, want);
        // Unscoped: every object of the schema.
        let r = rows(grant(&["DELETE", "EXECUTE"], &[], &[]));
        assert!(r.iter().all(|(_, _, o)| o.is_empty()), "{r:?}");
        assert_eq!(r.len(), 2, "DELETE needs no sequence privilege: {r:?}");
    }

    #[test]
    fn other_actions_get_nothing() {
        let groups = BTreeMap::from([("read".to_owned(), "g".to_owned())]);
        assert!(wanted(&[grant(&["SELECT"], &[], &[])], &groups, &["write".into()]).is_empty());
    }

    #[test]
    fn entries_are_checked_with_the_key_named() {
        let bad = [
            (grant(&["ALL"], &[], &[]), "privilege `ALL`"),
            (grant(&[], &[], &[]), "no privileges"),
            (grant(&["SELECT"], &["a\0b"], &[]), "`tables`"),
            (grant(&["EXECUTE"], &["items"], &[]), "no table privilege"),
            (grant(&["SELECT"], &[], &["f"]), "`EXECUTE` is not listed"),
            (grant(&["EXECUTE"], &[], &[&"f".repeat(64)]), "`functions`"),
        ];
        for (g, want) in bad {
            let e = g.validate().err().unwrap_or_default();
            assert!(e.contains(want), "{want}: {e}");
        }
        assert!(
            grant(&["SELECT", "execute"], &["items"], &["f"])
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn grants_go_only_where_the_admin_may_pass_them_on() {
        let m = |kind: &str, privilege: &str, target: &str, grantable| Missing {
            group: "lapse_orders_read".into(),
            kind: kind.into(),
            privilege: privilege.into(),
            target: target.into(),
            grantable,
        };
        let (script, cannot) = grant_script(&[
            m("table", "SELECT", "orders.items", true),
            m("table", "INSERT", "orders.items", true),
            m("routine", "EXECUTE", "orders.total(integer)", true),
            m("sequence", "USAGE", "orders.items_id_seq", false),
        ])
        .unwrap_or_default();
        let script = script.unwrap_or_default();
        assert!(
            script.contains("GRANT SELECT, INSERT ON TABLE orders.items TO \"lapse_orders_read\";"),
            "{script}"
        );
        assert!(
            script.contains("GRANT EXECUTE ON ROUTINE orders.total(integer) TO"),
            "{script}"
        );
        assert!(!script.contains("items_id_seq"), "{script}");
        assert_eq!(cannot, ["USAGE on orders.items_id_seq"]);
        let (none, _) = grant_script(&[m("table", "SELECT", "t", false)]).unwrap_or_default();
        assert!(none.is_none());
    }
}
