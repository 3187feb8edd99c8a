//! pinproxy's integration tests, one binary: every `tests/*.rs` file is a
//! module of this crate (one subject per file), and `support/` is the
//! harness they share.
//!
//! One binary rather than one per file: each test binary links the whole
//! proxy with BoringSSL (about 130 MB with line tables), so forty binaries
//! cost gigabytes of disk and minutes of linking on a two-core machine.
//! Run one subject with `cargo test --test suite pinning::`, one test with
//! `cargo test --test suite -- --exact pinning::NAME`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

/// Counts each thread's allocations, for the tests that hold a path to an
/// allocation budget (`allocations`); otherwise the system allocator.
#[global_allocator]
static ALLOCATOR: support::allocations::Counting = support::allocations::Counting;

mod allocations;
mod auth;
mod bad_input;
mod ca_hygiene;
mod conflicts;
mod docs;
mod durability;
mod egress_headers;
mod egress_ip;
mod exit_failure;
mod exit_kinds;
mod fingerprint;
mod fingerprint_parsers;
mod fingerprint_policy;
mod fleet;
mod http2;
mod http_semantics;
mod invalidation;
mod invariant;
mod layout;
mod lifetimes;
mod limits;
mod live_page;
mod mitm;
mod observability;
mod operations;
mod parking;
mod passthrough;
mod pinning;
mod proptests;
mod real_clients;
mod replays;
mod retirement;
mod rotation;
mod secrets_in_logs;
mod selftest;
mod session_keys;
mod smuggling;
mod soak;
mod ssrf;
mod sticky_sessions;
mod store_contract;
mod store_faults;
mod store_loss;
mod streaming;
mod third_party_exits;
mod upstream_pool;
mod websocket;
