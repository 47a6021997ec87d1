//! `dualpriv::hf::image` against Pillow and transformers: decoded pixels, bicubic
//! resizes and `pixel_values` from Python (scripts/make_hf_fixture.py,
//! scripts/make_image_fixture.py), and hostile files.
mod common;

use std::path::{Path, PathBuf};

use dualpriv::hf::image::{
    load_image, resize_bicubic, resize_bicubic_box, AspectMode, ImageProcessor, Resize, RgbImage,
};
use dualpriv::Error;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn hf() -> PathBuf {
    common::hf_data()
}

fn fixture() -> PathBuf {
    hf().join("image")
}

/// A safetensors file in memory; tensors are read by name.
struct Refs(Vec<u8>);

impl Refs {
    fn open(path: &Path) -> Refs {
        Refs(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn u8(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::U8, "{name}");
        (t.shape().to_vec(), t.data().to_vec())
    }

    fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()));
        (t.shape().to_vec(), v.collect())
    }

    /// An HWC u8 tensor as an image.
    fn image(&self, name: &str) -> RgbImage {
        let (shape, data) = self.u8(name);
        assert_eq!(shape.len(), 3, "{name}: {shape:?}");
        assert_eq!(shape[2], 3, "{name}: {shape:?}");
        RgbImage::from_raw(shape[1] as u32, shape[0] as u32, data).unwrap()
    }
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixture().join("cases.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn is_jpeg(src: &str) -> bool {
    src.ends_with(".jpg")
}

/// The source image of a case as Pillow decoded it: our decoder for PNG (exact, checked
/// by `decode_matches_pillow`), Pillow's own pixels for JPEG (whose decoders differ).
fn source(refs: &Refs, cases: &[Value], src: &str) -> RgbImage {
    if is_jpeg(src) {
        let c = cases
            .iter()
            .find(|c| c["op"] == "decode" && c["src"] == src)
            .unwrap();
        refs.image(c["tensor"].as_str().unwrap())
    } else {
        load_image(fixture().join(src)).unwrap()
    }
}

