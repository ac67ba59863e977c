//! nvs-build's integration tests, one binary: each former `tests/*.rs` file is a module here
//! (filter by module: `cargo test -p nvs-build --test it table::`).

mod dependency_budget;
mod encryption;
mod golden;
mod metadata;
mod properties;
mod reader;
mod reader_verdict;
mod roundtrip;
mod table;
