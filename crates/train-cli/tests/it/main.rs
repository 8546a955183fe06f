//! The integration tests of `train-cli`, in one test binary (one link instead of one per
//! file): each module was a test target of its own, and its doc comment says what it checks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli;
mod common;
mod dpo_cmd;
mod faults;
mod generate_cmd;
mod grpo_cmd;
mod hf_compat;
mod hostile;
mod hub;
mod libtorch;
mod loop_parity;
mod reference;
mod train_cmd;
