//! No code. A workspace member whose dependencies exist only for their features: with Cargo's
//! feature resolver, the build-time (host) dependencies of every package selected by a command
//! share one feature set, so listing here the host features that the `tch` backend's build
//! brings (through `torch-sys`'s build dependencies) gives the release build the same proc
//! macros as the tch build, and the tch step of `cargo xtask ci` compiles only what really
//! differs (libtorch's bindings and the crates above them).
//!
//! To check it after a dependency update: run the release build, then the tch test build
//! (`cargo xtask ci` does both) and look at what the second one compiles; or compare
//! `cargo tree --workspace -e features -i syn@3` with and without the tch features.
