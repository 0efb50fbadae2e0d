//! The zero-shot confusion matrix as a PNG a person can read: a title, the
//! class names on both axes, and each cell's count over a grey level that
//! is its share of the row.

use anyhow::Context;
use image::{GrayImage, Luma};

/// Pixels of one cell.
const CELL: u32 = 48;
/// Text is the 8x8 font drawn at this scale.
const SCALE: u32 = 2;
const GLYPH: u32 = 8 * SCALE;
const MARGIN: u32 = 12;
/// Longer class names are cut (with `~`) so the matrix stays the main thing.
const MAX_LABEL: usize = 20;
const INK: Luma<u8> = Luma([0]);
const PAPER: Luma<u8> = Luma([255]);

/// `confusion[true][predicted]` with `names` on both axes, under `title`.
pub fn draw(confusion: &[Vec<u64>], names: &[String], title: &str) -> GrayImage {
    let n = confusion.len() as u32;
    let labels: Vec<String> = names.iter().map(|name| label(name)).collect();
    let label_width = labels.iter().map(|l| text_width(l)).max().unwrap_or(0);
    let grid_left = MARGIN + label_width + MARGIN;
    // Title, a line saying which axis is which, then the column labels, written upwards.
    let grid_top = MARGIN + 2 * (GLYPH + MARGIN) + label_width + MARGIN;
    let axes = "rows: true class, columns: predicted";
    let width = (grid_left + n * CELL + MARGIN).max(2 * MARGIN + text_width(title).max(text_width(axes)));
    let mut picture = GrayImage::from_pixel(width, grid_top + n * CELL + MARGIN, PAPER);
    write(&mut picture, title, MARGIN, MARGIN, INK);
    write(&mut picture, axes, MARGIN, MARGIN + GLYPH + MARGIN, INK);
    for (index, label) in labels.iter().enumerate() {
        let offset = index as u32 * CELL + (CELL - GLYPH) / 2;
        write(
            &mut picture,
            label,
            grid_left - MARGIN - text_width(label),
            grid_top + offset,
            INK,
        );
        write_upwards(&mut picture, label, grid_left + offset, grid_top - MARGIN, INK);
    }
    for (row, counts) in confusion.iter().enumerate() {
        let total: u64 = counts.iter().sum();
        for (column, &count) in counts.iter().enumerate() {
            let share = count as f64 / total.max(1) as f64;
            let level = (255.0 * (1.0 - share)).round() as u8;
            let (left, top) = (grid_left + column as u32 * CELL, grid_top + row as u32 * CELL);
            for y in 0..CELL {
                for x in 0..CELL {
                    // A light line between cells.
                    let edge = x == 0 || y == 0;
                    picture.put_pixel(left + x, top + y, if edge { Luma([200]) } else { Luma([level]) });
                }
            }
            if count > 0 {
                let text = count.to_string();
                let ink = if level < 128 { PAPER } else { INK };
                let x = left + CELL.saturating_sub(text_width(&text)) / 2;
                write(&mut picture, &text, x, top + (CELL - GLYPH) / 2, ink);
            }
        }
    }
    picture
}

pub fn save(picture: &GrayImage, path: &std::path::Path) -> anyhow::Result<()> {
    picture
        .save(path)
        .with_context(|| format!("cannot write the confusion matrix to {}", path.display()))
}

/// The name as the font can draw it: ASCII, at most `MAX_LABEL` characters.
fn label(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .collect();
    if ascii.chars().count() > MAX_LABEL {
        format!("{}~", &ascii[..MAX_LABEL - 1])
    } else {
        ascii
    }
}

fn text_width(text: &str) -> u32 {
    text.chars().count() as u32 * GLYPH
}

/// The glyph's pixel (column, row) of `c` in the 8x8 font, set or not.
fn lit(c: char, column: u32, row: u32) -> bool {
    let glyph = font8x8::legacy::BASIC_LEGACY[if c.is_ascii() { c as usize } else { b'?' as usize }];
    glyph[row as usize] & (1 << column) != 0
}

/// Left to right from (x, y), the top-left corner; what falls outside is clipped.
fn write(picture: &mut GrayImage, text: &str, x: u32, y: u32, ink: Luma<u8>) {
    for (index, c) in text.chars().enumerate() {
        for (column, row) in (0..8).flat_map(|column| (0..8).map(move |row| (column, row))) {
            if lit(c, column, row) {
                let (left, top) = (x + index as u32 * GLYPH + column * SCALE, y + row * SCALE);
                fill(picture, left, top, ink);
            }
        }
    }
}

