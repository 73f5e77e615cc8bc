//! Policy parsing and validation: arbitrary text never panics; errors name the file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) =
            anvil_core::policy::Policy::from_toml(text, std::path::Path::new("/fuzz/policy.toml"))
        {
            assert!(e.to_string().contains("/fuzz/policy.toml"), "{e}");
        }
    }
});
