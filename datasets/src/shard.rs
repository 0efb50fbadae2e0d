//! One shard: an Arrow IPC file of records (columns: `key` (utf8),
//! `image` (binary: encoded JPEG/PNG/WebP), then `text` (utf8, align) or
//! `labels` (list<int32>, jft)), or a WebDataset tar read in place.

use std::io::Cursor;
use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, Int32Builder, ListBuilder, StringBuilder};
use arrow_array::{Array, BinaryArray, ListArray, RecordBatch, StringArray};
use arrow_ipc::reader::FileReader;
use arrow_ipc::writer::{FileWriter, IpcWriteOptions};
use arrow_schema::{ArrowError, DataType, Field, Schema};
use bytes::Bytes;
use contract::dataset::{DatasetIndex, DatasetKind};
use webdataset::{Label, TarShard};

use crate::bad_record::BadRecord;

/// Rows per Arrow record batch inside a shard.
const BATCH_ROWS: usize = 256;

/// One sample as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub key: String,
    /// Encoded image bytes.
    pub image: Vec<u8>,
    pub content: Content,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Labels(Vec<i32>),
}

impl Content {
    pub fn kind(&self) -> DatasetKind {
        match self {
            Content::Text(_) => DatasetKind::Align,
            Content::Labels(_) => DatasetKind::Jft,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    /// LZ4 frames: cheap to decode; images are compressed already, so
    /// this mostly helps text-heavy shards.
    Lz4,
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{origin}: not an Arrow IPC file: {message}")]
    Format { origin: String, message: String },
    #[error("{origin}: column `{column}`: {message}")]
    Schema {
        origin: String,
        column: String,
        message: String,
    },
    #[error("cannot encode a shard: {0}")]
    Encode(#[from] ArrowError),
}

pub fn schema(kind: DatasetKind) -> Schema {
    let content = match kind {
        DatasetKind::Align => Field::new("text", DataType::Utf8, false),
        DatasetKind::Jft => Field::new(
            "labels",
            DataType::List(Arc::new(Field::new("item", DataType::Int32, true))),
            false,
        ),
    };
    Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("image", DataType::Binary, false),
        content,
    ])
}

/// Encodes `records` (all of `kind`) as one Arrow IPC file.
pub fn encode(kind: DatasetKind, records: &[Record], compression: Compression) -> Result<Vec<u8>, ShardError> {
    let schema = Arc::new(schema(kind));
    let options = IpcWriteOptions::default().try_with_compression(match compression {
        Compression::None => None,
        Compression::Lz4 => Some(arrow_ipc::CompressionType::LZ4_FRAME),
    })?;
    let mut writer = FileWriter::try_new_with_options(Vec::new(), &schema, options)?;
    for chunk in records.chunks(BATCH_ROWS) {
        let mut keys = StringBuilder::new();
        let mut images = BinaryBuilder::new();
        let mut texts = StringBuilder::new();
        let mut labels = ListBuilder::new(Int32Builder::new());
        for record in chunk {
            keys.append_value(&record.key);
            images.append_value(&record.image);
            match &record.content {
                Content::Text(text) => texts.append_value(text),
                Content::Labels(values) => labels.append_value(values.iter().map(|&v| Some(v))),
            }
            assert_eq!(
                record.content.kind(),
                kind,
                "record {} is not of the shard's kind",
                record.key
            );
        }
        let content: Arc<dyn Array> = match kind {
            DatasetKind::Align => Arc::new(texts.finish()),
            DatasetKind::Jft => Arc::new(labels.finish()),
        };
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(keys.finish()), Arc::new(images.finish()), content],
        )?;
        writer.write(&batch)?;
    }
    writer.finish()?;
    Ok(writer.into_inner()?)
}

/// A decoded shard, its records addressable by row.
#[derive(Debug)]
pub struct Shard {
    stored: Stored,
    rows: usize,
}

