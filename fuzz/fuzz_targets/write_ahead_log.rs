#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| gossipkv::fuzzing::write_ahead_log(data));
