//! The integration tests of `train-runner`, in one test binary (one link instead of one per
//! file): each module was a test target of its own, and its doc comment says what it checks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod dpo;
mod grpo;
mod moe;
mod runner;