#[derive(Debug)]
enum Stored {
    Arrow {
        batches: Vec<Columns>,
        /// First row of every batch.
        starts: Vec<usize>,
    },
    Tar {
        tar: TarShard,
        kind: DatasetKind,
        /// Class ids of class names (jft), by name.
        ids: std::collections::HashMap<String, i32>,
    },
}

#[derive(Debug)]
struct Columns {
    keys: StringArray,
    images: BinaryArray,
    content: ContentColumn,
}

#[derive(Debug)]
enum ContentColumn {
    Text(StringArray),
    Labels(ListArray),
}

/// A record of a decoded shard, borrowed.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordRef<'a> {
    pub key: &'a str,
    pub image: &'a [u8],
    pub text: Option<&'a str>,
    pub labels: Option<Vec<i32>>,
    /// Why the record cannot be used, where its container says so (a
    /// tar sample without its image or caption, a class name not listed).
    pub problem: Option<(BadRecord, String)>,
}

impl Shard {
    /// Decodes `bytes` and checks the columns `kind` needs; `origin` names
    /// the shard in errors.
    pub fn decode(bytes: Bytes, kind: DatasetKind, origin: &str) -> Result<Self, ShardError> {
        let format = |error: ArrowError| ShardError::Format {
            origin: origin.to_string(),
            message: error.to_string(),
        };
        check_lengths(&bytes).map_err(|message| ShardError::Format {
            origin: origin.to_string(),
            message,
        })?;
        // arrow's IPC reader panics on some malformed buffers (an offset
        // past the end) instead of failing: a damaged shard is an error here.
        let read = std::panic::catch_unwind(|| -> Result<Self, ShardError> {
            let reader = FileReader::try_new(Cursor::new(bytes), None).map_err(format)?;
            let mut batches = Vec::new();
            let mut starts = Vec::new();
            let mut rows = 0;
            for batch in reader {
                let batch = batch.map_err(format)?;
                starts.push(rows);
                rows += batch.num_rows();
                batches.push(Columns::of(&batch, kind, origin)?);
            }
            Ok(Self {
                stored: Stored::Arrow { batches, starts },
                rows,
            })
        });
        read.unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("malformed buffers");
            Err(ShardError::Format {
                origin: origin.to_string(),
                message: format!("damaged Arrow data ({message})"),
            })
        })
    }

    /// A WebDataset tar's samples, as rows; `index` gives the class
    /// names a sample's class name is looked up in.
    pub fn from_tar(bytes: Bytes, index: &DatasetIndex) -> Self {
        let tar = TarShard::parse(bytes);
        let ids = (index.classes.iter().zip(0..))
            .map(|(class, id)| (class.name.clone(), id))
            .collect();
        Self {
            rows: tar.len(),
            stored: Stored::Tar {
                tar,
                kind: index.kind,
                ids,
            },
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn record(&self, row: usize) -> RecordRef<'_> {
        assert!(row < self.rows, "row {row} is outside a shard of {} rows", self.rows);
        let (batches, starts) = match &self.stored {
            Stored::Arrow { batches, starts } => (batches, starts),
            Stored::Tar { tar, kind, ids } => return tar_record(tar, row, *kind, ids),
        };
        let batch = starts.partition_point(|&start| start <= row) - 1;
        let columns = &batches[batch];
        let i = row - starts[batch];
        let (text, labels) = match &columns.content {
            ContentColumn::Text(texts) => (Some(texts.value(i)), None),
            ContentColumn::Labels(lists) => {
                let values = lists.value(i);
                let values = values
                    .as_any()
                    .downcast_ref::<arrow_array::Int32Array>()
                    .expect("the schema check made labels int32");
                (None, Some(values.iter().flatten().collect()))
            }
        };
        RecordRef {
            key: columns.keys.value(i),
            image: columns.images.value(i),
            text,
            labels,
            problem: None,
        }
    }
}

