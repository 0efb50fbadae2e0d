//! The demo dataset: procedurally drawn coloured shapes, no external files.
//! ALIGN-style samples pair two shapes with a caption naming their colours,
//! shapes, sizes and relation ("a small red circle above a large blue
//! square"); JFT-style samples show one shape labelled with its class
//! ("red circle", parent "circle"). Every sample is a pure function of the
//! seed and its index.

use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage};

use contract::rng::SplitMix64;

pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 50]),
    ("blue", [30, 60, 220]),
    ("yellow", [240, 210, 20]),
    ("purple", [140, 40, 180]),
    ("orange", [250, 130, 10]),
];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
const BACKGROUND: [u8; 3] = [245, 245, 240];

/// One drawn shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub colour: usize,
    pub kind: usize,
    pub large: bool,
    /// Centre, in pixels.
    pub x: f32,
    pub y: f32,
}

impl Shape {
    fn radius(&self, side: u32) -> f32 {
        side as f32 * if self.large { 0.2 } else { 0.11 }
    }

    fn contains(&self, px: f32, py: f32, side: u32) -> bool {
        let r = self.radius(side);
        let (dx, dy) = (px - self.x, py - self.y);
        match SHAPES[self.kind] {
            "circle" => dx * dx + dy * dy <= r * r,
            "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
            // Apex up: inside when below the two slanted edges and above the base.
            _ => dy <= r * 0.8 && dy >= -r && dx.abs() <= (dy + r) * 0.6,
        }
    }

    fn describe(&self) -> String {
        let size = if self.large { "large" } else { "small" };
        format!("{size} {} {}", COLOURS[self.colour].0, SHAPES[self.kind])
    }
}

/// An ALIGN-style sample: a PNG and its caption.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionedImage {
    pub key: String,
    pub png: Vec<u8>,
    pub text: String,
    pub shapes: [Shape; 2],
}

/// A JFT-style sample: a PNG and its class labels.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledImage {
    pub key: String,
    pub png: Vec<u8>,
    pub labels: Vec<i32>,
    pub shape: Shape,
}

/// The JFT-style classes, `colour shape`, each with its shape as parent.
pub fn classes() -> Vec<(String, String)> {
    COLOURS
        .iter()
        .flat_map(|(colour, _)| {
            SHAPES
                .iter()
                .map(move |shape| (format!("{colour} {shape}"), shape.to_string()))
        })
        .collect()
}

const RELATIONS: [(&str, f32, f32); 4] = [
    ("above", 0.0, -1.0),
    ("below", 0.0, 1.0),
    ("left of", -1.0, 0.0),
    ("right of", 1.0, 0.0),
];

pub fn captioned(seed: u64, index: u64, side: u32) -> CaptionedImage {
    let mut rng = SplitMix64::new(seed ^ index.wrapping_mul(0xa076_1d64_78bd_642f) ^ 0xa119);
    let mut pick = |n: usize| (rng.next_u64() % n as u64) as usize;
    let (relation, dx, dy) = RELATIONS[pick(RELATIONS.len())];
    let centre = side as f32 / 2.0;
    let offset = side as f32 * 0.25;
    let first_colour = pick(COLOURS.len());
    // The second shape differs in colour, so the caption pins both down.
    let second_colour = (first_colour + 1 + pick(COLOURS.len() - 1)) % COLOURS.len();
    let first = Shape {
        colour: first_colour,
        kind: pick(SHAPES.len()),
        large: pick(2) == 1,
        x: centre + dx * offset,
        y: centre + dy * offset,
    };
    let second = Shape {
        colour: second_colour,
        kind: pick(SHAPES.len()),
        large: pick(2) == 1,
        x: centre - dx * offset,
        y: centre - dy * offset,
    };
    CaptionedImage {
        key: format!("align-{index:08}"),
        png: draw(&[first, second], side),
        text: format!("a {} {relation} a {}", first.describe(), second.describe()),
        shapes: [first, second],
    }
}

pub fn labelled(seed: u64, index: u64, side: u32) -> LabelledImage {
    let mut rng = SplitMix64::new(seed ^ index.wrapping_mul(0xe703_7ed1_a0b4_28db) ^ 0x1f7);
    let mut pick = |n: usize| (rng.next_u64() % n as u64) as usize;
    let centre = side as f32 / 2.0;
    let jitter = side as f32 * 0.15;
    let shape = Shape {
        colour: pick(COLOURS.len()),
        kind: pick(SHAPES.len()),
        large: pick(2) == 1,
        x: centre + (pick(101) as f32 / 50.0 - 1.0) * jitter,
        y: centre + (pick(101) as f32 / 50.0 - 1.0) * jitter,
    };
    LabelledImage {
        key: format!("jft-{index:08}"),
        png: draw(&[shape], side),
        labels: vec![(shape.colour * SHAPES.len() + shape.kind) as i32],
        shape,
    }
}