/// Largest |a - b| over two images of the same size, and the mean.
fn image_diff(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let d = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y));
    let (max, sum) = d.fold((0u8, 0u64), |(m, s), v| (m.max(v), s + u64::from(v)));
    (max, sum as f64 / a.as_raw().len() as f64)
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Values whose bit patterns differ (NaN-safe exactness).
fn bit_mismatches(a: &[f32], b: &[f32]) -> usize {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

#[test]
fn decode_matches_pillow() {
    let refs = Refs::open(&fixture().join("refs.safetensors"));
    let mut n = 0;
    for c in cases().iter().filter(|c| c["op"] == "decode") {
        let src = c["src"].as_str().unwrap();
        let want = refs.image(c["tensor"].as_str().unwrap());
        let got = load_image(fixture().join(src)).unwrap();
        let (max, mean) = image_diff(&got, &want);
        println!(
            "decode {src:18} (Pillow mode {:5}): max |diff| {max}, mean {mean:.4}",
            c["pillow_mode"]
        );
        if is_jpeg(src) {
            // zune-jpeg vs libjpeg-turbo: IDCT and chroma upsampling round differently.
            assert!(max <= 4 && mean < 0.5, "{src}: max {max}, mean {mean}");
        } else {
            assert_eq!(max, 0, "{src}: PNG decode must equal Pillow's exactly");
        }
        n += 1;
    }
    assert_eq!(n, 16);
}

#[test]
fn resize_matches_pillow_exactly() {
    let refs = Refs::open(&fixture().join("refs.safetensors"));
    let cases = cases();
    let mut n = 0;
    for c in cases.iter().filter(|c| c["op"] == "resize") {
        let src = c["src"].as_str().unwrap();
        let img = source(&refs, &cases, src);
        let (w, h) = (
            c["width"].as_u64().unwrap() as u32,
            c["height"].as_u64().unwrap() as u32,
        );
        let want = refs.image(c["tensor"].as_str().unwrap());
        let got = match c["box"].as_array() {
            None => resize_bicubic(&img, w, h).unwrap(),
            Some(b) => {
                // Pillow parses the box as C floats.
                let b: Vec<f32> = b.iter().map(|v| v.as_f64().unwrap() as f32).collect();
                resize_bicubic_box(&img, w, h, [b[0], b[1], b[2], b[3]]).unwrap()
            }
        };
        let (max, _) = image_diff(&got, &want);
        let wrong = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        println!(
            "resize {src:16} {}x{} -> {w}x{h} box {}: {wrong} bytes differ (max {max})",
            img.width(),
            img.height(),
            c["box"]
        );
        assert_eq!(
            wrong, 0,
            "{src} -> {w}x{h} box {}: must equal Pillow exactly",
            c["box"]
        );
        n += 1;
    }
    assert_eq!(n, 33);
}

/// Every `pixel_values` of the image fixture: configs with defaults, legacy forms,
/// crops that pad, skipped steps; crop and pad modes; from Pillow-decoded pixels.
#[test]
fn preprocess_matches_transformers_bit_for_bit() {
    let refs = Refs::open(&fixture().join("refs.safetensors"));
    let cases = cases();
    let mut n = 0;
    for c in cases.iter().filter(|c| c["op"] == "preprocess") {
        let (src, cfg) = (c["src"].as_str().unwrap(), c["config"].as_str().unwrap());
        let mode = if c["mode"] == "pad" {
            AspectMode::Pad
        } else {
            AspectMode::Crop
        };
        let proc = ImageProcessor::from_file(fixture().join(cfg)).unwrap();
        let img = source(&refs, &cases, src);
        let got = proc.preprocess(&img, mode).unwrap();
        let (shape, want) = refs.f32(c["tensor"].as_str().unwrap());
        let (oh, ow) = proc.output_size(img.width(), img.height(), mode);
        assert_eq!(shape, [3, oh as usize, ow as usize], "{src} {cfg} {mode:?}");
        let (diff, bits) = (max_abs(&got, &want), bit_mismatches(&got, &want));
        println!("preprocess {src:16} {cfg:28} {mode:?}: {shape:?}, max |diff| {diff:e}, {bits} bits differ");
        assert_eq!(bits, 0, "{src} {cfg} {mode:?}: max |diff| {diff}");
        n += 1;
    }
    assert_eq!(n, 28);
}

/// The references of the model fixture: `pixel_values` (crop) and `pixel_values_pad`
/// from tests/data/hf/{image.png, preprocessor_config.json} through transformers.
#[test]
fn model_fixture_pixel_values() {
    let refs = Refs::open(&hf().join("refs.safetensors"));
    let proc = ImageProcessor::from_file(hf().join("preprocessor_config.json")).unwrap();
    let img = load_image(hf().join("image.png")).unwrap();
    assert_eq!(img.dimensions(), (75, 50));
    for (name, mode) in [
        ("pixel_values", AspectMode::Crop),
        ("pixel_values_pad", AspectMode::Pad),
    ] {
        let (shape, want) = refs.f32(name);
        assert_eq!(shape, [1, 3, 56, 56], "{name}");
        let got = proc.preprocess(&img, mode).unwrap();
        let (diff, bits) = (max_abs(&got, &want), bit_mismatches(&got, &want));
        println!(
            "{name}: max |diff| {diff:e}, {bits} of {} values differ in any bit",
            got.len()
        );
        assert_eq!(diff, 0.0, "{name}");
        assert_eq!(bits, 0, "{name}");
    }
}

/// A JPEG end to end through our decoder: close to transformers, not exact.
#[test]
fn jpeg_end_to_end_is_close() {
    let refs = Refs::open(&fixture().join("refs.safetensors"));
    let proc = ImageProcessor::from_file(hf().join("preprocessor_config.json")).unwrap();
    let img = load_image(fixture().join("photo.jpg")).unwrap();
    for c in cases()
        .iter()
        .filter(|c| c["op"] == "preprocess" && c["src"] == "photo.jpg")
    {
        let mode = if c["mode"] == "pad" {
            AspectMode::Pad
        } else {
            AspectMode::Crop
        };
        let (_, want) = refs.f32(c["tensor"].as_str().unwrap());
        let got = proc.preprocess(&img, mode).unwrap();
        let diff = max_abs(&got, &want);
        let mean = got
            .iter()
            .zip(&want)
            .map(|(a, b)| f64::from((a - b).abs()))
            .sum::<f64>()
            / got.len() as f64;
        println!("photo.jpg {mode:?} via zune-jpeg: max |diff| {diff:.4}, mean {mean:.5}");
        // Measured: max 0.057 (crop), 0.044 (pad): 3 levels / 255 / std 0.27 is 0.044.
        assert!(
            diff < 0.07 && mean < 0.01,
            "{mode:?}: max {diff}, mean {mean}"
        );
    }
}

#[test]
fn config_fields_and_defaults() {
    let p = ImageProcessor::from_file(hf().join("preprocessor_config.json")).unwrap();
    let want = ImageProcessor {
        size: Resize::ShortestEdge(56),
        crop_height: 56,
        crop_width: 56,
        ..ImageProcessor::default()
    };
    assert_eq!(p, want);
    assert_eq!(p.rescale_factor, 1.0 / 255.0);
    // Legacy ints: `size` is the short side, `crop_size` a square; the rest defaults.
    let p = ImageProcessor::from_file(fixture().join("preproc_int.json")).unwrap();
    assert_eq!(p.size, Resize::ShortestEdge(30));
    assert_eq!((p.crop_height, p.crop_width), (48, 48));
    assert_eq!(p.image_mean, [0.48145466, 0.4578275, 0.40821073]);
    assert!(p.do_resize && p.do_center_crop && p.do_rescale && p.do_normalize && p.do_convert_rgb);
    let p = ImageProcessor::from_file(fixture().join("preproc_exact.json")).unwrap();
    assert_eq!(
        p.size,
        Resize::Exact {
            height: 50,
            width: 33
        }
    );
    assert_eq!((p.image_mean, p.image_std), ([100.0; 3], [50.0; 3]));
    assert!(!p.do_center_crop && !p.do_rescale);
    // The layout of llava-hf/llava-1.5-7b-hf's file (336 pixels), inline.
    let dir = common::tmp_dir("config_llava_7b");
    let path = dir.join("preprocessor_config.json");
    std::fs::write(
        &path,
        r#"{"crop_size": {"height": 336, "width": 336}, "do_center_crop": true,
            "do_convert_rgb": true, "do_normalize": true, "do_rescale": true,
            "do_resize": true, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor",
            "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}}"#,
    )
    .unwrap();
    let p = ImageProcessor::from_file(&path).unwrap();
    assert_eq!(p.size, Resize::ShortestEdge(336));
    // A 640x480 photo: 448x336 after the resize, 336x336 after the crop.
    assert_eq!(p.output_size(640, 480, AspectMode::Crop), (336, 336));
    let img = RgbImage::from_pixel(640, 480, image::Rgb([10, 200, 30]));
    assert_eq!(
        p.preprocess(&img, AspectMode::Pad).unwrap().len(),
        3 * 336 * 336
    );
}

/// Resize targets in both orientations: transformers' int(s * long / short).
#[test]
fn resize_target_rounding() {
    let p = ImageProcessor {
        size: Resize::ShortestEdge(56),
        do_center_crop: false,
        ..ImageProcessor::default()
    };
    // (w, h) -> (h', w')
    for ((w, h), want) in [
        ((75, 50), (56, 84)),
        ((50, 75), (84, 56)),
        ((33, 71), (120, 56)),
        ((71, 33), (56, 120)),
        ((56, 56), (56, 56)),
        ((3, 1000), (18666, 56)),
        ((100, 57), (56, 98)), // 56 * 100 / 57 = 98.2
    ] {
        assert_eq!(p.output_size(w, h, AspectMode::Crop), want, "{w}x{h}");
    }
    assert_eq!(p.output_size(75, 50, AspectMode::Pad), (56, 56));
}

/// The error text must name `path`, and the whole message must not be empty.
fn assert_names(e: &Error, path: &Path, hint: &str) {
    let msg = e.to_string();
    println!("{msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "does not name the file: {msg}"
    );
    assert!(msg.contains(hint), "no {hint:?} in: {msg}");
}

#[test]
fn hostile_images_give_errors_naming_the_file() {
    let dir = common::tmp_dir("hostile_images");
    let good = std::fs::read(hf().join("image.png")).unwrap();

    let missing = dir.join("nope.png");
    let e = load_image(&missing).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert_names(&e, &missing, "cannot read");

    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated.png",
            good[..good.len() / 2].to_vec(),
            "corrupt or truncated",
        ),
        (
            "header_only.png",
            good[..40].to_vec(),
            "corrupt or truncated",
        ),
        ("empty.png", vec![], "empty file"),
        (
            "text.png",
            b"this is not an image at all\n".to_vec(),
            "only PNG and JPEG",
        ),
        (
            "anim.gif",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
            "only PNG and JPEG",
        ),
        (
            "truncated.jpg",
            std::fs::read(fixture().join("photo.jpg")).unwrap()[..200].to_vec(),
            "JPEG",
        ),
    ];
    // Corrupt: garbage in the middle of the compressed data (CRCs no longer match).
    let mut corrupt = good.clone();
    for b in &mut corrupt[100..400] {
        *b ^= 0x5a;
    }
    cases.push(("corrupt.png", corrupt, "corrupt or truncated"));
    // A bad IHDR: bit depth 3 does not exist.
    let mut bad_depth = good.clone();
    bad_depth[24] = 3;
    cases.push(("bad_depth.png", bad_depth, "corrupt or truncated"));
    for (name, bytes, hint) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = load_image(&path).unwrap_err();
        assert!(matches!(e, Error::Format(_)), "{name}: {e:?}");
        assert_names(&e, &path, hint);
    }

    // Recognised by content: a PNG named .jpg still decodes, to the same pixels.
    let renamed = dir.join("really_a_png.jpg");
    std::fs::write(&renamed, &good).unwrap();
    assert_eq!(
        load_image(&renamed).unwrap(),
        load_image(hf().join("image.png")).unwrap()
    );

    let zero = fixture().join("zero_width.png");
    let e = load_image(&zero).unwrap_err();
    assert!(matches!(e, Error::Format(_)), "{e:?}");
    assert_names(&e, &zero, "0x5 pixels");
}

