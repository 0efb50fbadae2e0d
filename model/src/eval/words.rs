//! Caption text as the caption metrics see it: lowercased words without
//! punctuation, and their n-grams.

use std::collections::HashMap;

/// Lowercased words; anything but letters, digits and apostrophes separates them.
pub fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|word| !word.is_empty())
        .map(str::to_string)
        .collect()
}

/// Counts of the n-grams of `words` of length `n`.
pub fn ngrams(words: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    if words.len() >= n {
        for window in words.windows(n) {
            *counts.entry(window).or_default() += 1;
        }
    }
    counts
}
