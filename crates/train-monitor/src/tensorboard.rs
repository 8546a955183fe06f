//! TensorBoard event files (`--report-to tensorboard`): scalars and text that `tensorboard`
//! (and its Python event reader) read, written without TensorFlow.
//!
//! An event file is a sequence of TFRecords (`u64` length, masked CRC-32C of the length, the
//! bytes, masked CRC-32C of the bytes), each an `Event` protocol buffer: the first one carries
//! the file version (`brain.Event:2`), the others a `Summary` of tagged values at a step. The
//! messages are the few fields of TensorFlow's `event.proto` / `summary.proto` /
//! `tensor.proto` that scalars and text use, declared with `prost`'s derive (no code
//! generation, no `protoc`). Text goes through TensorBoard's `text` plugin: a string tensor with
//! the plugin's name in its metadata; the plugin renders it as Markdown.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{MonitorError, Result};

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
}

/// `tensorflow.SummaryMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
}

/// `tensorflow.TensorProto`, for one string.
#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    /// `DT_STRING` = 7.
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShapeProto>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto` (a scalar: no dimensions).
#[derive(Clone, PartialEq, prost::Message)]
struct TensorShapeProto {}

const DT_STRING: i32 = 7;

/// CRC-32C (Castagnoli), as TFRecord checksums it.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// TFRecord's masked CRC.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = CRC32C.checksum(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One event file being written.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl std::fmt::Debug for EventWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWriter")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorBoard looks for them
    /// (`events.out.tfevents.<seconds>.<host>.<pid>`); its first event is the file version.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| MonitorError::io(dir, e))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().replace(['/', '\\'], "_"))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now() as u64,
            std::process::id()
        ));
        let file = File::create_new(&path).map_err(|e| MonitorError::io(&path, e))?;
        let mut w = Self {
            path,
            file: BufWriter::new(file),
        };
        w.write(&Event {
            wall_time: now(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        w.flush()?;
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &Event) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let io = |e| MonitorError::io(&self.path, e);
        self.file.write_all(&len).map_err(io)?;
        self.file
            .write_all(&masked_crc(&len).to_le_bytes())
            .map_err(io)?;
        self.file.write_all(&data).map_err(io)?;
        self.file
            .write_all(&masked_crc(&data).to_le_bytes())
            .map_err(io)
    }

    /// Scalars at `step`, one event: `(tag, value)` pairs (non-finite values are written as
    /// they are; TensorBoard shows them).
    pub fn scalars(&mut self, step: usize, values: &[(String, f64)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary {
                value: values
                    .iter()
                    .map(|(tag, v)| Value {
                        tag: tag.clone(),
                        simple_value: Some(*v as f32),
                        tensor: None,
                        metadata: None,
                    })
                    .collect(),
            }),
        })
    }

    /// A text (Markdown) under `tag` at `step`, for the `text` plugin.
    pub fn text(&mut self, step: usize, tag: &str, markdown: &str) -> Result<()> {
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary {
                value: vec![Value {
                    tag: tag.to_string(),
                    simple_value: None,
                    tensor: Some(TensorProto {
                        dtype: DT_STRING,
                        tensor_shape: Some(TensorShapeProto {}),
                        string_val: vec![markdown.as_bytes().to_vec()],
                    }),
                    metadata: Some(SummaryMetadata {
                        plugin_data: Some(PluginData {
                            plugin_name: "text".into(),
                        }),
                    }),
                }],
            }),
        })
    }

    /// Writes what is buffered to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| MonitorError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the records back, checking both checksums of each.
    fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(len_bytes));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            out.push(data.to_vec());
            at += 16 + len;
        }
        out
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // RFC 3720's check value.
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn events_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(&dir.path().join("runs")).unwrap();
        w.scalars(
            3,
            &[
                ("train/loss".into(), 1.5),
                ("train/learning_rate".into(), 1e-4),
            ],
        )
        .unwrap();
        w.text(3, "previews", "**prompt**\n\nhi").unwrap();
        w.flush().unwrap();
        let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let events: Vec<Event> = records(&std::fs::read(w.path()).unwrap())
            .iter()
            .map(|r| Event::decode(r.as_slice()).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let s = events[1].summary.as_ref().unwrap();
        assert_eq!((events[1].step, s.value.len()), (3, 2));
        assert_eq!(s.value[0].tag, "train/loss");
        assert_eq!(s.value[0].simple_value, Some(1.5));
        let t = &events[2].summary.as_ref().unwrap().value[0];
        assert_eq!(
            t.tensor.as_ref().unwrap().string_val,
            vec![b"**prompt**\n\nhi".to_vec()]
        );
        assert_eq!(
            t.metadata
                .as_ref()
                .unwrap()
                .plugin_data
                .as_ref()
                .unwrap()
                .plugin_name,
            "text"
        );
    }
}
