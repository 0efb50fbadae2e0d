//! coca's data, from stored samples to what the model reads: datasets as
//! Arrow shards with their index ([`dataset`], [`shard`], [`writer`]),
//! importers from common layouts ([`import`]), the demo datasets
//! ([`demo`], [`corpus`]), the tokenizer, prompt templates, image decoding
//! and augmentation, and the loader that turns a rank's share of the
//! global sample order into micro-batches ([`loader`], [`batch`]).

pub mod bad_record;
pub mod batch;
pub mod clip_tokenizer;
pub mod corpus;
pub mod dataset;
pub mod demo;
pub mod image;
pub mod imagenet;
pub mod import;
pub mod loader;
pub mod patch_dropout;
pub mod prompt;
pub mod resample;
pub mod shard;
pub mod tokenizer;
pub mod writer;