/// Bottom to top from (x, y), the bottom-left corner: a column's label.
fn write_upwards(picture: &mut GrayImage, text: &str, x: u32, y: u32, ink: Luma<u8>) {
    for (index, c) in text.chars().enumerate() {
        for (column, row) in (0..8).flat_map(|column| (0..8).map(move |row| (column, row))) {
            if lit(c, column, row) {
                let along = index as u32 * GLYPH + column * SCALE;
                let Some(top) = y.checked_sub(along + SCALE) else {
                    continue;
                };
                fill(picture, x + row * SCALE, top, ink);
            }
        }
    }
}

fn fill(picture: &mut GrayImage, left: u32, top: u32, ink: Luma<u8>) {
    for dy in 0..SCALE {
        for dx in 0..SCALE {
            if left + dx < picture.width() && top + dy < picture.height() {
                picture.put_pixel(left + dx, top + dy, ink);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit_pixels(text: &str) -> u32 {
        text.chars()
            .map(|c| {
                (0..8)
                    .flat_map(|x| (0..8).map(move |y| (x, y)))
                    .filter(|&(x, y)| lit(c, x, y))
                    .count() as u32
            })
            .sum::<u32>()
            * SCALE
            * SCALE
    }

    fn dark_pixels(picture: &GrayImage, x: std::ops::Range<u32>, y: std::ops::Range<u32>) -> u32 {
        y.flat_map(|y| x.clone().map(move |x| (x, y)))
            .filter(|&(x, y)| picture.get_pixel(x, y)[0] < 128)
            .count() as u32
    }

    #[test]
    fn class_names_counts_and_the_title_are_drawn() {
        let names = ["cat".to_string(), "dog".to_string()];
        let confusion = vec![vec![3, 1], vec![0, 4]];
        let picture = draw(&confusion, &names, "top-1 87.5%");
        let label_width = 3 * GLYPH;
        let grid_left = MARGIN + label_width + MARGIN;
        let grid_top = MARGIN + 2 * (GLYPH + MARGIN) + label_width + MARGIN;
        let axes_width = text_width("rows: true class, columns: predicted");
        assert_eq!(
            picture.dimensions(),
            (2 * MARGIN + axes_width, grid_top + 2 * CELL + MARGIN)
        );
        // The title, and each row's name left of its row, pixel for pixel.
        assert_eq!(
            dark_pixels(
                &picture,
                MARGIN..MARGIN + text_width("top-1 87.5%"),
                MARGIN..MARGIN + GLYPH
            ),
            lit_pixels("top-1 87.5%")
        );
        let row = |r: u32| grid_top + r * CELL..grid_top + (r + 1) * CELL;
        assert_eq!(dark_pixels(&picture, MARGIN..grid_left, row(0)), lit_pixels("cat"));
        assert_eq!(dark_pixels(&picture, MARGIN..grid_left, row(1)), lit_pixels("dog"));
        // Column names stand above their columns.
        let column = |c: u32| grid_left + c * CELL..grid_left + (c + 1) * CELL;
        let above = grid_top - MARGIN - label_width..grid_top;
        assert_eq!(dark_pixels(&picture, column(0), above.clone()), lit_pixels("cat"));
        assert_eq!(dark_pixels(&picture, column(1), above), lit_pixels("dog"));
        // 3 of 4 "cat" rows right: a dark cell with its count in light ink; an empty cell is blank.
        let inside = |r: u32, c: u32| (grid_left + c * CELL + CELL / 2, grid_top + r * CELL + 2);
        let (x, y) = inside(0, 0);
        assert_eq!(picture.get_pixel(x, y)[0], 64);
        let (x, y) = inside(1, 0);
        assert_eq!(picture.get_pixel(x, y)[0], 255);
        assert_eq!(dark_pixels(&picture, column(0), row(1)), 0, "no count drawn for 0");
    }

    #[test]
    fn long_and_foreign_names_are_cut_to_what_the_font_draws() {
        assert_eq!(label("a very long class name indeed"), "a very long class n~");
        assert_eq!(label("café"), "caf?");
    }
}
