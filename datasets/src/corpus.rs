//! The texts a tokenizer learns from: every alt-text of align datasets,
//! and every class name of jft datasets put into every prompt template
//! (so the templates' own words are in the vocabulary too).

use contract::dataset::DatasetKind;

use super::dataset::{Dataset, DatasetError};
use super::prompt::PromptTemplates;

pub fn texts(dataset: &Dataset, templates: &PromptTemplates) -> Result<Vec<String>, DatasetError> {
    let index = dataset.index();
    match index.kind {
        DatasetKind::Align => {
            let mut texts = Vec::with_capacity(index.rows() as usize);
            for shard in 0..index.shards.len() {
                let decoded = dataset.shard(shard)?;
                texts.extend((0..decoded.rows()).filter_map(|row| decoded.record(row).text.map(str::to_string)));
            }
            Ok(texts)
        }
        DatasetKind::Jft => Ok((0..index.classes.len())
            .flat_map(|label| {
                let names = index.class_names(label).expect("label within the classes").join(", ");
                templates
                    .templates()
                    .iter()
                    .map(move |template| template.replacen("{}", &names, 1))
            })
            .collect()),
    }
}
