//! Reading the policy directory (the parsing and validation live in anvil-core).

use anvil_core::config::{Config, OnLoadError};
use anvil_core::policy::{Policy, PolicySet};

/// Loads every `*.toml` in `[policy].dir`. With `on_load_error = fail` any bad file fails the
/// whole load (naming file and reason); with `warn` bad files are skipped and reported.
pub fn load_policy_dir(cfg: &Config) -> Result<(PolicySet, Vec<String>), String> {
    let dir = &cfg.policy.dir;
    let rd =
        std::fs::read_dir(dir).map_err(|e| format!("policy directory {}: {e}", dir.display()))?;
    let mut files: Vec<_> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut policies = Vec::new();
    let mut warnings = Vec::new();
    for f in files {
        let parsed = std::fs::read_to_string(&f)
            .map_err(|e| format!("{}: {e}", f.display()))
            .and_then(|text| Policy::from_toml(&text, &f).map_err(|e| e.to_string()))
            .and_then(|p| {
                anvil_core::hooks::validate_policy_hooks(
                    &p,
                    &anvil_core::hooks::HookRegistry::builtin(),
                )
                .map_err(|e| format!("{}: {e}", f.display()))
                .map(|_| p)
            });
        match parsed {
            Ok(p) => policies.push(p),
            Err(e) if cfg.policy.on_load_error == OnLoadError::Warn => {
                warnings.push(format!("skipping policy file: {e}"));
            }
            Err(e) => return Err(e),
        }
    }
    let set = PolicySet::new(policies).map_err(|e| e.to_string())?;
    Ok((set, warnings))
}
