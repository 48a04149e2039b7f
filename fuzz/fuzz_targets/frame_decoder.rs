//! libFuzzer target: [`etcd_squeeze::fuzzing::frame_decoder`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| etcd_squeeze::fuzzing::frame_decoder(data));
