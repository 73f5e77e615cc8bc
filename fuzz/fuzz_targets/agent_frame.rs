//! The agent wire protocol: frames and messages decoded from arbitrary bytes (what a
//! compromised sandbox could send the daemon) never panic or allocate past the limits.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut cur = std::io::Cursor::new(data);
    while let Ok(Some(_)) = anvil_protocol::read_message::<_, anvil_protocol::Response>(&mut cur) {}
    let mut cur = std::io::Cursor::new(data);
    while let Ok(Some(_)) = anvil_protocol::read_message::<_, anvil_protocol::Request>(&mut cur) {}
});
