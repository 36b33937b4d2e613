//! Keeping passwords out of messages and logs that show a store URL.

/// `url` with any password replaced, for messages and logs: in the user info of a
/// URL, or as a `password=` parameter (URL query or key=value connection string).
pub fn redact_url(url: &str) -> String {
    let url = &redact_param(url);
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let (head, rest) = url.split_at(scheme + 3);
            let userinfo = rest.get(..at - scheme - 3).unwrap_or_default();
            let tail = rest.get(at - scheme - 3..).unwrap_or_default();
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{head}{user}:***{tail}"),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn redact_param(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("password=") {
        let (head, tail) = rest.split_at(i + "password=".len());
        out.push_str(head);
        out.push_str("***");
        let end = tail.find(['&', ' ']).unwrap_or(tail.len());
        rest = tail.get(end..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted_from_store_urls() {
        assert_eq!(
            super::redact_url("postgres://lapse:s3cret@db:5432/lapse"),
            "postgres://lapse:***@db:5432/lapse"
        );
        assert_eq!(
            super::redact_url("postgres://lapse@db/lapse"),
            "postgres://lapse@db/lapse"
        );
        assert_eq!(super::redact_url("sqlite://x.db"), "sqlite://x.db");
        assert_eq!(
            super::redact_url("postgres://u@db/x?password=secret&sslmode=disable"),
            "postgres://u@db/x?password=***&sslmode=disable"
        );
        assert_eq!(
            super::redact_url("host=db password=secret user=u"),
            "host=db password=*** user=u"
        );
    }
}
