//! The integration tests of `train-model`, in one test binary (one link instead of one per
//! file): each module was a test target of its own, and its doc comment says what it checks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod checkpoint_io;
mod common;
mod config_rope;
mod fused_ops;
mod gguf_export;
mod lora;
mod parity;
mod qwen3_vl;
mod real_checkpoint;
