#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // Store::open turns a panic of the database engine on a damaged file
        // into an error (catch_unwind); libfuzzer-sys's hook would abort on
        // it first. A panic that escapes still fails the run: libfuzzer-sys
        // aborts when the target unwinds.
        // GOSSIPKV_FUZZ_PANICS=1 shows them.
        let show = std::env::var_os("GOSSIPKV_FUZZ_PANICS").is_some();
        std::panic::set_hook(Box::new(move |info| {
            if show {
                eprintln!("{info}\n{}", std::backtrace::Backtrace::force_capture());
            }
        }));
    },
    |data: &[u8]| gossipkv::fuzzing::store_file(data)
);