#[test]
fn hostile_configs_give_errors_naming_the_file() {
    let dir = common::tmp_dir("hostile_configs");
    let missing = dir.join("preprocessor_config.json");
    let e = ImageProcessor::from_file(&missing).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert_names(&e, &missing, "cannot read");

    for (i, (text, hint)) in [
        ("{\"size\": {\"shortest_edge\": 336", "not valid JSON"),
        ("[1, 2, 3]", "expected a JSON object"),
        ("{\"do_resize\": \"yes\"}", "do_resize"),
        ("{\"size\": {\"shortest_edge\": 0}}", "1..=65536"),
        ("{\"size\": {\"shortest_edge\": -5}}", "1..=65536"),
        ("{\"size\": {\"shortest_edge\": 3.5}}", "whole number"),
        (
            "{\"size\": {\"shortest_edge\": 300, \"longest_edge\": 600}}",
            "longest_edge",
        ),
        ("{\"size\": \"big\"}", "size"),
        (
            "{\"crop_size\": {\"height\": 0, \"width\": 4}}",
            "crop_size",
        ),
        ("{\"crop_size\": {\"shortest_edge\": 4}}", "crop_size"),
        ("{\"image_mean\": [0.5, 0.5]}", "3"),
        ("{\"image_std\": [0.5, 0.0, 0.5]}", "divide by zero"),
        ("{\"image_std\": \"x\"}", "finite number"),
        (
            "{\"rescale_factor\": null, \"image_mean\": [\"a\", 0, 0]}",
            "image_mean",
        ),
        ("{\"image_mean\": [1e999, 0, 0]}", "not valid JSON"),
        ("{\"resample\": 2}", "bilinear"),
        ("{\"resample\": \"bicubic\"}", "resample"),
        (
            "{\"image_processor_type\": \"SiglipImageProcessor\"}",
            "CLIPImageProcessor",
        ),
        ("{\"do_pad\": true}", "do_pad"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.join(format!("config_{i}.json"));
        std::fs::write(&path, text).unwrap();
        let e = ImageProcessor::from_file(&path).unwrap_err();
        assert!(
            matches!(e, Error::Config(_) | Error::Format(_)),
            "{text}: {e:?}"
        );
        assert_names(&e, &path, hint);
    }
    // resample only matters when resizing.
    let path = dir.join("no_resize.json");
    std::fs::write(&path, "{\"do_resize\": false, \"resample\": 2}").unwrap();
    assert!(!ImageProcessor::from_file(&path).unwrap().do_resize);
}

#[test]
fn bad_resize_and_preprocess_arguments_are_errors() {
    let img = RgbImage::from_pixel(8, 6, image::Rgb([1, 2, 3]));
    let empty = RgbImage::new(0, 4);
    for r in [
        resize_bicubic(&img, 0, 5),
        resize_bicubic(&img, 5, 0),
        resize_bicubic(&empty, 5, 5),
        resize_bicubic(&img, 100_000, 100_000),
        resize_bicubic_box(&img, 4, 4, [-1.0, 0.0, 8.0, 6.0]),
        resize_bicubic_box(&img, 4, 4, [0.0, 0.0, 8.5, 6.0]),
        resize_bicubic_box(&img, 4, 4, [5.0, 0.0, 4.0, 6.0]),
        resize_bicubic_box(&img, 4, 4, [0.0, f32::NAN, 8.0, 6.0]),
    ] {
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "{e:?}");
        println!("{e}");
    }
    let p = ImageProcessor::default();
    assert!(matches!(
        p.preprocess(&empty, AspectMode::Crop),
        Err(Error::Shape(_))
    ));
    let bad = ImageProcessor {
        image_std: [0.5, 0.0, 0.5],
        ..ImageProcessor::default()
    };
    assert!(matches!(
        bad.preprocess(&img, AspectMode::Crop),
        Err(Error::Config(_))
    ));
    // Sizes that would allocate tens of GB are refused before allocating.
    let huge = ImageProcessor {
        size: Resize::ShortestEdge(60_000),
        ..ImageProcessor::default()
    };
    let huge_crop = ImageProcessor {
        do_resize: false,
        crop_height: 65_536,
        crop_width: 65_536,
        ..ImageProcessor::default()
    };
    let sliver = RgbImage::new(1, 20_000);
    let no_resize = ImageProcessor {
        do_resize: false,
        do_center_crop: false,
        ..ImageProcessor::default()
    };
    for r in [
        huge.preprocess(&img, AspectMode::Crop),
        huge_crop.preprocess(&img, AspectMode::Crop),
        no_resize.preprocess(&sliver, AspectMode::Pad),
    ] {
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "{e:?}");
        println!("{e}");
    }
    let ok = no_resize.preprocess(&sliver, AspectMode::Crop).unwrap();
    assert_eq!(ok.len(), 3 * 20_000);
    // Identity sizes copy; a 1x1 image resizes to anything.
    assert_eq!(resize_bicubic(&img, 8, 6).unwrap(), img);
    let dot = RgbImage::from_pixel(1, 1, image::Rgb([200, 100, 0]));
    assert_eq!(
        resize_bicubic(&dot, 3, 2).unwrap(),
        RgbImage::from_pixel(3, 2, image::Rgb([200, 100, 0]))
    );
}
