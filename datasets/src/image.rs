//! Stored image bytes to model input: decode (JPEG, PNG, WebP), convert to
//! RGB, crop and resize (random resized crop for training; resize + centre
//! crop for evaluation, in PIL's own bicubic arithmetic), normalise with
//! CLIP's mean and std, lay out as channel-major f32.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
pub use image::RgbImage;

use contract::rng::SplitMix64;

use crate::resample::resize_bicubic;

/// CLIP's per-channel pixel mean and standard deviation (RGB, in 0..1).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImageError {
    #[error("undecodable image: {0}")]
    Decode(String),
    #[error("empty image ({width}x{height})")]
    Empty { width: u32, height: u32 },
    #[error("{width}x{height} pixels is more than the {max_pixels} an image may have (data.max_image_pixels)")]
    TooLarge { width: u32, height: u32, max_pixels: u64 },
}

/// How an image is cropped to the model's square input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Crop {
    /// Training: a random window covering `scale` of the area with an
    /// aspect ratio in `ratio`, resized to the input (open_clip's defaults:
    /// scale 0.9..1, ratio 3/4..4/3).
    Random { scale: (f32, f32), ratio: (f32, f32) },
    /// Evaluation: shorter side resized to the input, centre crop, as
    /// open_clip's eval transform (torchvision's `Resize` then `CenterCrop`)
    /// does, so a window's edge pixels see their neighbours outside it.
    Centre,
}

impl Crop {
    pub fn training() -> Self {
        Crop::Random {
            scale: (0.9, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }
}

/// Decodes any supported format to RGB, refusing more pixels than PIL does.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    decode_within(bytes, contract::manifest::MAX_IMAGE_PIXELS)
}

/// Decodes any supported format to RGB. An image whose header claims more
/// than `max_pixels` is refused before its pixels are allocated (a
/// decompression bomb: a few bytes of PNG can claim 100,000 x 100,000).
pub fn decode_within(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    let undecodable = |error: &dyn std::fmt::Display| ImageError::Decode(error.to_string());
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|error| undecodable(&error))
    };
    let (width, height) = reader()?.into_dimensions().map_err(|error| undecodable(&error))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            max_pixels,
        });
    }
    let mut reader = reader()?;
    // The header's size holds for the decoder too; its allocations stay
    // within the pixels allowed (and image's own default).
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = limits
        .max_alloc
        .map(|default| default.max(max_pixels.saturating_mul(4)));
    reader.limits(limits);
    let image = reader.decode().map_err(|error| undecodable(&error))?;
    let rgb = image.into_rgb8();
    if rgb.width() == 0 || rgb.height() == 0 {
        return Err(ImageError::Empty {
            width: rgb.width(),
            height: rgb.height(),
        });
    }
    Ok(rgb)
}

/// `size` x `size` normalised pixels, channel-major ([3, size, size]).
/// `seed` draws the random crop; the same seed gives the same pixels.
pub fn prepare(image: &RgbImage, size: u32, crop: Crop, seed: u64) -> Vec<f32> {
    let mut pixels = vec![0.0f32; 3 * (size * size) as usize];
    prepare_into(image, size, crop, seed, &mut pixels);
    pixels
}

