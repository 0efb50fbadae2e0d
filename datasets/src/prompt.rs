//! JFT-style text: a labelled image's class names, shuffled and joined
//! ("cat, animal"), put into a prompt template ("a photo of the {}.").
//! Both the shuffle and the template are seeded per sample and epoch, so a
//! resumed job writes the same text for the same draw.

use contract::rng::SplitMix64;

const CLIP_TEMPLATES: &str = include_str!("clip_templates.txt");

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("{origin}: no templates")]
    Empty { origin: String },
    #[error("{origin}, line {line}: template `{template}` must contain `{{}}` exactly once")]
    Placeholder {
        origin: String,
        line: usize,
        template: String,
    },
    #[error("cannot read the templates file")]
    Store(#[from] store::StoreError),
}

/// Prompt templates, each holding one `{}` for the class names.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTemplates(Vec<String>);

impl PromptTemplates {
    /// The 80 templates of CLIP's ImageNet zero-shot evaluation.
    pub fn clip80() -> Self {
        Self::parse(CLIP_TEMPLATES, "clip_templates.txt").expect("the bundled templates are valid")
    }

    /// The single template "a photo of a {}.".
    pub fn simple() -> Self {
        Self(vec!["a photo of a {}.".to_string()])
    }

    /// One template per line; blank lines and lines starting with `#` are
    /// skipped. `origin` names the text in errors (a file or manifest field).
    pub fn parse(text: &str, origin: &str) -> Result<Self, PromptError> {
        let mut templates = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let template = line.trim();
            if template.is_empty() || template.starts_with('#') {
                continue;
            }
            if template.matches("{}").count() != 1 {
                return Err(PromptError::Placeholder {
                    origin: origin.to_string(),
                    line: index + 1,
                    template: template.to_string(),
                });
            }
            templates.push(template.to_string());
        }
        if templates.is_empty() {
            return Err(PromptError::Empty {
                origin: origin.to_string(),
            });
        }
        Ok(Self(templates))
    }

    /// The templates a manifest or command line names: `clip80`, `simple`,
    /// or the URL of a file of them.
    pub fn open(spec: &str, options: &store::StoreOptions) -> Result<Self, PromptError> {
        Ok(match spec {
            "clip80" => Self::clip80(),
            "simple" => Self::simple(),
            url => {
                let (store, name) = store::Store::open_object(url, options)?;
                let bytes = store.get(&name)?;
                Self::parse(&String::from_utf8_lossy(&bytes), url)?
            }
        })
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn templates(&self) -> &[String] {
        &self.0
    }

    /// The text of one draw of a labelled sample: `names` in a seeded
    /// order, joined by ", ", in a seeded template. `draw` identifies the
    /// draw (e.g. a hash of source, epoch and row).
    pub fn caption(&self, names: &[&str], seed: u64, draw: u64) -> String {
        let mut rng = SplitMix64::new(seed ^ draw.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut names = names.to_vec();
        // Fisher-Yates.
        for i in (1..names.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            names.swap(i, j);
        }
        let template = &self.0[(rng.next_u64() % self.0.len() as u64) as usize];
        template.replacen("{}", &names.join(", "), 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn the_bundled_templates_are_clips_80() {
        let templates = PromptTemplates::clip80();
        assert_eq!(templates.len(), 80);
        let distinct: HashSet<&String> = templates.templates().iter().collect();
        assert_eq!(distinct.len(), 80);
        assert!(templates.templates().contains(&"a photo of a {}.".to_string()));
    }

    #[test]
    fn captions_are_seeded_per_draw() {
        let templates = PromptTemplates::clip80();
        let names = ["cat", "animal", "pet"];
        let caption = templates.caption(&names, 7, 1);
        assert_eq!(caption, templates.caption(&names, 7, 1));
        // Every name appears once, joined by ", ", inside a template.
        let joined = templates
            .templates()
            .iter()
            .find_map(|template| {
                let (before, after) = template.split_once("{}").unwrap();
                caption.strip_prefix(before)?.strip_suffix(after).map(str::to_string)
            })
            .expect("the caption is a template filled in");
        let mut parts: Vec<&str> = joined.split(", ").collect();
        parts.sort();
        assert_eq!(parts, ["animal", "cat", "pet"]);
        // Other draws and seeds vary the order and the template.
        let captions: HashSet<String> = (0..200).map(|draw| templates.caption(&names, 7, draw)).collect();
        assert!(captions.len() > 100, "{}", captions.len());
        let orders: HashSet<String> = (0..200)
            .map(|draw| PromptTemplates::simple().caption(&names, 7, draw))
            .collect();
        assert_eq!(orders.len(), 6, "all orders of three names appear");
        assert_ne!(templates.caption(&names, 8, 1), caption);
    }

    #[test]
    fn bad_templates_name_the_origin_and_line() {
        let error = PromptTemplates::parse("a photo of a {}.\n# note\na photo.\n", "source 1 templates").unwrap_err();
        assert_eq!(
            error.to_string(),
            "source 1 templates, line 3: template `a photo.` must contain `{}` exactly once"
        );
        let error = PromptTemplates::parse("{} and {}\n", "f.txt").unwrap_err();
        assert!(error.to_string().starts_with("f.txt, line 1:"));
        assert_eq!(
            PromptTemplates::parse("# only comments\n\n", "f.txt")
                .unwrap_err()
                .to_string(),
            "f.txt: no templates"
        );
    }
}
