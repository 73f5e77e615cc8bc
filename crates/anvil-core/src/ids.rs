//! Identifier rules for client-visible ids (instances, checkpoints, templates).

/// Maximum length of an instance or checkpoint id.
pub const MAX_ID_LEN: usize = 64;

fn validate_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} id must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "{what} id `{}…` is longer than {MAX_ID_LEN} characters",
            id.chars().take(16).collect::<String>()
        ));
    }
    if id.starts_with('-') {
        return Err(format!("{what} id `{id}` must not start with `-`"));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "{what} id `{}` contains `{}`; allowed are A-Z, a-z, 0-9, `-` and `_`",
            id.escape_default(),
            bad.escape_default()
        ));
    }
    Ok(())
}

/// 1..=64 characters of `[A-Za-z0-9_-]`, not starting with `-`. Ids become file and cgroup
/// names, so this rule is what keeps them from escaping their directories.
pub fn validate_instance_id(id: &str) -> Result<(), String> {
    validate_id("instance", id)
}

/// Same rule as [`validate_instance_id`].
pub fn validate_template_id(id: &str) -> Result<(), String> {
    validate_id("template", id)
}

/// Same rule as [`validate_instance_id`].
pub fn validate_checkpoint_id(id: &str) -> Result<(), String> {
    validate_id("checkpoint", id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_reasonable_ids() {
        for id in ["a", "sbx-1", "A_b-C", "0123456789", &"x".repeat(64), "_x"] {
            validate_instance_id(id).unwrap();
            validate_checkpoint_id(id).unwrap();
        }
    }

    #[test]
    fn rejects_bad_ids_with_reason() {
        for (id, needle) in [
            ("", "empty"),
            ("-rf", "start with `-`"),
            ("../etc", "contains `.`"),
            ("a/b", "contains `/`"),
            ("a b", "contains ` `"),
            ("é", "contains"),
            ("a\nb", "contains `\\n`"),
        ] {
            let e = validate_instance_id(id).unwrap_err();
            assert!(e.contains(needle), "{id:?}: {e}");
        }
        let e = validate_instance_id(&"x".repeat(65)).unwrap_err();
        assert!(e.contains("longer than 64"), "{e}");
        assert!(validate_checkpoint_id("..")
            .unwrap_err()
            .starts_with("checkpoint id"));
    }
}
