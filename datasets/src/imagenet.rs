//! ImageNet-1k's classes, built in: each WordNet id (the folder names of
//! the usual train/val layout) and OpenAI's class name for it, in
//! class-index order (the ids sorted).

const CLASSES: &str = include_str!("imagenet1k.tsv");

/// The 1000 classes, in class-index order: (WordNet id, class name).
pub fn classes() -> Vec<(&'static str, &'static str)> {
    CLASSES
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| line.split_once('\t').expect("the bundled list is `id<TAB>name`"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_list_holds_1000_sorted_ids_with_names() {
        let classes = super::classes();
        assert_eq!(classes.len(), 1000);
        assert!(classes.windows(2).all(|pair| pair[0].0 < pair[1].0));
        assert_eq!(classes[0], ("n01440764", "tench"));
        assert_eq!(classes[999], ("n15075141", "toilet paper"));
        assert!(classes
            .iter()
            .all(|(id, name)| id.len() == 9 && id.starts_with('n') && !name.is_empty()));
    }
}
