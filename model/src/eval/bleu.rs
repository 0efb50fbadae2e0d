//! Corpus BLEU (Papineni et al. 2002): clipped n-gram precisions summed
//! over the corpus, their geometric mean (n = 1..4, uniform weights), and
//! the brevity penalty from the corpus's candidate length c and effective
//! reference length r (the reference closest in length to each candidate,
//! the shorter on a tie).

use std::collections::HashMap;

use super::words::{ngrams, words};

#[derive(Debug, Clone, PartialEq)]
pub struct Bleu {
    pub score: f64,
    /// Modified (clipped) precision for n = 1..4.
    pub precisions: [f64; 4],
    pub brevity_penalty: f64,
    pub candidate_length: usize,
    pub reference_length: usize,
}

/// BLEU-4 of `candidates[i]` against `references[i]` (one or more each).
pub fn corpus_bleu(candidates: &[String], references: &[Vec<String>]) -> Bleu {
    assert_eq!(candidates.len(), references.len(), "one reference set per candidate");
    let mut matched = [0usize; 4];
    let mut total = [0usize; 4];
    let (mut c, mut r) = (0, 0);
    for (candidate, refs) in candidates.iter().zip(references) {
        let hypothesis = words(candidate);
        let refs: Vec<Vec<String>> = refs.iter().map(|text| words(text)).collect();
        c += hypothesis.len();
        r += refs
            .iter()
            .map(Vec::len)
            .min_by_key(|&len| (len.abs_diff(hypothesis.len()), len))
            .unwrap_or(0);
        for n in 1..=4 {
            let mut most: HashMap<&[String], usize> = HashMap::new();
            for reference in &refs {
                for (gram, count) in ngrams(reference, n) {
                    let entry = most.entry(gram).or_default();
                    *entry = (*entry).max(count);
                }
            }
            for (gram, count) in ngrams(&hypothesis, n) {
                matched[n - 1] += count.min(most.get(gram).copied().unwrap_or(0));
                total[n - 1] += count;
            }
        }
    }
    let precisions: [f64; 4] = std::array::from_fn(|i| {
        if total[i] == 0 {
            0.0
        } else {
            matched[i] as f64 / total[i] as f64
        }
    });
    let brevity_penalty = if c == 0 {
        0.0
    } else if c > r {
        1.0
    } else {
        (1.0 - r as f64 / c as f64).exp()
    };
    let score = if precisions.iter().any(|&p| p == 0.0) {
        0.0
    } else {
        brevity_penalty * (precisions.iter().map(|p| p.ln()).sum::<f64>() / 4.0).exp()
    };
    Bleu {
        score,
        precisions,
        brevity_penalty,
        candidate_length: c,
        reference_length: r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bleu(candidate: &str, references: &[&str]) -> Bleu {
        corpus_bleu(
            &[candidate.to_string()],
            &[references.iter().map(|r| r.to_string()).collect()],
        )
    }

    #[test]
    fn papineni_modified_precision_example() {
        // The paper's example: 7 "the", clipped to the 2 of the first reference.
        let result = bleu(
            "the the the the the the the",
            &["The cat is on the mat.", "There is a cat on the mat."],
        );
        assert_eq!(result.precisions[0], 2.0 / 7.0);
        assert_eq!(result.score, 0.0, "no bigram matches");
    }

    #[test]
    fn bleu_by_hand() {
        // p1 4/5, p2 3/4, p3 2/3, p4 1/2, c = r = 5: BLEU = (1/5)^(1/4).
        let result = bleu("a b c d e", &["a b c d f"]);
        assert_eq!(result.precisions, [0.8, 0.75, 2.0 / 3.0, 0.5]);
        assert_eq!(result.brevity_penalty, 1.0);
        assert!((result.score - 0.2f64.powf(0.25)).abs() < 1e-12);
        // Identical: 1.
        assert!((bleu("one two three four", &["One two three four."]).score - 1.0).abs() < 1e-12);
    }

    #[test]
    fn brevity_penalty_uses_the_closest_reference_and_the_corpus_totals() {
        // c = 4; references of 6 and 9 words: r = 6; BP = exp(1 - 6/4).
        let result = bleu("a b c d", &["a b c d e f", "a b c d e f g h i"]);
        assert_eq!((result.candidate_length, result.reference_length), (4, 6));
        assert!((result.brevity_penalty - (-0.5f64).exp()).abs() < 1e-12);
        assert!((result.score - (-0.5f64).exp()).abs() < 1e-12, "all precisions are 1");
        // Corpus level: counts are summed before dividing.
        let corpus = corpus_bleu(
            &["a b c d".into(), "w x y z".into()],
            &[vec!["a b c d".into()], vec!["w x y q".into()]],
        );
        assert_eq!(corpus.precisions[0], 7.0 / 8.0);
        assert_eq!(corpus.precisions[3], 1.0 / 2.0);
    }
}
