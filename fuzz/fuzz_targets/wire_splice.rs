//! libFuzzer target: [`etcd_squeeze::fuzzing::wire_splice`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| etcd_squeeze::fuzzing::wire_splice(data));
