//! The evaluation transform against PIL itself (what open_clip's
//! `Resize(BICUBIC)` + `CenterCrop` run): images shrunk, enlarged and
//! nearly kept, each prepared here and by Pillow in a Python process
//! (installed by scripts/test-deps.sh), pixel for pixel.

use std::process::Command;

use datasets::image::{prepare, Crop, RgbImage, CLIP_MEAN, CLIP_STD};

/// A gradient with seeded noise, so that every tap of the filter matters.
fn picture(width: u32, height: u32, seed: u64) -> RgbImage {
    let mut state = seed;
    RgbImage::from_fn(width, height, |x, y| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = (state >> 57) as u8;
        image::Rgb([
            ((x * 255) / width) as u8 ^ noise,
            ((y * 255) / height) as u8,
            ((x * 7 + y * 3) % 256) as u8,
        ])
    })
}

/// Pillow's resize of the shorter side to `size` (the longer one to
/// int(size * longer / shorter)) and centre crop, as raw RGB bytes.
const PIL: &str = r#"
import sys
from PIL import Image
path, size = sys.argv[1], int(sys.argv[2])
image = Image.open(path).convert("RGB")
w, h = image.size
new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
resized = image.resize(new, Image.BICUBIC)
left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
sys.stdout.buffer.write(resized.crop((left, top, left + size, top + size)).tobytes())
"#;

#[test]
fn centre_crops_are_pils_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64;
    for (i, (width, height)) in [(173, 131), (40, 90), (300, 301), (20, 20), (64, 200)]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("picture-{i}.png"));
        let image = picture(width, height, 7 + i as u64);
        image.save(&path).unwrap();
        let output = Command::new("python3")
            .args(["-c", PIL, path.to_str().unwrap(), &size.to_string()])
            .output()
            .expect("python3 (scripts/test-deps.sh installs Pillow)");
        assert!(
            output.status.success(),
            "Pillow (scripts/test-deps.sh installs it): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let theirs = output.stdout;
        let ours = prepare(&image, size, Crop::Centre, 0);
        let plane = (size * size) as usize;
        assert_eq!(theirs.len(), 3 * plane);
        let mut worst = 0.0f32;
        for (pixel, rgb) in theirs.chunks_exact(3).enumerate() {
            for channel in 0..3 {
                let level = (ours[channel * plane + pixel] * CLIP_STD[channel] + CLIP_MEAN[channel]) * 255.0;
                worst = worst.max((level - f32::from(rgb[channel])).abs());
            }
        }
        assert!(worst < 1e-3, "{width}x{height}: {worst} levels from PIL's");
    }
}