fn draw(shapes: &[Shape], side: u32) -> Vec<u8> {
    let image = RgbImage::from_fn(side, side, |x, y| {
        let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
        shapes
            .iter()
            .rev()
            .find(|shape| shape.contains(px, py, side))
            .map_or(Rgb(BACKGROUND), |shape| Rgb(COLOURS[shape.colour].1))
    });
    let mut png = Cursor::new(Vec::new());
    image
        .write_to(&mut png, ImageFormat::Png)
        .expect("PNG encoding to memory cannot fail");
    png.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::decode;

    #[test]
    fn samples_are_a_pure_function_of_seed_and_index() {
        assert_eq!(captioned(1, 5, 64), captioned(1, 5, 64));
        assert_ne!(captioned(1, 5, 64).png, captioned(1, 6, 64).png);
        assert_ne!(captioned(1, 5, 64), captioned(2, 5, 64));
        assert_eq!(labelled(1, 5, 64), labelled(1, 5, 64));
        assert_eq!(captioned(1, 5, 64).key, "align-00000005");
    }

    #[test]
    fn captions_describe_what_is_drawn() {
        for index in 0..50 {
            let sample = captioned(7, index, 64);
            let image = decode(&sample.png).unwrap();
            assert_eq!(image.dimensions(), (64, 64));
            for shape in sample.shapes {
                // The shape's colour is at its centre, and the caption names it.
                let pixel = image.get_pixel(shape.x as u32, shape.y as u32);
                assert_eq!(pixel.0, COLOURS[shape.colour].1, "sample {index}: {}", sample.text);
                assert!(sample.text.contains(&shape.describe()), "{}", sample.text);
            }
            let [first, second] = sample.shapes;
            let relation_holds = if sample.text.contains(" above ") {
                first.y < second.y
            } else if sample.text.contains(" below ") {
                first.y > second.y
            } else if sample.text.contains(" left of ") {
                first.x < second.x
            } else {
                sample.text.contains(" right of ") && first.x > second.x
            };
            assert!(relation_holds, "{}", sample.text);
        }
    }

    #[test]
    fn labels_name_the_drawn_class() {
        let names = classes();
        assert_eq!(names.len(), 18);
        assert_eq!(names[0], ("red circle".to_string(), "circle".to_string()));
        let mut seen = std::collections::HashSet::new();
        for index in 0..200 {
            let sample = labelled(3, index, 48);
            let image = decode(&sample.png).unwrap();
            let (name, parent) = &names[sample.labels[0] as usize];
            let pixel = image.get_pixel(sample.shape.x as u32, sample.shape.y as u32);
            assert_eq!(pixel.0, COLOURS[sample.shape.colour].1);
            assert!(name.starts_with(COLOURS[sample.shape.colour].0) && name.ends_with(parent.as_str()));
            seen.insert(sample.labels[0]);
        }
        assert_eq!(seen.len(), 18, "every class occurs");
    }
}

/// What `coca data demo` writes under its root.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoSpec {
    pub seed: u64,
    pub align_rows: u64,
    pub jft_rows: u64,
    /// Held-out labelled images, drawn from indices the training set never uses.
    pub heldout_rows: u64,
    pub side: u32,
    pub shard_rows: usize,
    pub vocab_size: usize,
}

impl Default for DemoSpec {
    fn default() -> Self {
        Self {
            seed: 0,
            align_rows: 2048,
            jft_rows: 2048,
            heldout_rows: 360,
            side: 64,
            shard_rows: 512,
            vocab_size: 512,
        }
    }
}

/// Dataset prefixes under the demo root.
pub const ALIGN: &str = "align";
pub const JFT: &str = "jft";
pub const HELDOUT: &str = "jft-heldout";
pub const TOKENIZER: &str = "tokenizer.json";
const HELDOUT_FIRST_INDEX: u64 = 1 << 40;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Writer(#[from] super::writer::WriterError),
    #[error(transparent)]
    Dataset(#[from] super::dataset::DatasetError),
    #[error(transparent)]
    Tokenizer(#[from] super::tokenizer::TokenizerError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// Writes the demo datasets (align, jft, jft-heldout) and a tokenizer
/// trained on them under `root`. Samples are drawn in parallel; the bytes
/// written depend only on `spec`.
pub fn write(root: &store::Store, spec: &DemoSpec) -> Result<(), DemoError> {
    use rayon::prelude::*;

    use super::shard::{Compression, Content, Record};
    use super::writer::DatasetWriter;
    use contract::dataset::{ClassName, DatasetKind};

    let class_names: Vec<ClassName> = classes()
        .into_iter()
        .map(|(name, parent)| ClassName {
            name,
            parent: Some(parent),
        })
        .collect();
    let source = format!("coca data demo (seed {})", spec.seed);
    let datasets = [
        (ALIGN, DatasetKind::Align, 0, spec.align_rows),
        (JFT, DatasetKind::Jft, 0, spec.jft_rows),
        (HELDOUT, DatasetKind::Jft, HELDOUT_FIRST_INDEX, spec.heldout_rows),
    ];
    for (name, kind, first, rows) in datasets {
        let classes = if kind == DatasetKind::Jft {
            class_names.clone()
        } else {
            Vec::new()
        };
        let mut writer = DatasetWriter::create(
            root.at(name),
            kind,
            classes,
            spec.shard_rows,
            Compression::None,
            &source,
        )?;
        let indices: Vec<u64> = (first..first + rows).collect();
        for chunk in indices.chunks(spec.shard_rows) {
            let records: Vec<Record> = chunk
                .par_iter()
                .map(|&index| match kind {
                    DatasetKind::Align => {
                        let sample = captioned(spec.seed, index, spec.side);
                        Record {
                            key: sample.key,
                            image: sample.png,
                            content: Content::Text(sample.text),
                        }
                    }
                    DatasetKind::Jft => {
                        let sample = labelled(spec.seed, index, spec.side);
                        Record {
                            key: sample.key,
                            image: sample.png,
                            content: Content::Labels(sample.labels),
                        }
                    }
                })
                .collect();
            for record in records {
                writer.push(record)?;
            }
        }
        writer.finish()?;
    }
    let templates = super::prompt::PromptTemplates::clip80();
    let mut texts = Vec::new();
    for name in [ALIGN, JFT] {
        let dataset = super::dataset::Dataset::open(root.at(name))?;
        texts.extend(super::corpus::texts(&dataset, &templates)?);
    }
    let tokenizer = super::tokenizer::TextTokenizer::train(texts.iter(), spec.vocab_size)?;
    root.put(TOKENIZER, bytes::Bytes::from(tokenizer.to_json()))?;
    Ok(())
}
