//! Host memory as the kernel reports it (Linux `/proc`; `None` elsewhere).

use serde::{Deserialize, Serialize};

/// Memory of this process and of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Resident set size of this process.
    pub rss_bytes: Option<u64>,
    /// Memory the machine can still give (`MemAvailable`).
    pub available_bytes: Option<u64>,
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

impl MemoryInfo {
    /// Reads `/proc/self/status` and `/proc/meminfo`.
    pub fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            rss_bytes: kib_field(&status, "VmRSS:"),
            available_bytes: kib_field(&meminfo, "MemAvailable:"),
        }
    }
}