/// The lengths an Arrow IPC file's footer and blocks claim, against the
/// file's own: arrow's reader allocates what they claim before reading, so
/// a damaged 3 KB shard claiming a 2 GB block took seconds and gigabytes.
fn check_lengths(bytes: &[u8]) -> Result<(), String> {
    let len = bytes.len();
    let tail = len.checked_sub(10).ok_or("shorter than an Arrow file's footer")?;
    let footer_len = i32::from_le_bytes(bytes[tail..tail + 4].try_into().expect("4 bytes"));
    let footer_start = usize::try_from(footer_len)
        .ok()
        .and_then(|footer_len| tail.checked_sub(footer_len))
        .ok_or_else(|| format!("its footer claims {footer_len} bytes of a {len}-byte file"))?;
    let footer = arrow_ipc::root_as_footer(&bytes[footer_start..tail]).map_err(|e| format!("its footer: {e}"))?;
    let blocks = footer
        .recordBatches()
        .into_iter()
        .chain(footer.dictionaries())
        .flatten();
    for block in blocks {
        let end = [block.offset(), i64::from(block.metaDataLength()), block.bodyLength()]
            .into_iter()
            .try_fold(0i64, |sum, part| if part < 0 { None } else { sum.checked_add(part) });
        if end.is_none_or(|end| end > len as i64) {
            return Err(format!(
                "a block at byte {} claims {} + {} bytes of a {len}-byte file",
                block.offset(),
                block.metaDataLength(),
                block.bodyLength()
            ));
        }
    }
    Ok(())
}

fn tar_record<'a>(
    tar: &'a TarShard,
    row: usize,
    kind: DatasetKind,
    ids: &std::collections::HashMap<String, i32>,
) -> RecordRef<'a> {
    let sample = tar.sample(row);
    let mut problem = sample
        .missing(kind == DatasetKind::Align)
        .map(|missing| (BadRecord::IncompleteSample, missing));
    let labels = match (kind, &sample.label) {
        (DatasetKind::Jft, Some(Label::Ids(stored))) => {
            let fitting: Option<Vec<i32>> = stored.iter().map(|&id| i32::try_from(id).ok()).collect();
            if fitting.is_none() {
                problem.get_or_insert((BadRecord::BadLabel, format!("labels {stored:?} are not classes")));
            }
            fitting
        }
        (DatasetKind::Jft, Some(Label::Name(name))) => match ids.get(name) {
            Some(&id) => Some(vec![id]),
            None => {
                problem.get_or_insert((BadRecord::BadLabel, format!("class `{name}` is not in the class list")));
                None
            }
        },
        _ => None,
    };
    RecordRef {
        key: &sample.key,
        image: tar.image(row).unwrap_or_default(),
        text: sample.text.as_deref().filter(|_| kind == DatasetKind::Align),
        labels,
        problem,
    }
}

impl Columns {
    fn of(batch: &RecordBatch, kind: DatasetKind, origin: &str) -> Result<Self, ShardError> {
        let column = |name: &str| {
            batch.column_by_name(name).ok_or_else(|| ShardError::Schema {
                origin: origin.to_string(),
                column: name.to_string(),
                message: format!(
                    "missing ({kind} shards have the columns key, image and {})",
                    content_column(kind)
                ),
            })
        };
        let wrong_type = |name: &str, expected: &str, found: &DataType| ShardError::Schema {
            origin: origin.to_string(),
            column: name.to_string(),
            message: format!("is {found}, expected {expected}"),
        };
        let strings = |name: &str| -> Result<StringArray, ShardError> {
            let array = column(name)?;
            array
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .ok_or_else(|| wrong_type(name, "Utf8", array.data_type()))
        };
        let image = column("image")?;
        let images = image
            .as_any()
            .downcast_ref::<BinaryArray>()
            .cloned()
            .ok_or_else(|| wrong_type("image", "Binary", image.data_type()))?;
        let content = match kind {
            DatasetKind::Align => ContentColumn::Text(strings("text")?),
            DatasetKind::Jft => {
                let array = column("labels")?;
                let lists = array
                    .as_any()
                    .downcast_ref::<ListArray>()
                    .filter(|lists| lists.value_type() == DataType::Int32)
                    .cloned()
                    .ok_or_else(|| wrong_type("labels", "List(Int32)", array.data_type()))?;
                ContentColumn::Labels(lists)
            }
        };
        Ok(Self {
            keys: strings("key")?,
            images,
            content,
        })
    }
}