/// [`prepare`], written into `pixels` (3 x size x size values): the loader
/// fills its batch in place. A random crop and its resize are one SIMD
/// convolution pass (`fast_image_resize`, Catmull-Rom, PIL's bicubic)
/// reading the window where it lies.
pub fn prepare_into(image: &RgbImage, size: u32, crop: Crop, seed: u64, pixels: &mut [f32]) {
    let (width, height) = image.dimensions();
    let source =
        ImageRef::new(width, height, image.as_raw(), PixelType::U8x3).expect("an RgbImage holds 3 bytes a pixel");
    let bicubic = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    let mut square = Image::new(size, size, PixelType::U8x3);
    match crop {
        Crop::Random { scale, ratio } => {
            let (x, y, w, h) = random_window(width, height, scale, ratio, seed);
            let options = bicubic.crop(f64::from(x), f64::from(y), f64::from(w), f64::from(h));
            Resizer::new()
                .resize(&source, &mut square, &options)
                .expect("source and destination are both U8x3");
        }
        Crop::Centre => {
            // torchvision: the longer side becomes int(size * longer / shorter),
            // the crop starts at round((side - size) / 2), ties to even.
            let scaled = |side: u32, other: u32| {
                if side <= other {
                    size
                } else {
                    (u64::from(size) * u64::from(side) / u64::from(other)) as u32
                }
            };
            let (resized_width, resized_height) = (scaled(width, height), scaled(height, width));
            // PIL's own arithmetic: evaluation sees open_clip's pixels.
            let resized = resize_bicubic(
                image.as_raw(),
                width as usize,
                height as usize,
                resized_width as usize,
                resized_height as usize,
            );
            let start = |side: u32| (f64::from(side - size) / 2.0).round_ties_even() as usize;
            let (left, top) = (start(resized_width), start(resized_height));
            let row = 3 * resized_width as usize;
            for (y, out) in square.buffer_mut().chunks_exact_mut(3 * size as usize).enumerate() {
                let from = (top + y) * row + 3 * left;
                out.copy_from_slice(&resized[from..from + out.len()]);
            }
        }
    }
    let plane = (size * size) as usize;
    assert_eq!(pixels.len(), 3 * plane, "room for 3 x {size} x {size} values");
    // (x / 255 - mean) / std as one multiply-add per value.
    let gain: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * CLIP_STD[c]));
    let bias: [f32; 3] = std::array::from_fn(|c| -CLIP_MEAN[c] / CLIP_STD[c]);
    let (red, rest) = pixels.split_at_mut(plane);
    let (green, blue) = rest.split_at_mut(plane);
    for (index, rgb) in square.buffer().chunks_exact(3).enumerate() {
        red[index] = f32::from(rgb[0]) * gain[0] + bias[0];
        green[index] = f32::from(rgb[1]) * gain[1] + bias[1];
        blue[index] = f32::from(rgb[2]) * gain[2] + bias[2];
    }
}

