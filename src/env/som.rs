//! Set-of-Marks: the task screenshot with each element's box outlined and labelled `[ref]`.
//!
//! Drawn with `image` and `ab_glyph` using DejaVu Sans from Debian's fonts-dejavu-core
//! (`$MINIWOB_STEER_FONT` overrides the path). A screenshot taken at device scale 1 is first
//! enlarged to 2× (nearest neighbour) so that labels stay readable on the 160×210 task area.
use super::observation::Element;
use ab_glyph::{Font, FontVec, PxScale, ScaleFont};
use image::{Rgba, RgbaImage};
use std::sync::OnceLock;

/// Font files tried in order.
pub const FONT_PATHS: &[&str] =
    &["/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"];

const PALETTE: &[[u8; 3]] = &[
    [228, 26, 28],
    [55, 126, 184],
    [77, 175, 74],
    [152, 78, 163],
    [255, 127, 0],
    [166, 86, 40],
    [247, 129, 191],
    [0, 139, 139],
];

static FONT: OnceLock<Result<FontVec, String>> = OnceLock::new();

/// The label font, loaded once.
pub fn font() -> Result<&'static FontVec, String> {
    FONT.get_or_init(|| {
        let mut paths: Vec<String> = Vec::new();
        if let Ok(p) = std::env::var("MINIWOB_STEER_FONT") {
            paths.push(p);
        }
        paths.extend(FONT_PATHS.iter().map(|s| s.to_string()));
        for p in &paths {
            if let Ok(bytes) = std::fs::read(p) {
                return FontVec::try_from_vec(bytes).map_err(|e| format!("{p}: {e}"));
            }
        }
        Err(format!("no DejaVu font found (tried {}): run ./scripts/setup.sh (fonts-dejavu-core)", paths.join(", ")))
    })
    .as_ref()
    .map_err(|e| e.clone())
}

fn blend(img: &mut RgbaImage, x: i32, y: i32, c: [u8; 3], a: f32) {
    if x < 0 || y < 0 || x >= img.width() as i32 || y >= img.height() as i32 || a <= 0.0 {
        return;
    }
    let a = a.min(1.0);
    let p = img.get_pixel_mut(x as u32, y as u32);
    for (ch, &want) in p.0.iter_mut().zip(c.iter()) {
        *ch = (*ch as f32 * (1.0 - a) + want as f32 * a).round() as u8;
    }
    p.0[3] = 255;
}

fn fill(img: &mut RgbaImage, x0: i32, y0: i32, x1: i32, y1: i32, c: [u8; 3]) {
    for y in y0..y1 {
        for x in x0..x1 {
            blend(img, x, y, c, 1.0);
        }
    }
}

fn outline(img: &mut RgbaImage, x0: i32, y0: i32, x1: i32, y1: i32, c: [u8; 3], t: i32) {
    fill(img, x0, y0, x1, y0 + t, c);
    fill(img, x0, y1 - t, x1, y1, c);
    fill(img, x0, y0, x0 + t, y1, c);
    fill(img, x1 - t, y0, x1, y1, c);
}

/// Width in pixels of `text` at `size` px.
pub fn text_width(font: &FontVec, size: f32, text: &str) -> f32 {
    let sf = font.as_scaled(PxScale::from(size));
    text.chars().map(|c| sf.h_advance(font.glyph_id(c))).sum()
}

/// Draws `text` with its top-left corner at (x, y).
pub fn draw_text(img: &mut RgbaImage, font: &FontVec, size: f32, x: f32, y: f32, text: &str, c: [u8; 3]) {
    let sf = font.as_scaled(PxScale::from(size));
    let baseline = y + sf.ascent();
    let mut pen = x;
    for ch in text.chars() {
        let id = font.glyph_id(ch);
        let g = id.with_scale_and_position(PxScale::from(size), ab_glyph::point(pen, baseline));
        if let Some(og) = font.outline_glyph(g) {
            let b = og.px_bounds();
            og.draw(|gx, gy, cov| blend(img, b.min.x as i32 + gx as i32, b.min.y as i32 + gy as i32, c, cov));
        }
        pen += sf.h_advance(id);
    }
}

/// Whether an element carries information of its own: not `<body>`, and interactive, or with
/// text, an id, a value or a checked state, or a leaf (a bare wrapper carries none).
fn is_informative(e: &Element, has_children: bool) -> bool {
    if e.tag == "BODY" {
        return false;
    }
    let interactive = e.tag.starts_with("INPUT")
        || matches!(e.tag.as_str(), "BUTTON" | "A" | "SELECT" | "TEXTAREA" | "LABEL" | "OPTION");
    interactive || !e.text.is_empty() || !e.id.is_empty() || e.value.is_some() || e.checked.is_some() || !has_children
}