fn content_column(kind: DatasetKind) -> &'static str {
    match kind {
        DatasetKind::Align => "text",
        DatasetKind::Jft => "labels",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(count: usize) -> Vec<Record> {
        (0..count)
            .map(|i| Record {
                key: format!("k{i}"),
                image: vec![i as u8; i % 7],
                content: Content::Labels(vec![i as i32, 100 + i as i32]),
            })
            .collect()
    }

    #[test]
    fn shards_round_trip_across_batches_with_and_without_compression() {
        let records = records(600);
        for compression in [Compression::None, Compression::Lz4] {
            let bytes = encode(DatasetKind::Jft, &records, compression).unwrap();
            let shard = Shard::decode(Bytes::from(bytes), DatasetKind::Jft, "s").unwrap();
            assert_eq!(shard.rows(), 600);
            for row in [0, 255, 256, 599] {
                let record = shard.record(row);
                assert_eq!(record.key, records[row].key);
                assert_eq!(record.image, records[row].image.as_slice());
                assert_eq!(Content::Labels(record.labels.unwrap()), records[row].content);
            }
        }
    }

    /// Found by tests/fuzz.rs: a block claiming a terabyte was allocated
    /// (zeroed) before the read failed.
    #[test]
    fn lengths_past_the_end_are_refused_before_anything_is_allocated() {
        let mut bytes = encode(DatasetKind::Jft, &records(3), Compression::None).unwrap();
        let len = bytes.len();
        let footer_len = i32::from_le_bytes(bytes[len - 10..len - 6].try_into().unwrap()) as usize;
        let footer_start = len - 10 - footer_len;
        let block = *arrow_ipc::root_as_footer(&bytes[footer_start..len - 10])
            .unwrap()
            .recordBatches()
            .unwrap()
            .get(0);
        // The block as stored: offset, metadata length, padding, body length.
        let mut stored = block.offset().to_le_bytes().to_vec();
        stored.extend(block.metaDataLength().to_le_bytes());
        stored.extend([0; 4]);
        let at = footer_start
            + bytes[footer_start..]
                .windows(16)
                .position(|w| w[..12] == stored[..12])
                .unwrap();
        bytes[at + 16..at + 24].copy_from_slice(&(1i64 << 40).to_le_bytes());
        let error = Shard::decode(Bytes::from(bytes.clone()), DatasetKind::Jft, "s").unwrap_err();
        assert!(
            error.to_string().contains(&format!(
                "claims {} + 1099511627776 bytes of a {len}-byte file",
                block.metaDataLength()
            )),
            "{error}"
        );
        bytes[len - 10..len - 6].copy_from_slice(&i32::MAX.to_le_bytes());
        let error = Shard::decode(Bytes::from(bytes), DatasetKind::Jft, "s").unwrap_err();
        assert!(
            error.to_string().contains("its footer claims 2147483647 bytes"),
            "{error}"
        );
    }

    #[test]
    fn a_shard_of_the_wrong_kind_or_not_arrow_is_refused_by_name() {
        let bytes = Bytes::from(encode(DatasetKind::Jft, &records(3), Compression::None).unwrap());
        let error = Shard::decode(bytes, DatasetKind::Align, "s3://b/shard-0.arrow").unwrap_err();
        assert_eq!(
            error.to_string(),
            "s3://b/shard-0.arrow: column `text`: missing (align shards have the columns key, image and text)"
        );
        let error = Shard::decode(Bytes::from_static(b"not arrow at all"), DatasetKind::Jft, "f").unwrap_err();
        assert!(error.to_string().starts_with("f: not an Arrow IPC file:"), "{error}");
    }
}
