//! Patch dropout (FLIP, Li et al. 2023): in training, the image encoder sees
//! a random subset of each image's patches. Which ones is drawn per sample
//! from its own key (like its random crop), so a run is the same on any
//! world size and across resume; evaluation sees every patch.

use contract::rng::SplitMix64;

/// How many of an image's patches training keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchDropout {
    /// Patches of an image (the model's positions, a class token aside).
    pub patches: usize,
    /// Patches kept: at least one.
    pub kept: usize,
}

impl PatchDropout {
    /// Dropping `rate` (in [0, 1)) of `patches`; `None` when nothing is dropped.
    pub fn new(patches: usize, rate: f64) -> Option<Self> {
        let kept = ((patches as f64 * (1.0 - rate)).round() as usize).clamp(1, patches);
        (kept < patches).then_some(Self { patches, kept })
    }

    /// The patches one sample keeps, ascending: a seeded partial
    /// Fisher-Yates shuffle of the positions.
    pub fn kept_patches(&self, seed: u64) -> Vec<u32> {
        let mut positions: Vec<u32> = (0..self.patches as u32).collect();
        let mut rng = SplitMix64::new(seed);
        for i in 0..self.kept {
            let j = i + (rng.next_u64() % (self.patches - i) as u64) as usize;
            positions.swap(i, j);
        }
        let mut kept = positions[..self.kept].to_vec();
        kept.sort_unstable();
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_keeps_distinct_patches_drawn_from_its_seed() {
        let dropout = PatchDropout::new(16, 0.5).unwrap();
        assert_eq!(dropout.kept, 8);
        let kept = dropout.kept_patches(7);
        assert_eq!(kept.len(), 8);
        assert!(kept.windows(2).all(|w| w[0] < w[1]) && kept.iter().all(|&p| p < 16));
        assert_eq!(kept, dropout.kept_patches(7), "the same seed, the same patches");
        assert_ne!(kept, dropout.kept_patches(8));
        assert_eq!(PatchDropout::new(16, 0.0), None);
        assert_eq!(PatchDropout::new(4, 0.99).unwrap().kept, 1);
    }
}
