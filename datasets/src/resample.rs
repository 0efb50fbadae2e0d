//! Bicubic resampling as PIL does it (`Image.resize(..., BICUBIC)`, what
//! torchvision's `Resize` runs on PIL images and so what open_clip's
//! evaluation transform sees): a separable convolution with the a = -0.5
//! cubic, widened by the scale when shrinking (antialiasing), coefficients
//! normalised and rounded to 22-bit fixed point, the horizontal pass first
//! and each pass rounded to 8 bits. Following it step for step gives PIL's
//! bytes, where a generic bicubic differs by a level here and there.

/// PIL's `PRECISION_BITS` for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One output pixel's window of input pixels along an axis, and its weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// The taps of each of `out` pixels reading `in_size` pixels
/// (PIL's `precompute_coeffs` and `normalize_coeffs_8bpc`).
fn taps(in_size: usize, out: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out)
        .map(|x| {
            let centre = (x as f64 + 0.5) * scale;
            // PIL truncates toward zero after adding 0.5.
            let first = ((centre - support + 0.5) as i64).max(0) as usize;
            let last = ((centre + support + 0.5) as i64).min(in_size as i64) as usize;
            let reciprocal = 1.0 / filter_scale;
            let raw: Vec<f64> = (first..last)
                .map(|i| bicubic((i as f64 - centre + 0.5) * reciprocal))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let fixed = w * f64::from(1u32 << PRECISION_BITS);
                    (if fixed < 0.0 { fixed - 0.5 } else { fixed + 0.5 }) as i32
                })
                .collect();
            Taps { first, weights }
        })
        .collect()
}

fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `rgb` (`width` x `height`, 3 bytes a pixel) resized to `out_width` x
/// `out_height` with PIL's bicubic; 3 bytes a pixel.
pub fn resize_bicubic(rgb: &[u8], width: usize, height: usize, out_width: usize, out_height: usize) -> Vec<u8> {
    assert_eq!(rgb.len(), 3 * width * height, "3 bytes a pixel");
    let rounding = 1i64 << (PRECISION_BITS - 1);
    let horizontal = taps(width, out_width);
    let vertical = taps(height, out_height);
    // Only the rows the vertical pass reads.
    let first_row = vertical.iter().map(|t| t.first).min().unwrap_or(0);
    let last_row = vertical.iter().map(|t| t.first + t.weights.len()).max().unwrap_or(0);
    let mut rows = vec![0u8; 3 * out_width * (last_row - first_row)];
    for y in first_row..last_row {
        let line = &rgb[3 * width * y..3 * width * (y + 1)];
        let out = &mut rows[3 * out_width * (y - first_row)..3 * out_width * (y - first_row + 1)];
        for (x, tap) in horizontal.iter().enumerate() {
            for channel in 0..3 {
                let mut sum = rounding;
                for (k, &weight) in tap.weights.iter().enumerate() {
                    sum += i64::from(line[3 * (tap.first + k) + channel]) * i64::from(weight);
                }
                out[3 * x + channel] = clip8(sum);
            }
        }
    }
    let mut resized = vec![0u8; 3 * out_width * out_height];
    let row_len = 3 * out_width;
    for (y, tap) in vertical.iter().enumerate() {
        for i in 0..row_len {
            let mut sum = rounding;
            for (k, &weight) in tap.weights.iter().enumerate() {
                sum += i64::from(rows[row_len * (tap.first - first_row + k) + i]) * i64::from(weight);
            }
            resized[row_len * y + i] = clip8(sum);
        }
    }
    resized
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weights_of_each_tap_sum_to_one_in_fixed_point() {
        for (input, output) in [(173, 64), (64, 173), (10, 10), (300, 224)] {
            for tap in taps(input, output) {
                let sum: i32 = tap.weights.iter().sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= tap.weights.len() as i32, "{sum}");
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_and_the_same_size_is_the_identity() {
        let flat = vec![77u8; 3 * 31 * 17];
        assert!(resize_bicubic(&flat, 31, 17, 12, 40).iter().all(|&v| v == 77));
        let noise: Vec<u8> = (0..3 * 9 * 7).map(|i| (i * 37 % 251) as u8).collect();
        assert_eq!(resize_bicubic(&noise, 9, 7, 9, 7), noise);
    }
}
