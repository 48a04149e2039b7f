//! libFuzzer target: [`etcd_squeeze::fuzzing::request_rewriter`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| etcd_squeeze::fuzzing::request_rewriter(data));
