//! Ranking metrics: retrieval recall@k and classification top-k accuracy.
//!
//! Ties count against the query: the rank of the right answer is one plus
//! the number of other candidates scoring at least as high, so a model that
//! scores everything alike is never flattered.

/// 1-based rank of candidate `right` among `scores`.
pub fn rank(scores: &[f32], right: usize) -> usize {
    let target = scores[right];
    1 + scores
        .iter()
        .enumerate()
        .filter(|&(i, &score)| i != right && score >= target)
        .count()
}

/// Recall@k: the share of queries with at least one right candidate ranked
/// within k. `scores[q]` are query q's scores over all candidates;
/// `right[q]` its right candidates (e.g. the 5 captions of an image).
pub fn recall_at_k(scores: &[Vec<f32>], right: &[Vec<usize>], k: usize) -> f64 {
    assert_eq!(scores.len(), right.len(), "one set of right answers per query");
    if scores.is_empty() {
        return 0.0;
    }
    let hits = scores
        .iter()
        .zip(right)
        .filter(|(row, answers)| {
            answers
                .iter()
                .map(|&answer| rank(row, answer))
                .min()
                .is_some_and(|best| best <= k)
        })
        .count();
    hits as f64 / scores.len() as f64
}

/// Top-k accuracy: the share of samples whose label ranks within k of the class scores.
pub fn top_k_accuracy(logits: &[Vec<f32>], labels: &[usize], k: usize) -> f64 {
    let right: Vec<Vec<usize>> = labels.iter().map(|&label| vec![label]).collect();
    recall_at_k(logits, &right, k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_count_ties_against_the_query() {
        assert_eq!(rank(&[0.1, 0.9, 0.5], 1), 1);
        assert_eq!(rank(&[0.1, 0.9, 0.5], 0), 3);
        assert_eq!(rank(&[0.5, 0.5, 0.5], 0), 3);
        assert_eq!(rank(&[0.2, 0.5, 0.5, 0.1], 2), 2);
    }

    #[test]
    fn recall_at_k_by_hand() {
        // Query 0: right answer 2 ranks 1st; query 1: right answers {0, 3}, best rank 2;
        // query 2: answer 1 ties with two others, rank 3.
        let scores = vec![
            vec![0.1, 0.2, 0.9, 0.3],
            vec![0.5, 0.1, 0.8, 0.4],
            vec![0.7, 0.7, 0.7, 0.1],
        ];
        let right = vec![vec![2], vec![0, 3], vec![1]];
        assert_eq!(recall_at_k(&scores, &right, 1), 1.0 / 3.0);
        assert_eq!(recall_at_k(&scores, &right, 2), 2.0 / 3.0);
        assert_eq!(recall_at_k(&scores, &right, 3), 1.0);
    }

    #[test]
    fn top_k_accuracy_by_hand() {
        let logits = vec![vec![2.0, 1.0, 0.0], vec![0.0, 1.0, 2.0], vec![1.0, 1.0, 0.0]];
        let labels = [0, 1, 1];
        assert_eq!(top_k_accuracy(&logits, &labels, 1), 1.0 / 3.0);
        assert_eq!(top_k_accuracy(&logits, &labels, 2), 1.0);
    }
}