/// Elements that get a mark: positive refs, informative (as in the DOM text), not a bare
/// container (children but no text of its own, not a control), visible inside the image, and
/// not covering most of the task area.
pub fn marked(elements: &[Element], area_w: f64, area_h: f64) -> Vec<&Element> {
    let parents: std::collections::HashSet<i64> = elements.iter().filter_map(|e| e.parent).collect();
    // A <label> wrapping an input: the input gets the mark.
    let input_parents: std::collections::HashSet<i64> =
        elements.iter().filter(|e| e.tag.starts_with("INPUT")).filter_map(|e| e.parent).collect();
    elements
        .iter()
        .filter(|e| !(e.tag == "LABEL" && input_parents.contains(&e.r#ref)))
        .filter(|e| {
            let container = parents.contains(&e.r#ref)
                && e.text.is_empty()
                && !(e.tag.starts_with("INPUT")
                    || matches!(e.tag.as_str(), "BUTTON" | "A" | "SELECT" | "TEXTAREA" | "LABEL"));
            e.r#ref > 0
                && !container
                && is_informative(e, parents.contains(&e.r#ref))
                && e.width >= 1.0
                && e.height >= 1.0
                && e.left < area_w
                && e.top < area_h
                && e.left + e.width > 0.0
                && e.top + e.height > 0.0
                && e.width * e.height < 0.6 * area_w * area_h
        })
        .collect()
}

/// How much [`render`] enlarges a screenshot taken at `scale` device pixels per CSS pixel; the
/// Set-of-Marks image has `scale · enlargement(scale)` pixels per CSS pixel.
pub fn enlargement(scale: f32) -> u32 {
    if scale < 2.0 {
        (2.0 / scale).ceil() as u32
    } else {
        1
    }
}

/// Draws the marks on `img`, whose pixels are `scale` device pixels per CSS pixel. Returns the
/// image, enlarged to at least 2× when `scale` < 2.
pub fn render(img: RgbaImage, elements: &[Element], scale: f32) -> Result<RgbaImage, String> {
    let font = font()?;
    let k = enlargement(scale);
    let mut img = if k > 1 {
        image::imageops::resize(&img, img.width() * k, img.height() * k, image::imageops::FilterType::Nearest)
    } else {
        img
    };
    let s = scale * k as f32;
    let (area_w, area_h) = (img.width() as f64 / s as f64, img.height() as f64 / s as f64);
    let size = 6.5 * s;
    let pad = (s / 2.0).max(1.0);
    let t = (s / 2.0).round().max(1.0) as i32;
    let marks = marked(elements, area_w, area_h);
    for (i, e) in marks.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let x0 = (e.left as f32 * s).round() as i32;
        let y0 = (e.top as f32 * s).round() as i32;
        let x1 = ((e.left + e.width) as f32 * s).round() as i32;
        let y1 = ((e.top + e.height) as f32 * s).round() as i32;
        outline(&mut img, x0, y0, x1, y1, c, t);
    }
    // Labels after all outlines so that no outline crosses a label. Each label goes to the
    // first free spot among: inside top-left, left of the box, above, inside top-right, below.
    let mut placed: Vec<(f32, f32, f32, f32)> = Vec::new();
    let (iw, ih) = (img.width() as f32, img.height() as f32);
    for (i, e) in marks.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let label = format!("[{}]", e.r#ref);
        let w = text_width(font, size, &label) + 2.0 * pad;
        let h = size * 1.15;
        let (bx0, by0) = (e.left as f32 * s, e.top as f32 * s);
        let (bx1, by1) = ((e.left + e.width) as f32 * s, (e.top + e.height) as f32 * s);
        let clamp = |x: f32, y: f32| (x.clamp(0.0, (iw - w).max(0.0)), y.clamp(0.0, (ih - h).max(0.0)));
        let candidates =
            [clamp(bx0, by0), clamp(bx0 - w, by0), clamp(bx0, by0 - h), clamp(bx1 - w, by0), clamp(bx0, by1)];
        let free = |x: f32, y: f32| {
            placed.iter().all(|&(px, py, pw, ph)| x + w <= px || px + pw <= x || y + h <= py || py + ph <= y)
        };
        let (lx, ly) = candidates.iter().copied().find(|&(x, y)| free(x, y)).unwrap_or(candidates[0]);
        placed.push((lx, ly, w, h));
        fill(&mut img, lx as i32, ly as i32, (lx + w).ceil() as i32, (ly + h).ceil() as i32, c);
        draw_text(&mut img, font, size, lx + pad, ly + (h - size) / 2.0 - size * 0.05, &label, [255, 255, 255]);
    }
    Ok(img)
}

/// A blank white task area (for tests and for observations without a browser).
pub fn blank(width: u32, height: u32) -> RgbaImage {
    RgbaImage::from_pixel(width, height, Rgba([255, 255, 255, 255]))
}
