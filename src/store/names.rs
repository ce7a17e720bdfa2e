//! Names and addresses shared by every backend: endpoints, bucket and container names, key
//! prefixes, as the relations and the settings give them, checked before anything is sent.

use crate::error::bounded;

pub fn normalize_prefix(p: &str) -> String {
    p.split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

pub fn with_scheme(endpoint: &str) -> String {
    let e = endpoint.trim().trim_end_matches('/');
    if e.contains("://") {
        e.to_string()
    } else {
        format!("https://{e}")
    }
}

/// Checks an endpoint URL: `http` or `https` with a host, and no user name or password in
/// it (they would be echoed in every message that names the store). `from` says where it
/// came from.
pub fn check_endpoint(endpoint: &str, from: &str) -> Result<(), String> {
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or_else(|| format!("the endpoint is not a URL; {from}"))?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "the endpoint's scheme is `{}`; only http:// and https:// endpoints are used: {from}",
            bounded(scheme, 40)
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(format!(
            "the endpoint has a user name or password in it; credentials go in the access and secret keys, never in the URL: {from}"
        ));
    }
    if authority.is_empty()
        || endpoint
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "the endpoint has no host, or has spaces or control characters in it: {from}"
        ));
    }
    Ok(())
}

/// Checks a bucket name: S3's characters (letters, digits, `.`, `-`, `_`), no `..`, nothing
/// a client would read as a path.
pub fn check_bucket(bucket: &str, from: &str) -> Result<(), String> {
    let ok = !bucket.is_empty()
        && bucket.len() <= 63
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        && !bucket.contains("..")
        && !bucket.starts_with('.')
        && !bucket.ends_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the bucket `{}` is not a bucket name (letters, digits, `.`, `-` and `_`, at most 63, no `/` or `..`): {from}",
            bounded(bucket, 100)
        ))
    }
}

/// Checks a key prefix: no `.` or `..` segments and no control characters.
pub fn check_prefix(prefix: &str, from: &str) -> Result<(), String> {
    let bad_segment = prefix.split('/').any(|s| s == "." || s == "..");
    if bad_segment || prefix.chars().any(|c| c.is_control()) {
        return Err(format!(
            "the path `{}` has a `.` or `..` segment or control characters: {from}",
            bounded(prefix, 100)
        ));
    }
    Ok(())
}

/// A JSON list of strings, or failing that the raw text as one item.
pub fn json_list(text: &str) -> Vec<String> {
    match serde_json::from_str::<Vec<String>>(text) {
        Ok(v) => v,
        Err(_) if text.trim().is_empty() => Vec::new(),
        Err(_) => vec![text.to_string()],
    }
}

/// A field of a relation bag, trimmed; `None` when absent or empty.
pub fn field(bag: &std::collections::BTreeMap<String, String>, k: &str) -> Option<String> {
    bag.get(k)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The `required` fields a relation bag lacks, quoted for a message (`` `a`, `b` ``); empty
/// when it has them all.
pub fn missing(bag: &std::collections::BTreeMap<String, String>, required: &[&str]) -> String {
    required
        .iter()
        .filter(|k| field(bag, k).is_none())
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
