//! Nothing to build: the build dependencies of this crate exist for their features (Cargo.toml).
fn main() {}
