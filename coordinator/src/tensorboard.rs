//! TensorBoard event files (`[logging] tensorboard`): the job's scalars as
//! TensorBoard's own reader reads them, one run per job.
//!
//! A file is TFRecords (length, masked CRC-32C of it, data, masked CRC-32C
//! of that), each an `Event` protocol buffer, encoded here by hand (the
//! four fields it takes). Each coordinator writes its own file, whole, to
//! any store (object stores cannot append): every flush puts the events of
//! its lifetime again. Steps trained again after a recovery replace the
//! ones written before (the buffer is cut back to the resumed step); a
//! coordinator that resumes a job starts its file with a SessionLog START
//! at the resumed step, which makes TensorBoard drop an earlier file's
//! steps from there on. So each step is read once.

use proto::StepMetrics;
use store::{Store, StoreError};

/// Events of one coordinator's lifetime, flushed whole to one object.
pub struct EventLog {
    store: Store,
    file: String,
    bytes: Vec<u8>,
    /// (step, where its events start in `bytes`), in order.
    steps: Vec<(u64, usize)>,
    /// Whether `bytes` holds events not yet put.
    dirty: bool,
}

impl EventLog {
    /// A new file under `store` for a job going on from step `start` (0:
    /// a fresh job), named by `now` (Unix seconds, to the millisecond: a
    /// later coordinator's file sorts after).
    pub fn new(store: Store, start: u64, now: f64) -> Self {
        let millis = (now * 1000.0) as u64;
        let mut log = Self {
            store,
            file: format!("events.out.tfevents.{:010}.coca.{:03}", millis / 1000, millis % 1000),
            bytes: Vec::new(),
            steps: Vec::new(),
            dirty: true,
        };
        log.append(&event(now, 0, Body::FileVersion("brain.Event:2")));
        if start > 0 {
            log.append(&event(now, start + 1, Body::SessionStart));
        }
        log
    }

    pub fn url(&self) -> String {
        self.store.object_url(&self.file)
    }

    /// Step `metrics.step`'s scalars, at `now`.
    pub fn record(&mut self, metrics: &StepMetrics, now: f64) {
        let mut values = vec![
            ("train/loss", metrics.loss),
            ("train/contrastive", metrics.contrastive),
            ("train/captioning", metrics.captioning),
            ("train/learning_rate", metrics.learning_rate),
            ("train/logit_scale", metrics.logit_scale),
            ("train/gradient_norm", metrics.gradient_norm),
            ("train/samples_per_second", metrics.samples_per_second),
            ("train/data_wait_share", metrics.data_wait_share),
        ]
        .into_iter()
        .map(|(tag, value)| (tag.to_string(), value))
        .collect::<Vec<_>>();
        values.extend(metrics.evals.iter().map(|e| (format!("eval/{}", e.name), e.value)));
        self.steps.push((metrics.step, self.bytes.len()));
        self.append(&event(now, metrics.step, Body::Scalars(&values)));
    }

    /// Training goes on from step `step`: what was written after it is
    /// trained again, so it goes.
    pub fn resumed_from(&mut self, step: u64) {
        if let Some(at) = self.steps.iter().position(|&(s, _)| s > step) {
            self.bytes.truncate(self.steps[at].1);
            self.steps.truncate(at);
            self.dirty = true;
        }
    }

    /// Puts the file, when it changed.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        if self.dirty {
            self.store.put(&self.file, self.bytes.clone().into())?;
            self.dirty = false;
        }
        Ok(())
    }

    fn append(&mut self, data: &[u8]) {
        let length = (data.len() as u64).to_le_bytes();
        self.bytes.extend_from_slice(&length);
        self.bytes.extend_from_slice(&masked_crc(&length).to_le_bytes());
        self.bytes.extend_from_slice(data);
        self.bytes.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.dirty = true;
    }
}

enum Body<'a> {
    FileVersion(&'a str),
    SessionStart,
    Scalars(&'a [(String, f64)]),
}

/// An `Event` message: wall_time (1, double), step (2, int64), then
/// file_version (3), summary (5: Summary { repeated Value value = 1 },
/// Value { tag = 1, simple_value = 2 (float) }) or session_log (6:
/// SessionLog { status = 1 }, START = 1).
fn event(wall_time: f64, step: u64, body: Body) -> Vec<u8> {
    let mut out = vec![0x09];
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(0x10);
    varint(&mut out, step);
    match body {
        Body::FileVersion(version) => delimited(&mut out, 0x1a, version.as_bytes()),
        Body::SessionStart => delimited(&mut out, 0x32, &[0x08, 0x01]),
        Body::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut entry = Vec::new();
                delimited(&mut entry, 0x0a, tag.as_bytes());
                entry.push(0x15);
                entry.extend_from_slice(&(*value as f32).to_le_bytes());
                delimited(&mut summary, 0x0a, &entry);
            }
            delimited(&mut out, 0x2a, &summary);
        }
    }
    out
}

fn delimited(out: &mut Vec<u8>, key: u8, bytes: &[u8]) {
    out.push(key);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// TFRecord's checksum: CRC-32C, rotated and offset.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli), bit by bit: event files are small.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_its_published_check_value() {
        // The CRC catalogue's check input for CRC-32C (iSCSI).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn a_resume_cuts_the_steps_after_it() {
        let store = Store::open("memory://tensorboard", &Default::default()).unwrap();
        let mut log = EventLog::new(store, 0, 1.0);
        let metrics = |step| StepMetrics {
            step,
            ..StepMetrics::default()
        };
        log.record(&metrics(1), 2.0);
        let after_one = log.bytes.len();
        log.record(&metrics(2), 3.0);
        log.record(&metrics(3), 4.0);
        log.resumed_from(1);
        assert_eq!(log.bytes.len(), after_one);
        log.flush().unwrap();
        assert!(!log.dirty);
    }
}
