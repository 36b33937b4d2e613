//! Reading Redis' answers: `CLIENT LIST`, `ACL GETUSER`, `INFO server`,
//! `COMMAND INFO`. Pure functions of the reply, so they are tested without a
//! server; anything of an unexpected shape reads as "nothing" rather than
//! failing, and the caller decides what nothing means.

use ::redis::Value;

/// The text of a string-like reply.
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Okay => Some("OK".to_owned()),
        _ => None,
    }
}

/// The items of an array-like reply (empty for anything else).
pub fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// `(id, user)` of each connection in a `CLIENT LIST` reply: one line per
/// connection of `key=value` fields separated by spaces (no field value holds a
/// space: client names and user names cannot).
pub fn clients(list: &str) -> Vec<(u64, String)> {
    list.lines()
        .filter_map(|line| {
            let mut id = None;
            let mut user = None;
            for field in line.split(' ') {
                if let Some(v) = field.strip_prefix("id=") {
                    id = v.parse().ok();
                } else if let Some(v) = field.strip_prefix("user=") {
                    user = Some(v.to_owned());
                }
            }
            Some((id?, user?))
        })
        .collect()
}

/// The ids of `name`'s connections in a `CLIENT LIST` reply.
pub fn connections_of(list: &str, name: &str) -> Vec<u64> {
    clients(list)
        .into_iter()
        .filter(|(_, u)| u == name)
        .map(|(id, _)| id)
        .collect()
}

/// The `flags` of an `ACL GETUSER` reply (a flat list of field, value in RESP2;
/// a map in RESP3), or `None` for a nil reply (no such user).
pub fn user_flags(v: &Value) -> Option<Vec<String>> {
    let field = |k: &Value, val: &Value| {
        (text(k).as_deref() == Some("flags"))
            .then(|| items(val).iter().filter_map(text).collect::<Vec<_>>())
    };
    match v {
        Value::Nil => None,
        Value::Map(pairs) => Some(pairs.iter().find_map(|(k, val)| field(k, val))?),
        other => {
            let a = items(other);
            Some(
                a.chunks(2)
                    .find_map(|kv| match kv {
                        [k, val] => field(k, val),
                        _ => None,
                    })
                    .unwrap_or_default(),
            )
        }
    }
}

/// `(major, minor)` of `redis_version` in an `INFO server` reply.
pub fn version(info: &str) -> Option<(u32, u32)> {
    let v = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("redis_version:"))?;
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The ACL categories of each command in a `COMMAND INFO` reply, in order;
/// `None` where the server knows no such command (a nil entry). Redis 7 puts
/// them seventh in each entry (`@read`, `@fast`, …); Redis 6 has none there.
pub fn command_categories(v: &Value) -> Vec<Option<Vec<String>>> {
    items(v)
        .iter()
        .map(|entry| match entry {
            Value::Nil => None,
            e => Some(
                items(e)
                    .get(6)
                    .map(|c| items(c).iter().filter_map(text).collect())
                    .unwrap_or_default(),
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn client_list_lines() {
        let list = "id=3 addr=127.0.0.1:1 laddr=127.0.0.1:2 fd=8 name= age=0 idle=0 flags=N db=0 cmd=client|list user=lapse_admin redir=-1 resp=2\n\
                    id=7 addr=127.0.0.1:3 name=x cmd=xread user=lapse_gr_1 resp=2\n\
                    id=9 addr=127.0.0.1:4 cmd=get user=lapse_gr_1\n\
                    garbage line\n";
        assert_eq!(connections_of(list, "lapse_gr_1"), vec![7, 9]);
        assert_eq!(connections_of(list, "lapse_gr"), Vec::<u64>::new());
        assert_eq!(clients(list).len(), 3);
    }

    #[test]
    fn getuser_flags() {
        let reply = Value::Array(vec![
            bulk("flags"),
            Value::Array(vec![bulk("off"), bulk("sanitize-payload")]),
            bulk("passwords"),
            Value::Array(vec![]),
        ]);
        assert_eq!(
            user_flags(&reply),
            Some(vec!["off".to_owned(), "sanitize-payload".to_owned()])
        );
        assert_eq!(user_flags(&Value::Nil), None);
        let map = Value::Map(vec![(bulk("flags"), Value::Set(vec![bulk("on")]))]);
        assert_eq!(user_flags(&map), Some(vec!["on".to_owned()]));
    }

    #[test]
    fn info_and_command_info() {
        assert_eq!(
            version("# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:0\r\n"),
            Some((7, 0))
        );
        assert_eq!(version("# Server\r\n"), None);
        let get = Value::Array(vec![
            bulk("get"),
            Value::Int(2),
            Value::Array(vec![]),
            Value::Int(1),
            Value::Int(1),
            Value::Int(1),
            Value::Array(vec![bulk("@read"), bulk("@string")]),
        ]);
        assert_eq!(
            command_categories(&Value::Array(vec![get, Value::Nil])),
            vec![Some(vec!["@read".to_owned(), "@string".to_owned()]), None]
        );
    }
}
