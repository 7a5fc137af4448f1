#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| apilb_testkit::fuzzing::discovery_stream(data));
