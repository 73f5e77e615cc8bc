//! Decoding "fuzz" tests (cargo-fuzz needs a nightly toolchain this project does not use):
//! random bytes, random TOML-ish text and randomly mutated copies of the shipped examples are
//! fed to the config and policy parsers. They must never panic, and every error must name
//! the file it came from.
use anvil_core::config::Config;
use anvil_core::policy::Policy;
use proptest::prelude::*;
use std::path::Path;

const CONFIG: &str = include_str!("../../../examples/config.toml");
const DEV: &str = include_str!("../../../examples/dev.toml");
const RL: &str = include_str!("../../../examples/policies/agent-rl.toml");
const TOOL: &str = include_str!("../../../examples/policies/agent-tool.toml");

#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize, usize),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let byte = prop_oneof![
        prop::sample::select(b"=[]\"'#{},.\n\\0123456789-_ax".to_vec()),
        any::<u8>(),
    ];
    prop_oneof![
        (any::<usize>(), byte.clone()).prop_map(|(i, b)| Edit::Replace(i, b)),
        (any::<usize>(), byte).prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<usize>(), 1usize..40).prop_map(|(i, n)| Edit::Delete(i, n)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), 1usize..80).prop_map(|(i, n)| Edit::Duplicate(i, n)),
    ]
}

/// Applies edits to `base`; the result is lossily turned back into text (the parsers take
/// `&str`; invalid UTF-8 never reaches them from a file read as a string either).
fn mutate(base: &str, edits: &[Edit]) -> String {
    let mut b = base.as_bytes().to_vec();
    for e in edits {
        let len = b.len().max(1);
        match *e {
            Edit::Replace(i, x) if !b.is_empty() => b[i % len] = x,
            Edit::Insert(i, x) => b.insert(i % (b.len() + 1), x),
            Edit::Delete(i, n) if !b.is_empty() => {
                let s = i % len;
                let end = (s + n).min(b.len());
                b.drain(s..end);
            }
            Edit::Truncate(i) => b.truncate(i % (b.len() + 1)),
            Edit::Duplicate(i, n) if !b.is_empty() => {
                let s = i % len;
                let end = (s + n).min(b.len());
                let chunk = b[s..end].to_vec();
                b.splice(s..s, chunk);
            }
            _ => {}
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn check_config(text: &str) -> Result<(), TestCaseError> {
    let origin = Path::new("/etc/anvil/fuzz-config.toml");
    if let Err(e) = Config::from_toml(text, origin) {
        let msg = e.to_string();
        prop_assert!(
            msg.contains("fuzz-config.toml"),
            "config error without the file: {}",
            msg
        );
        prop_assert!(
            msg.len() > "/etc/anvil/fuzz-config.toml".len() + 2,
            "empty reason: {}",
            msg
        );
    }
    Ok(())
}

fn check_policy(text: &str) -> Result<(), TestCaseError> {
    let origin = Path::new("/etc/anvil/policies/fuzz-policy.toml");
    if let Err(e) = Policy::from_toml(text, origin) {
        let msg = e.to_string();
        prop_assert!(
            msg.contains("fuzz-policy.toml"),
            "policy error without the file: {}",
            msg
        );
        prop_assert!(
            msg.len() > "/etc/anvil/policies/fuzz-policy.toml".len() + 2,
            "empty reason: {}",
            msg
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_configs_never_panic(which in 0usize..2, edits in prop::collection::vec(edit(), 1..8)) {
        let base = [CONFIG, DEV][which];
        check_config(&mutate(base, &edits))?;
    }

    #[test]
    fn mutated_policies_never_panic(which in 0usize..2, edits in prop::collection::vec(edit(), 1..8)) {
        let base = [RL, TOOL][which];
        check_policy(&mutate(base, &edits))?;
    }

    #[test]
    fn random_text_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        check_config(&text)?;
        check_policy(&text)?;
    }

    #[test]
    fn tomlish_text_never_panics(text in "(\\[[a-z.]{0,12}\\]\n|[a-z_]{1,16} = (\"[^\"\n]{0,12}\"|-?[0-9]{1,20}|true|\\[\\]|\\{\\})\n){0,12}") {
        check_config(&text)?;
        check_policy(&text)?;
    }
}

#[test]
fn shipped_examples_parse() {
    Config::from_toml(CONFIG, Path::new("/etc/anvil/config.toml")).unwrap();
    Policy::from_toml(RL, Path::new("/etc/anvil/policies/agent-rl.toml")).unwrap();
    Policy::from_toml(TOOL, Path::new("/etc/anvil/policies/agent-tool.toml")).unwrap();
}
