#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| apilb::fuzzing::discovery_stream(data));
