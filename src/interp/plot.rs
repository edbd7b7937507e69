//! A minimal line plot to PNG with `image` and the Set-of-Marks font (no plotting crate in the
//! main crate): x = hook points in order, y = rate in [0, 1], one line per series.
use anyhow::{anyhow, Result};
use image::{Rgba, RgbaImage};

const COLOURS: &[[u8; 3]] = &[[228, 26, 28], [55, 126, 184], [77, 175, 74], [152, 78, 163], [255, 127, 0]];

fn dot(img: &mut RgbaImage, x: i32, y: i32, c: [u8; 3], r: i32) {
    for dy in -r..=r {
        for dx in -r..=r {
            let (px, py) = (x + dx, y + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, Rgba([c[0], c[1], c[2], 255]));
            }
        }
    }
}

fn line(img: &mut RgbaImage, (x0, y0): (f32, f32), (x1, y1): (f32, f32), c: [u8; 3], r: i32) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f32 / n as f32;
        dot(img, (x0 + t * (x1 - x0)).round() as i32, (y0 + t * (y1 - y0)).round() as i32, c, r);
    }
}

/// `series`: (name, one value per x label, None = missing). Returns PNG bytes.
pub fn line_plot(title: &str, xlabels: &[String], series: &[(String, Vec<Option<f64>>)]) -> Result<Vec<u8>> {
    let font = crate::env::som::font().map_err(|e| anyhow!(e))?;
    let (w, h) = (760u32, 440u32);
    let (l, r, t, b) = (60f32, 170f32, 36f32, 90f32);
    let mut img = RgbaImage::from_pixel(w, h, Rgba([255, 255, 255, 255]));
    let (pw, ph) = (w as f32 - l - r, h as f32 - t - b);
    let xs = |i: usize| l + if xlabels.len() > 1 { pw * i as f32 / (xlabels.len() - 1) as f32 } else { pw / 2.0 };
    let ys = |v: f64| t + ph * (1.0 - v.clamp(0.0, 1.0) as f32);
    let grey = [200, 200, 200];
    for k in 0..=4 {
        let v = k as f64 / 4.0;
        line(&mut img, (l, ys(v)), (l + pw, ys(v)), grey, 0);
        crate::env::som::draw_text(&mut img, font, 12.0, 10.0, ys(v) - 7.0, &format!("{:.0}%", v * 100.0), [0, 0, 0]);
    }
    line(&mut img, (l, t), (l, t + ph), [0, 0, 0], 0);
    for (i, x) in xlabels.iter().enumerate() {
        let short = x.replace(".hook_resid_post", "").replace("blocks.", "L").replace("hook_", "");
        crate::env::som::draw_text(
            &mut img,
            font,
            11.0,
            xs(i) - 8.0,
            t + ph + 8.0 + 12.0 * (i % 2) as f32,
            &short,
            [0, 0, 0],
        );
    }
    crate::env::som::draw_text(&mut img, font, 14.0, l, 10.0, title, [0, 0, 0]);
    for (si, (name, vals)) in series.iter().enumerate() {
        let c = COLOURS[si % COLOURS.len()];
        let mut prev: Option<(f32, f32)> = None;
        for (i, v) in vals.iter().enumerate() {
            match v {
                Some(v) => {
                    let p = (xs(i), ys(*v));
                    if let Some(q) = prev {
                        line(&mut img, q, p, c, 1);
                    }
                    dot(&mut img, p.0.round() as i32, p.1.round() as i32, c, 3);
                    prev = Some(p);
                }
                None => prev = None,
            }
        }
        let ly = t + 10.0 + 20.0 * si as f32;
        line(&mut img, (w as f32 - r + 12.0, ly), (w as f32 - r + 36.0, ly), c, 1);
        crate::env::som::draw_text(&mut img, font, 13.0, w as f32 - r + 42.0, ly - 8.0, name, [0, 0, 0]);
    }
    let mut buf = Vec::new();
    image::DynamicImage::ImageRgba8(img).write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)?;
    Ok(buf)
}
