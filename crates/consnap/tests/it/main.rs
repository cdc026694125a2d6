//! consnap's integration tests, in one binary: one link instead of one
//! per file, and the test threads stay busy across files instead of
//! idling at the end of each. Each module was a test file of its own; run
//! one with `cargo test --release -p consnap --test it MODULE::`.

mod bad_input_support;
mod common;
mod garage_support;
mod store_support;

mod api;
mod bad_input;
mod bad_input_cli;
mod bad_input_store;
mod bench_quick;
mod boot;
mod cow;
mod demo;
mod disk;
mod guest_time;
mod lazy;
mod linux;
mod net;
mod qemu;
mod replicate;
mod replicate_cache;
mod replicate_cluster;
mod snapshot_errors;
mod snapshots;
mod store_damage;
mod store_kill;
