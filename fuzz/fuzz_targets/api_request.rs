//! API request decoding: every JSON body type the daemon accepts, from arbitrary bytes.
#![no_main]
use anvil::model::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => drop(serde_json::from_slice::<CreateRequest>(body)),
        1 => drop(serde_json::from_slice::<ExecRequest>(body)),
        2 => drop(serde_json::from_slice::<SizingRequest>(body)),
        3 => drop(serde_json::from_slice::<TemplateRequest>(body)),
        4 => drop(serde_json::from_slice::<CheckpointRequest>(body)),
        5 => drop(serde_json::from_slice::<ResetRequest>(body)),
        6 => drop(serde_json::from_slice::<RollbackRequest>(body)),
        _ => drop(serde_json::from_slice::<TtlRequest>(body)),
    }
});
