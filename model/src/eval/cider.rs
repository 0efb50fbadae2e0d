//! CIDEr-D (Vedantam et al. 2015): for n = 1..4, tf-idf vectors of a
//! candidate's and each reference's n-grams (idf from the share of images
//! whose references hold the n-gram), their cosine with the candidate's
//! counts clipped to the reference's, a Gaussian penalty on the length
//! difference (sigma 6), averaged over n and references, times 10.
//!
//! Lengths are word counts, as the paper defines them (the coco-caption
//! script counts bigrams instead, a quirk not followed here).

use std::collections::{HashMap, HashSet};

use super::words::{ngrams, words};

const SIGMA: f64 = 6.0;

struct Vectors<'a> {
    grams: [HashMap<&'a [String], f64>; 4],
    norms: [f64; 4],
    length: usize,
}

/// A sentence's tf-idf vectors, n = 1..4.
fn weigh<'a>(sentence: &'a [String], document_frequency: &HashMap<&[String], f64>, log_images: f64) -> Vectors<'a> {
    let mut grams: [HashMap<&'a [String], f64>; 4] = Default::default();
    let mut norms = [0.0; 4];
    for n in 1..=4 {
        for (gram, count) in ngrams(sentence, n) {
            let df = document_frequency.get(gram).copied().unwrap_or(0.0).max(1.0);
            let weight = count as f64 * (log_images - df.ln());
            norms[n - 1] += weight * weight;
            grams[n - 1].insert(gram, weight);
        }
    }
    Vectors {
        grams,
        norms: norms.map(f64::sqrt),
        length: sentence.len(),
    }
}

/// Per-candidate CIDEr-D scores and their mean. `references[i]` are the
/// references of the image `candidates[i]` describes.
pub fn cider_d(candidates: &[String], references: &[Vec<String>]) -> (f64, Vec<f64>) {
    assert_eq!(candidates.len(), references.len(), "one reference set per candidate");
    let candidate_words: Vec<Vec<String>> = candidates.iter().map(|text| words(text)).collect();
    let reference_words: Vec<Vec<Vec<String>>> = references
        .iter()
        .map(|refs| refs.iter().map(|text| words(text)).collect())
        .collect();
    // Document frequency: images whose references hold the n-gram.
    let mut document_frequency: HashMap<&[String], f64> = HashMap::new();
    for refs in &reference_words {
        let mut seen: HashSet<&[String]> = HashSet::new();
        for reference in refs {
            for n in 1..=4 {
                seen.extend(ngrams(reference, n).into_keys());
            }
        }
        for gram in seen {
            *document_frequency.entry(gram).or_default() += 1.0;
        }
    }
    let log_images = (candidates.len() as f64).ln();
    let vectors = |sentence| weigh(sentence, &document_frequency, log_images);
    let scores: Vec<f64> = candidate_words
        .iter()
        .zip(&reference_words)
        .map(|(candidate, refs)| {
            if refs.is_empty() {
                return 0.0;
            }
            let hypothesis = vectors(candidate);
            let mut total = 0.0;
            for reference in refs {
                let reference = vectors(reference);
                let delta = hypothesis.length as f64 - reference.length as f64;
                let penalty = (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
                for n in 0..4 {
                    let mut dot: f64 = hypothesis.grams[n]
                        .iter()
                        .map(|(gram, &weight)| {
                            let other = reference.grams[n].get(gram).copied().unwrap_or(0.0);
                            weight.min(other) * other
                        })
                        .sum();
                    if hypothesis.norms[n] != 0.0 && reference.norms[n] != 0.0 {
                        dot /= hypothesis.norms[n] * reference.norms[n];
                    }
                    total += dot * penalty / 4.0;
                }
            }
            10.0 * total / refs.len() as f64
        })
        .collect();
    let mean = if scores.is_empty() {
        0.0
    } else {
        scores.iter().sum::<f64>() / scores.len() as f64
    };
    (mean, scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_perfect_caption_with_distinct_references_scores_ten() {
        // Every n-gram is in one image's references: weight ln 2 for all, cosine 1 for n = 1..4.
        let (mean, scores) = cider_d(
            &strings(&["a red circle above a square", "two green triangles left of it"]),
            &[
                strings(&["a red circle above a square"]),
                strings(&["two green triangles left of it"]),
            ],
        );
        assert!(
            (scores[0] - 10.0).abs() < 1e-9 && (mean - 10.0).abs() < 1e-9,
            "{scores:?}"
        );
    }

    #[test]
    fn shared_ngrams_weigh_nothing_and_missing_orders_score_zero() {
        // "x" is in both images' references (idf 0); "x y" has unigram and bigram cosines of 1,
        // and no 3- or 4-grams: (1 + 1 + 0 + 0) / 4 * 10 = 5.
        let (_, scores) = cider_d(&strings(&["x y", "x z"]), &[strings(&["x y"]), strings(&["x z"])]);
        assert!((scores[0] - 5.0).abs() < 1e-9, "{scores:?}");
    }

    #[test]
    fn clipping_and_the_length_penalty_by_hand() {
        // Candidate "p q" against "p q r" (the other image: "s t"); every n-gram has weight L = ln 2.
        // n = 1: 2L^2 / (sqrt2 L * sqrt3 L) = 2/sqrt6; n = 2: 1/sqrt2; n = 3, 4: 0.
        // Length difference 1: penalty exp(-1/72).
        let (_, scores) = cider_d(&strings(&["p q", "s t"]), &[strings(&["p q r"]), strings(&["s t"])]);
        let expected = 10.0 * (2.0 / 6f64.sqrt() + 1.0 / 2f64.sqrt()) * (-1.0f64 / 72.0).exp() / 4.0;
        assert!((scores[0] - expected).abs() < 1e-9, "{} vs {expected}", scores[0]);
        // Repeating a word does not buy more than the reference has (clipping), and costs length.
        let (_, repeated) = cider_d(&strings(&["p p p q", "s t"]), &[strings(&["p q r"]), strings(&["s t"])]);
        assert!(repeated[0] < scores[0]);
    }
}