/// torchvision's RandomResizedCrop window: up to 10 draws of area share and
/// log-uniform aspect ratio that fit; otherwise the whole image's centre at
/// the nearest allowed ratio.
fn random_window(width: u32, height: u32, scale: (f32, f32), ratio: (f32, f32), seed: u64) -> (u32, u32, u32, u32) {
    let mut rng = SplitMix64::new(seed);
    let area = (width * height) as f64;
    let (log_low, log_high) = ((ratio.0 as f64).ln(), (ratio.1 as f64).ln());
    for _ in 0..10 {
        let target = area * (scale.0 as f64 + (scale.1 - scale.0) as f64 * rng.uniform());
        let aspect = (log_low + (log_high - log_low) * rng.uniform()).exp();
        let w = (target * aspect).sqrt().round() as u32;
        let h = (target / aspect).sqrt().round() as u32;
        if (1..=width).contains(&w) && (1..=height).contains(&h) {
            let x = (rng.next_u64() % u64::from(width - w + 1)) as u32;
            let y = (rng.next_u64() % u64::from(height - h + 1)) as u32;
            return (x, y, w, h);
        }
    }
    let aspect = width as f64 / height as f64;
    let (w, h) = if aspect < ratio.0 as f64 {
        (width, ((width as f64 / ratio.0 as f64).round() as u32).min(height))
    } else if aspect > ratio.1 as f64 {
        (((height as f64 * ratio.1 as f64).round() as u32).min(width), height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgb};
    use std::io::Cursor;

    /// A PNG of a few dozen bytes whose header claims `width` x `height`
    /// RGB pixels (its data: an empty zlib stream).
    fn png_claiming(width: u32, height: u32) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &byte in bytes {
                crc ^= u32::from(byte);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0xEDB8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        for (kind, data) in [
            (
                &b"IHDR"[..],
                [&width.to_be_bytes()[..], &height.to_be_bytes(), &[8, 2, 0, 0, 0]].concat(),
            ),
            (b"IDAT", vec![0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]),
            (b"IEND", Vec::new()),
        ] {
            png.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let chunk = [kind, &data].concat();
            png.extend_from_slice(&chunk);
            png.extend_from_slice(&crc32(&chunk).to_be_bytes());
        }
        png
    }

    #[test]
    fn an_image_claiming_too_many_pixels_is_refused_before_it_is_allocated() {
        let bomb = png_claiming(100_000, 100_000);
        assert!(bomb.len() < 100);
        let refused = decode(&bomb).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "100000x100000 pixels is more than the 178956970 an image may have (data.max_image_pixels)"
        );
        // The limit is the caller's: a 64 x 64 image passes at 4096, not at 4095.
        let mut bytes = Vec::new();
        halves(64, 64)
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        assert_eq!(decode_within(&bytes, 4096).unwrap().dimensions(), (64, 64));
        assert_eq!(
            decode_within(&bytes, 4095).unwrap_err(),
            ImageError::TooLarge {
                width: 64,
                height: 64,
                max_pixels: 4095
            }
        );
        // Under the limit, a header without pixels is an ordinary undecodable image.
        assert!(matches!(decode(&png_claiming(16, 16)), Err(ImageError::Decode(_))));
    }

    /// Left half red, right half blue.
    fn halves(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, _| {
            if x < width / 2 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        })
    }

    fn encoded(image: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Cursor::new(Vec::new());
        image.write_to(&mut bytes, format).unwrap();
        bytes.into_inner()
    }

    fn normalised(value: f32, channel: usize) -> f32 {
        (value - CLIP_MEAN[channel]) / CLIP_STD[channel]
    }

    #[test]
    fn decodes_png_jpeg_and_webp_to_rgb() {
        let image = halves(40, 30);
        for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
            let decoded = decode(&encoded(&image, format)).unwrap();
            assert_eq!(decoded.dimensions(), (40, 30), "{format:?}");
            // Lossy formats stay close to pure red on the left.
            let left = decoded.get_pixel(5, 15);
            assert!(left[0] > 200 && left[2] < 60, "{format:?}: {left:?}");
        }
        // Grey-scale input comes out as RGB.
        let grey = image::GrayImage::from_pixel(8, 8, image::Luma([128]));
        let mut bytes = Cursor::new(Vec::new());
        grey.write_to(&mut bytes, ImageFormat::Png).unwrap();
        assert_eq!(decode(bytes.get_ref()).unwrap().get_pixel(0, 0), &Rgb([128, 128, 128]));
    }

    #[test]
    fn corrupt_bytes_are_an_error() {
        let error = decode(b"definitely not an image").unwrap_err();
        assert!(error.to_string().starts_with("undecodable image:"), "{error}");
        let mut truncated = encoded(&halves(40, 30), ImageFormat::Png);
        truncated.truncate(truncated.len() / 2);
        assert!(decode(&truncated).is_err());
    }

    #[test]
    fn centre_crop_normalises_channel_major_pixels() {
        // 60x20: the centre 20x20 of a red|blue image is half red, half blue.
        let pixels = prepare(&halves(60, 20), 8, Crop::Centre, 0);
        assert_eq!(pixels.len(), 3 * 8 * 8);
        let at = |channel: usize, x: usize, y: usize| pixels[channel * 64 + y * 8 + x];
        assert!((at(0, 0, 4) - normalised(1.0, 0)).abs() < 1e-5);
        assert!((at(2, 0, 4) - normalised(0.0, 2)).abs() < 1e-5);
        assert!((at(0, 7, 4) - normalised(0.0, 0)).abs() < 1e-5);
        assert!((at(2, 7, 4) - normalised(1.0, 2)).abs() < 1e-5);
    }

    #[test]
    fn random_crops_are_seeded_and_stay_inside_the_image() {
        let image = RgbImage::from_fn(64, 48, |x, y| Rgb([(x * 4) as u8, (y * 5) as u8, 7]));
        let crop = Crop::training();
        assert_eq!(prepare(&image, 16, crop, 3), prepare(&image, 16, crop, 3));
        assert_ne!(prepare(&image, 16, crop, 3), prepare(&image, 16, crop, 4));
        for seed in 0..500 {
            let (x, y, w, h) = random_window(64, 48, (0.9, 1.0), (0.75, 4.0 / 3.0), seed);
            assert!(x + w <= 64 && y + h <= 48 && w > 0 && h > 0);
            let share = (w * h) as f32 / (64.0 * 48.0);
            assert!(share >= 0.85, "seed {seed}: {share}");
        }
        // A window that cannot satisfy the ratio falls back to the centre.
        let (x, y, w, h) = random_window(100, 10, (0.9, 1.0), (0.75, 4.0 / 3.0), 1);
        assert_eq!((w, h), (13, 10));
        assert_eq!((x, y), (43, 0));
    }
}
