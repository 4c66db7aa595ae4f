//! The configuration parser (crates/agent/src/config.rs): any text, as the
//! agent reads its file. A configuration that passes validation must be
//! usable without panics (transports, disabled methods, the policy, the
//! limits the agent advertises and derives) and must survive being written
//! back as TOML and read again unchanged.
#![no_main]

use kvm_manager_agent::config::Config;
use kvm_manager_agent::policy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text, "fuzz.toml".as_ref()) else {
        return;
    };
    let _ = config.transports();
    let _ = config.disabled_methods();
    let _ = Policy::from_config(&config);
    let l = &config.limits;
    let chunk = l.max_chunk_bytes();
    assert!(chunk >= 1 && chunk.is_power_of_two());
    // A chunk, as base64, fits in a frame with room for the envelope.
    assert!(u64::from(chunk) * 4 / 3 + 4096 <= u64::from(l.max_frame_bytes) + 3);
    let out = l.max_exec_output_bytes();
    assert!(out >= 1);
    let written = toml::to_string(&config).expect("a valid configuration serializes");
    let again = Config::parse(&written, "again.toml".as_ref())
        .unwrap_or_else(|e| panic!("written back, it no longer parses: {e}\n{written}"));
    assert_eq!(again, config, "changed by a round trip:\n{written}");
});
