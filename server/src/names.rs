//! Names of the objects tenants own (adapters, datasets) and of tenants: one rule, owned by
//! no one module, so every owner checks names the same way without depending on another.

/// Checks a name: 1-64 characters of `[A-Za-z0-9._-]`, starting with a letter or digit (no
/// path separators, no `..`, no NUL). `what` names the kind in the message
/// ("adapter name", "dataset name", "tenant name").
pub fn validate(name: &str, what: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 64 || !ok_chars || !first || name.contains("..") {
        let shown: String = name.chars().take(64).collect();
        let more = if shown.len() < name.len() { "…" } else { "" };
        return Err(format!(
            "{shown:?}{more} is not a valid {what} (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn names_are_checked_and_messages_name_the_kind() {
        for ok in ["a", "A-1", "v1.2_x", &"x".repeat(64)] {
            assert!(validate(ok, "adapter name").is_ok(), "{ok}");
        }
        for bad in ["", ".a", "a/b", "a..b", "a\0", "é", &"x".repeat(65)] {
            let e = validate(bad, "dataset name").expect_err(bad);
            assert!(e.contains("not a valid dataset name"), "{e}");
        }
    }
}
