//! LLaVA-1.5 image preprocessing: transformers' `CLIPImageProcessorPil` (the Pillow
//! backend of `CLIPImageProcessor`), reproduced bit for bit on PNG input.
//!
//! The pipeline a LLaVA-1.5 training example goes through:
//!
//! 1. [`load_image`]: decode a PNG or JPEG and convert it to RGB the way LLaVA's data
//!    loader does (`Image.open(path).convert("RGB")`): grey is replicated, alpha is
//!    dropped (not composited), palettes are looked up, 16-bit samples are reduced as
//!    Pillow reduces them.
//! 2. [`AspectMode::Pad`] only: LLaVA-1.5's `expand2square`, the image centred on a
//!    square of the mean colour.
//! 3. [`ImageProcessor::preprocess`]: resize the short side to `size.shortest_edge` with
//!    [`resize_bicubic`] (a port of Pillow's fixed-point resampler), centre-crop to
//!    `crop_size`, rescale by `rescale_factor`, normalise with `image_mean` /
//!    `image_std`, and lay the result out channel-first in f32: the model's
//!    `pixel_values` for one image.
//!
//! Every step is checked against Python (tests/hf_image.rs, fixture from
//! scripts/make_image_fixture.py): decoded and resized pixels equal Pillow's exactly and
//! `pixel_values` equal transformers' exactly. JPEG decoding is the one step that is not
//! exact: the `image` crate's decoder rounds its IDCT and chroma upsampling differently
//! from Pillow's libjpeg-turbo, so decoded JPEG pixels differ by a few levels.
//!
//! Two deliberate choices, both LLaVA's: alpha is dropped, as `convert("RGB")` does
//! (transformers' own `convert_to_rgb`, used when a PIL image with alpha reaches the
//! processor directly, composites onto white instead); and EXIF orientation is ignored,
//! as `Image.open` ignores it.
//!
//! Versions: the references come from Pillow 13.0 and transformers 5.24. Pillow 13
//! changed the order of the two resampling passes for images whose height shrinks much
//! more than their width (see [`resize_bicubic`]); older Pillow differs there by a level
//! or so. transformers' torchvision backend (`CLIPImageProcessor` when torchvision is
//! installed) resizes with torch instead of Pillow and is not what this reproduces; the
//! Pillow backend is the one LLaVA-1.5 was trained with.
use std::io::Cursor;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub use image::RgbImage;

/// The largest image, in pixels, that is decoded or produced: Pillow's
/// `DecompressionBombError` threshold (twice `Image.MAX_IMAGE_PIXELS`).
pub const MAX_PIXELS: u64 = 178_956_970;

/// How a non-square image is fitted to the model's square input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AspectMode {
    /// transformers' default: resize the short side, then centre-crop (the edges of the
    /// long side are lost).
    Crop,
    /// LLaVA-1.5's `image_aspect_ratio = "pad"`: first centre the image on a square of
    /// colour `int(mean * 255)` (`expand2square`), so nothing is cut off.
    Pad,
}

/// The `size` field of `preprocessor_config.json`: the resize target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// `{"shortest_edge": s}` (or a bare int): the short side becomes `s`, the long side
    /// `int(s * long / short)`, keeping the aspect ratio.
    ShortestEdge(u32),
    /// `{"height": h, "width": w}` (or a two-element list): exactly this size.
    Exact {
        /// Target height in pixels.
        height: u32,
        /// Target width in pixels.
        width: u32,
    },
}

/// `CLIPImageProcessor` settings, as read from `preprocessor_config.json`. [`Default`]
/// gives transformers' class defaults (224 pixels, OpenAI CLIP's mean and std, bicubic,
/// every step on), which fill in any field a file leaves out.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    /// Resize before cropping.
    pub do_resize: bool,
    /// The resize target (used when `do_resize`).
    pub size: Resize,
    /// Centre-crop (padding with black where the image is smaller).
    pub do_center_crop: bool,
    /// Crop height in pixels (used when `do_center_crop`).
    pub crop_height: u32,
    /// Crop width in pixels (used when `do_center_crop`).
    pub crop_width: u32,
    /// Multiply the u8 pixels by `rescale_factor`.
    pub do_rescale: bool,
    /// The rescale factor; 1/255 maps pixels to [0, 1].
    pub rescale_factor: f64,
    /// Subtract `image_mean` and divide by `image_std`, per channel.
    pub do_normalize: bool,
    /// Per-channel mean (R, G, B); also the padding colour of [`AspectMode::Pad`].
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation (R, G, B).
    pub image_std: [f64; 3],
    /// Recorded for completeness: [`load_image`] always converts to RGB, because the
    /// vision tower needs three channels whatever this says.
    pub do_convert_rgb: bool,
}

/// OpenAI CLIP's normalisation (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// `PILImageResampling.BICUBIC`, the only filter implemented.
const BICUBIC: i64 = 3;

impl Default for ImageProcessor {
    fn default() -> Self {
        ImageProcessor {
            do_resize: true,
            size: Resize::ShortestEdge(224),
            do_center_crop: true,
            crop_height: 224,
            crop_width: 224,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            do_convert_rgb: true,
        }
    }
}

/// Reads the fields of one `preprocessor_config.json`; every error names the file.
struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, msg: String) -> Error {
        Error::Config(format!("{}: {msg}", self.path.display()))
    }

    /// The value of `key`, or `None` when absent or `null` (transformers treats an
    /// explicit `null` as "use the default").
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(format!("{key} is {v}; write true or false"))),
        }
    }

    fn number(&self, key: &str, v: &Value) -> Result<f64> {
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| self.err(format!("{key} is {v}; it must be a finite number")))
    }

    fn pixels(&self, key: &str, v: &Value) -> Result<u32> {
        v.as_u64()
            .filter(|&n| (1..=1 << 16).contains(&n))
            .map(|n| n as u32)
            .ok_or_else(|| {
                self.err(format!(
                    "{key} is {v}; it must be a whole number of pixels in 1..=65536"
                ))
            })
    }

    /// `image_mean` / `image_std`: three numbers, or one for every channel.
    fn triple(&self, key: &str, default: [f64; 3]) -> Result<[f64; 3]> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Array(a)) if a.len() == 3 => Ok([
                self.number(key, &a[0])?,
                self.number(key, &a[1])?,
                self.number(key, &a[2])?,
            ]),
            Some(Value::Array(a)) => Err(self.err(format!(
                "{key} has {} values; write one per RGB channel (3)",
                a.len()
            ))),
            Some(v) => Ok([self.number(key, v)?; 3]),
        }
    }

    /// `size` or `crop_size` as (height, width) or shortest edge, accepting the forms
    /// transformers' `get_size_dict` accepts: an int, a [height, width] list, or a dict.
    fn size(&self, key: &str, int_is_square: bool) -> Result<Option<Resize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let hw = |h: &Value, w: &Value| -> Result<Resize> {
            Ok(Resize::Exact {
                height: self.pixels(key, h)?,
                width: self.pixels(key, w)?,
            })
        };
        match v {
            Value::Number(_) if int_is_square => hw(v, v).map(Some),
            Value::Number(_) => Ok(Some(Resize::ShortestEdge(self.pixels(key, v)?))),
            Value::Array(a) if a.len() == 2 => hw(&a[0], &a[1]).map(Some),
            Value::Object(m) => {
                let keys: Vec<&str> = m
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, _)| k.as_str())
                    .collect();
                match keys.as_slice() {
                    ["shortest_edge"] => Ok(Some(Resize::ShortestEdge(
                        self.pixels(key, &m["shortest_edge"])?,
                    ))),
                    ["height", "width"] | ["width", "height"] => {
                        hw(&m["height"], &m["width"]).map(Some)
                    }
                    _ => Err(self.err(format!(
                        "{key} has keys {keys:?}; supported are {{\"shortest_edge\": n}} and \
                         {{\"height\": h, \"width\": w}} (LLaVA-1.5 uses shortest_edge)"
                    ))),
                }
            }
            _ => Err(self.err(format!(
                "{key} is {v}; write {{\"shortest_edge\": n}}, {{\"height\": h, \"width\": w}} \
                 or a number"
            ))),
        }
    }
}

impl ImageProcessor {
    /// Reads `preprocessor_config.json` (as in a `llava-hf/llava-1.5-*-hf` folder).
    /// Missing or `null` fields take transformers' `CLIPImageProcessor` defaults; unknown
    /// fields are ignored. Errors name the file: unreadable, not JSON, a field of the
    /// wrong type or out of range, a `resample` other than 3 (bicubic), a `size` form
    /// other than `shortest_edge` or `height`/`width`, or an `image_processor_type`
    /// that is not CLIP's (other processors, e.g. LLaVA-NeXT's, preprocess differently).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            message: format!(
                "cannot read the preprocessor config: {e}. It is the preprocessor_config.json \
                 of the model folder"
            ),
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| {
            Error::Format(format!(
                "{}: not valid JSON: {e}. Re-download preprocessor_config.json",
                path.display()
            ))
        })?;
        let Value::Object(map) = &json else {
            return Err(Error::Format(format!(
                "{}: expected a JSON object of processor settings, found {}",
                path.display(),
                kind(&json)
            )));
        };
        Self::from_fields(&Fields { path, map })
    }

    fn from_fields(f: &Fields) -> Result<Self> {
        let d = ImageProcessor::default();
        if let Some(t) = f.get("image_processor_type") {
            let ok = matches!(
                t.as_str(),
                Some("CLIPImageProcessor" | "CLIPImageProcessorFast" | "CLIPImageProcessorPil")
            );
            if !ok {
                return Err(f.err(format!(
                    "image_processor_type is {t}; only CLIPImageProcessor (LLaVA-1.5's) is \
                     implemented"
                )));
            }
        }
        if f.bool("do_pad", false)? {
            let msg = "do_pad is true; batch padding is not implemented (LLaVA-1.5 does not pad)";
            return Err(f.err(msg.into()));
        }
        // CLIPImageProcessor's class attribute: a bare int `size` means the short side.
        let int_is_square = f.bool("default_to_square", false)?;
        let do_resize = f.bool("do_resize", d.do_resize)?;
        let size = f.size("size", int_is_square)?.unwrap_or(d.size);
        let (crop_height, crop_width) = match f.size("crop_size", true)? {
            None => (d.crop_height, d.crop_width),
            Some(Resize::Exact { height, width }) => (height, width),
            Some(Resize::ShortestEdge(_)) => {
                let msg = r#"crop_size has shortest_edge; write {"height": h, "width": w}"#;
                return Err(f.err(msg.into()));
            }
        };
        if let Some(v) = f.get("resample") {
            let r = v.as_i64();
            if do_resize && r != Some(BICUBIC) {
                let name = match r {
                    Some(0) => " (nearest)",
                    Some(1) => " (Lanczos)",
                    Some(2) => " (bilinear)",
                    Some(4) => " (box)",
                    Some(5) => " (Hamming)",
                    _ => "",
                };
                return Err(f.err(format!(
                    "resample is {v}{name}; only 3 (bicubic, as CLIP and LLaVA-1.5 use) is \
                     implemented"
                )));
            }
        }
        let rescale_factor = match f.get("rescale_factor") {
            None => d.rescale_factor,
            Some(v) => f.number("rescale_factor", v)?,
        };
        let image_std = f.triple("image_std", d.image_std)?;
        if image_std.contains(&0.0) {
            return Err(f.err(format!(
                "image_std is {image_std:?}; a zero would divide by zero (CLIP's is \
                 [0.26862954, 0.26130258, 0.27577711])"
            )));
        }
        Ok(ImageProcessor {
            do_resize,
            size,
            do_center_crop: f.bool("do_center_crop", d.do_center_crop)?,
            crop_height,
            crop_width,
            do_rescale: f.bool("do_rescale", d.do_rescale)?,
            rescale_factor,
            do_normalize: f.bool("do_normalize", d.do_normalize)?,
            image_mean: f.triple("image_mean", d.image_mean)?,
            image_std,
            do_convert_rgb: f.bool("do_convert_rgb", d.do_convert_rgb)?,
        })
    }

    /// The `(height, width)` an image of `width` x `height` pixels has after
    /// [`preprocess`](Self::preprocess) in `mode`; `pixel_values` hold `3 * height *
    /// width` values. With the LLaVA-1.5 settings this is always the crop size.
    pub fn output_size(&self, width: u32, height: u32, mode: AspectMode) -> (u32, u32) {
        let (w, h) = match mode {
            AspectMode::Pad => (width.max(height), width.max(height)),
            AspectMode::Crop => (width, height),
        };
        let (w, h) = if self.do_resize {
            self.resize_target(w, h)
        } else {
            (w, h)
        };
        if self.do_center_crop {
            (self.crop_height, self.crop_width)
        } else {
            (h, w)
        }
    }

    /// (width, height) after the resize step: transformers'
    /// `get_resize_output_image_size(default_to_square=False)`.
    fn resize_target(&self, width: u32, height: u32) -> (u32, u32) {
        match self.size {
            Resize::Exact { height, width } => (width, height),
            Resize::ShortestEdge(s) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python: int(s * long / short), an exact product, a correctly rounded
                // true division, then truncation; f64 does the same for these magnitudes.
                let new_long = (u64::from(s) * u64::from(long)) as f64 / f64::from(short.max(1));
                let new_long = new_long.min(f64::from(u32::MAX)) as u32;
                if width <= height {
                    (s, new_long)
                } else {
                    (new_long, s)
                }
            }
        }
    }

    /// One image's `pixel_values`: channel-first (R, G, B planes), f32, row-major, of
    /// the size [`output_size`](Self::output_size) gives. Equal, value for value, to
    /// what transformers' `CLIPImageProcessorPil` returns for the same RGB pixels (and,
    /// in [`AspectMode::Pad`], to LLaVA-1.5's `expand2square` followed by it).
    ///
    /// Errors: an image with no pixels, or a padded square, resize target or output
    /// above [`MAX_PIXELS`] (checked before anything is allocated).
    pub fn preprocess(&self, img: &RgbImage, mode: AspectMode) -> Result<Vec<f32>> {
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            return Err(Error::Shape(format!(
                "preprocess: the image is {w}x{h} pixels; it needs at least one pixel"
            )));
        }
        // Each stage's size is checked before anything is allocated.
        let check = |what: &str, w: u32, h: u32| -> Result<()> {
            if u64::from(w) * u64::from(h) <= MAX_PIXELS {
                return Ok(());
            }
            Err(Error::Shape(format!(
                "preprocess: the {what} would be {w}x{h} pixels, more than {MAX_PIXELS}; \
                 check the image and the size / crop_size of the preprocessor config"
            )))
        };
        let (w0, h0) = match mode {
            AspectMode::Pad => (w.max(h), w.max(h)),
            AspectMode::Crop => (w, h),
        };
        check("padded square", w0, h0)?;
        if self.do_resize {
            let (tw, th) = self.resize_target(w0, h0);
            check("resized image", tw, th)?;
        }
        let (out_h, out_w) = self.output_size(w, h, mode);
        check("output", out_w, out_h)?;
        let std_ok = self.image_std.iter().all(|s| s.is_finite() && *s != 0.0);
        if self.do_normalize && !std_ok {
            return Err(Error::Config(format!(
                "preprocess: image_std is {:?}; every value must be finite and non-zero",
                self.image_std
            )));
        }
        let padded;
        let img = match mode {
            AspectMode::Pad if w != h => {
                // Python's int(x * 255), and Pillow clips the colour to 0..=255: a
                // saturating cast does both.
                let fill = self.image_mean.map(|m| (m * 255.0) as u8);
                padded = expand_to_square(img, fill);
                &padded
            }
            _ => img,
        };
        let resized;
        let img = if self.do_resize {
            let (tw, th) = self.resize_target(img.width(), img.height());
            resized = resize_bicubic(img, tw, th)?;
            &resized
        } else {
            img
        };
        let (ch, cw) = if self.do_center_crop {
            (self.crop_height, self.crop_width)
        } else {
            (img.height(), img.width())
        };
        Ok(self.to_pixel_values(img, ch, cw))
    }

    /// Centre crop (transformers' `center_crop`: top-left offset `(size - crop) // 2`,
    /// black where the crop reaches past the image), then rescale and normalise in the
    /// dtypes transformers uses.
    fn to_pixel_values(&self, img: &RgbImage, ch: u32, cw: u32) -> Vec<f32> {
        let (w, h) = (i64::from(img.width()), i64::from(img.height()));
        // Python's floor division; negative when the image is smaller than the crop.
        let top = (h - i64::from(ch)).div_euclid(2);
        let left = (w - i64::from(cw)).div_euclid(2);
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        let raw = img.as_raw();
        let mut out = Vec::with_capacity(3 * ch as usize * cw as usize);
        for c in 0..3 {
            for y in 0..i64::from(ch) {
                let sy = y + top;
                for x in 0..i64::from(cw) {
                    let sx = x + left;
                    let inside = (0..h).contains(&sy) && (0..w).contains(&sx);
                    let v = if inside {
                        raw[((sy * w + sx) * 3) as usize + c]
                    } else {
                        0
                    };
                    // rescale: u8 -> float64, times the factor, then to float32;
                    // normalise: float32 throughout.
                    let mut f = if self.do_rescale {
                        (f64::from(v) * self.rescale_factor) as f32
                    } else {
                        f32::from(v)
                    };
                    if self.do_normalize {
                        f = (f - mean[c]) / std[c];
                    }
                    out.push(f);
                }
            }
        }
        out
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// LLaVA-1.5's `expand2square`: the image pasted at `((side - w) // 2, (side - h) // 2)`
/// on a `side` x `side` canvas of `fill`, `side = max(w, h)`.
fn expand_to_square(img: &RgbImage, fill: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    let side = w.max(h);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(fill));
    let (dx, dy) = ((side - w) / 2, (side - h) / 2);
    let row = 3 * w as usize;
    let (src, dst) = (img.as_raw(), &mut *out);
    for y in 0..h as usize {
        let at = ((y + dy as usize) * side as usize + dx as usize) * 3;
        dst[at..at + row].copy_from_slice(&src[y * row..(y + 1) * row]);
    }
    out
}

/// Reads a PNG or JPEG file (recognised by content, not name) as 8-bit RGB, as
/// `PIL.Image.open(path).convert("RGB")` gives it: grey replicated to three channels,
/// alpha (and tRNS transparency) dropped without compositing, palettes looked up,
/// 1/2/4-bit grey scaled to 0..=255, 16-bit samples reduced as Pillow does (grey clipped
/// at 255, colour and grey+alpha by their high byte). PNG pixels equal Pillow's exactly;
/// JPEG pixels can differ from Pillow's (libjpeg-turbo) by a few levels.
///
/// Errors name the file: unreadable, not PNG/JPEG, corrupt or truncated, zero pixels,
/// or more than [`MAX_PIXELS`].
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        message: format!("cannot read the image: {e}"),
    })?;
    decode(&bytes).map_err(|msg| Error::Format(format!("{}: {msg}", path.display())))
}

/// Decodes `bytes`; the error is a message without the file name.
fn decode(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => f,
        other => {
            let what = match other {
                Some(f) => format!("a {f:?} image"),
                None if bytes.is_empty() => "an empty file".to_string(),
                None => format!(
                    "not an image this reader knows (it starts with bytes {:02x?})",
                    &bytes[..bytes.len().min(8)]
                ),
            };
            return Err(format!(
                "{what}; only PNG and JPEG are supported: convert it (e.g. with Pillow or \
                 ImageMagick) to PNG"
            ));
        }
    };
    // The png crate rejects a zero side as invalid; say what is wrong in plain words.
    if format == ImageFormat::Png && bytes.len() >= 24 && &bytes[12..16] == b"IHDR" {
        let side = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let (w, h) = (side(16), side(20));
        if w == 0 || h == 0 {
            return Err(zero_size(w, h));
        }
    }
    let name = if format == ImageFormat::Png {
        "PNG"
    } else {
        "JPEG"
    };
    let bad = |e: image::ImageError| {
        format!(
            "cannot decode this {name} file: {}. It is corrupt or truncated: re-export or \
             re-download it",
            e.to_string().trim_end()
        )
    };
    let decoder = reader.into_decoder().map_err(bad)?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels == 0 {
        return Err(zero_size(w, h));
    }
    if pixels > MAX_PIXELS {
        return Err(format!(
            "the image is {w}x{h} = {pixels} pixels, more than the {MAX_PIXELS} that Pillow \
             accepts (a possible decompression bomb); downscale it first"
        ));
    }
    let img = DynamicImage::from_decoder(decoder).map_err(bad)?;
    // A 16-bit grey PNG with tRNS decodes as grey+alpha, like a true grey+alpha PNG, but
    // Pillow reduces the two differently; the header's colour type tells them apart.
    let grey16 = format == ImageFormat::Png && bytes.len() > 25 && bytes[25] == 0;
    Ok(to_rgb(img, grey16))
}

fn zero_size(w: u32, h: u32) -> String {
    format!("the image is {w}x{h} pixels (its header says so); an image needs at least one pixel")
}

/// Pillow's `convert("RGB")` for every layout the PNG and JPEG decoders produce.
fn to_rgb(img: image::DynamicImage, png_grey: bool) -> RgbImage {
    use image::DynamicImage as D;

    let (w, h) = (img.width(), img.height());
    // Pillow opens 16-bit grey as I;16 and converts by clipping at 255; 16-bit colour
    // and grey+alpha it opens through the RGB;16B / LA;16B unpackers, which keep the
    // high byte.
    let grey16 = |v: u16| {
        if png_grey {
            v.min(255) as u8
        } else {
            (v >> 8) as u8
        }
    };
    let high = |v: u16| (v >> 8) as u8;
    let raw: Vec<u8> = match img {
        D::ImageRgb8(b) => return b,
        D::ImageLuma8(b) => b.into_raw().into_iter().flat_map(|v| [v; 3]).collect(),
        D::ImageLumaA8(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0]; 3])
            .collect(),
        D::ImageRgba8(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        D::ImageLuma16(b) => b
            .into_raw()
            .into_iter()
            .flat_map(|v| [v.min(255) as u8; 3])
            .collect(),
        D::ImageLumaA16(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [grey16(p[0]); 3])
            .collect(),
        D::ImageRgb16(b) => b.into_raw().into_iter().map(high).collect(),
        D::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [high(p[0]), high(p[1]), high(p[2])])
            .collect(),
        // Float layouts come from neither decoder; keep a sane conversion anyway.
        other => return other.to_rgb8(),
    };
    RgbImage::from_raw(w, h, raw).unwrap_or_else(|| RgbImage::new(w, h))
}

/// Resizes `img` to `width` x `height` with Pillow's bicubic filter, exactly as
/// `Image.resize((width, height), Image.BICUBIC)` does on an RGB image in Pillow 13.0.
///
/// Pillow resamples in two passes rounded to u8 in between, so their order shows in the
/// output. Pillow 13.0 runs the vertical pass first when the height shrinks by more than
/// twice as many pixels as the width (a portrait image over 2:1 being shrunk, say);
/// Pillow 12.1 and older always run the horizontal pass first, so for those resizes
/// they give results a level or so apart from these.
///
/// Errors: a zero-size input or output, or an output above [`MAX_PIXELS`].
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    let full = [0.0, 0.0, img.width() as f32, img.height() as f32];
    resize_bicubic_box(img, width, height, full)
}

/// [`resize_bicubic`] of the region `region = [left, top, right, bottom]` (in input
/// pixels, fractional allowed), as `Image.resize(size, Image.BICUBIC, box=region)`:
/// Pillow takes the region as C floats, so it is `f32` here too. A region with integral
/// corners and the output's size is copied, as Pillow copies it.
///
/// Errors: a zero-size input or output, an output above [`MAX_PIXELS`], or a region
/// that is not finite, starts below 0, ends past the image, or has negative size.
pub fn resize_bicubic_box(
    img: &RgbImage,
    width: u32,
    height: u32,
    region: [f32; 4],
) -> Result<RgbImage> {
    let (in_w, in_h) = img.dimensions();
    let [x0, y0, x1, y1] = region;
    let fail = |msg: String| Err(Error::Shape(format!("resize_bicubic: {msg}")));
    if in_w == 0 || in_h == 0 {
        return fail(format!(
            "the input is {in_w}x{in_h} pixels; it needs at least one"
        ));
    }
    if width == 0 || height == 0 {
        return fail(format!(
            "the output {width}x{height} has no pixels; both sides must be >= 1"
        ));
    }
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return fail(format!(
            "the output {width}x{height} is more than {MAX_PIXELS} pixels"
        ));
    }
    if !region.iter().all(|v| v.is_finite())
        || x0 < 0.0
        || y0 < 0.0
        || x1 > in_w as f32
        || y1 > in_h as f32
        || x1 - x0 < 0.0
        || y1 - y0 < 0.0
    {
        return fail(format!(
            "region {region:?} must lie within [0, 0, {in_w}, {in_h}] with left <= right and \
             top <= bottom"
        ));
    }
    // Pillow's _resize: an integral region of exactly the output's size is a crop.
    if x0.fract() == 0.0 && x1 - x0 == width as f32 && y0.fract() == 0.0 && y1 - y0 == height as f32
    {
        let (x0, y0) = (x0 as usize, y0 as usize);
        let row = 3 * width as usize;
        let mut raw = Vec::with_capacity(row * height as usize);
        for y in y0..y0 + height as usize {
            let at = (y * in_w as usize + x0) * 3;
            raw.extend_from_slice(&img.as_raw()[at..at + row]);
        }
        return Ok(RgbImage::from_raw(width, height, raw).unwrap_or_else(|| RgbImage::new(0, 0)));
    }
    Ok(resample(img, width, height, region))
}

// ----- A port of Pillow's separable resampler (src/libImaging/Resample.c), bicubic,
// 8 bits per channel. Written from the algorithm; the arithmetic follows Pillow's
// order step for step because every rounding shows in the output bytes.

/// Bits of fraction in the fixed-point weights: 32 - 8 (pixel) - 2 (overflow room).
const PRECISION_BITS: u32 = 32 - 8 - 2;
const BICUBIC_SUPPORT: f64 = 2.0;

/// Pillow's bicubic kernel, a = -0.5 (Keys), evaluated in Pillow's operation order.
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

/// Fixed-point weights of one pass: output pixel `i` reads `len[i]` input pixels from
/// `first[i]` with weights `k[i * ksize..][..len[i]]`.
struct Coeffs {
    ksize: usize,
    first: Vec<usize>,
    len: Vec<usize>,
    k: Vec<i32>,
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for one axis: `in_size`
/// input pixels, the region `[in0, in1)` of them, `out_size` outputs.
fn precompute_coeffs(in_size: u32, in0: f32, in1: f32, out_size: u32) -> Coeffs {
    // (in1 - in0) is a float subtraction in C, then widened.
    let scale = f64::from(in1 - in0) / f64::from(out_size);
    // Downscaling widens the kernel by the scale so every input pixel contributes.
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let n = out_size as usize;
    let (mut first, mut len, mut k) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        vec![0; n * ksize],
    );
    let mut w = vec![0.0f64; ksize];
    for xx in 0..n {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // C's (int) truncates toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
        let count = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let mut ww = 0.0;
        for (x, wx) in w[..count].iter_mut().enumerate() {
            *wx = bicubic(((x as i64 + xmin) as f64 - center + 0.5) * inv_filterscale);
            ww += *wx;
        }
        let kx = &mut k[xx * ksize..xx * ksize + count];
        for (kv, &wx) in kx.iter_mut().zip(&w[..count]) {
            let wx = if ww != 0.0 { wx / ww } else { wx };
            let scaled = wx * f64::from(1u32 << PRECISION_BITS);
            *kv = if wx < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        first.push(xmin as usize);
        len.push(count);
    }
    Coeffs {
        ksize,
        first,
        len,
        k,
    }
}

/// Rounds a fixed-point sum (which started at one half) to a u8, clipping: Pillow's
/// `clip8` (an arithmetic shift, then a lookup table that saturates).
fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `ImagingResampleInner` for RGB: two separable passes, each rounded to u8,
/// the first computed only over the rows (or columns) the second reads; a pass is
/// skipped when its axis keeps its size and region.
///
/// The order is Pillow 13.0's: vertical first when the height shrinks by more than
/// twice as many pixels as the width (`in_h - out_h > 2 * (in_w - out_w)`, `out_h <
/// in_h`; sizes of the whole image, not of the region), horizontal first otherwise.
/// Pillow 13.0 was probed for this rule (about 4,000 size and region pairs whose two
/// orders give different bytes; no exception), as its source was not at hand. Pillow 12.1 and older always go horizontal first (12.2
/// and 12.3 went vertical first only for images over 100 times taller than wide); the
/// order changes the intermediate rounding, so such resizes differ from those Pillow
/// versions by a level or so.
fn resample(img: &RgbImage, out_w: u32, out_h: u32, region: [f32; 4]) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    let need_h = out_w != in_w || region[0] != 0.0 || region[2] != out_w as f32;
    let need_v = out_h != in_h || region[1] != 0.0 || region[3] != out_h as f32;
    let src = Plane {
        data: img.as_raw(),
        w: in_w as usize,
    };
    let raw = match (need_h, need_v) {
        (false, false) => img.as_raw().clone(),
        (true, false) => {
            let horiz = precompute_coeffs(in_w, region[0], region[2], out_w);
            horizontal_pass(src, 0..in_h as usize, 0, &horiz)
        }
        (false, true) => {
            let vert = precompute_coeffs(in_h, region[1], region[3], out_h);
            vertical_pass(src, 0..in_w as usize, 0, &vert)
        }
        (true, true) => {
            let horiz = precompute_coeffs(in_w, region[0], region[2], out_w);
            let vert = precompute_coeffs(in_h, region[1], region[3], out_h);
            let shrink_h = i64::from(in_h) - i64::from(out_h);
            if out_h < in_h && shrink_h > 2 * (i64::from(in_w) - i64::from(out_w)) {
                let cols = horiz.span();
                let temp = vertical_pass(src, cols.clone(), 0, &vert);
                let temp = Plane {
                    data: &temp,
                    w: cols.len(),
                };
                horizontal_pass(temp, 0..out_h as usize, cols.start, &horiz)
            } else {
                let rows = vert.span();
                let temp = horizontal_pass(src, rows.clone(), 0, &horiz);
                let temp = Plane {
                    data: &temp,
                    w: out_w as usize,
                };
                vertical_pass(temp, 0..out_w as usize, rows.start, &vert)
            }
        }
    };
    RgbImage::from_raw(out_w, out_h, raw).unwrap_or_else(|| RgbImage::new(0, 0))
}

impl Coeffs {
    /// The input pixels any output reads: `first` of the first output to the end of
    /// the last one's window (windows move monotonically).
    fn span(&self) -> std::ops::Range<usize> {
        let last = self.first.len() - 1;
        self.first[0]..self.first[last] + self.len[last]
    }
}

/// Packed RGB rows `w` pixels wide.
#[derive(Clone, Copy)]
struct Plane<'a> {
    data: &'a [u8],
    w: usize,
}

/// Horizontal pass over `rows` of `src`, whose column 0 is input column `col0`; the
/// output has `rows.len()` rows.
fn horizontal_pass(src: Plane, rows: std::ops::Range<usize>, col0: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.first.len();
    let mut out = Vec::with_capacity(rows.len() * out_w * 3);
    let half = 1i64 << (PRECISION_BITS - 1);
    for y in rows {
        let line = &src.data[y * src.w * 3..(y + 1) * src.w * 3];
        for xx in 0..out_w {
            let k = &c.k[xx * c.ksize..xx * c.ksize + c.len[xx]];
            let x0 = c.first[xx] - col0;
            let px = &line[x0 * 3..(x0 + c.len[xx]) * 3];
            let mut ss = [half; 3];
            for (p, &kx) in px.chunks_exact(3).zip(k) {
                for ch in 0..3 {
                    ss[ch] += i64::from(p[ch]) * i64::from(kx);
                }
            }
            out.extend(ss.map(clip8));
        }
    }
    out
}

/// Vertical pass over columns `cols` of `src`, whose row 0 is input row `row0`; the
/// output is `cols.len()` pixels wide.
fn vertical_pass(src: Plane, cols: std::ops::Range<usize>, row0: usize, c: &Coeffs) -> Vec<u8> {
    let out_h = c.first.len();
    let (stride, width) = (src.w * 3, cols.len() * 3);
    let mut out = vec![0u8; out_h * width];
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut ss = vec![0i64; width];
    for (yy, row) in out.chunks_exact_mut(width.max(1)).enumerate().take(out_h) {
        ss.fill(half);
        let k = &c.k[yy * c.ksize..yy * c.ksize + c.len[yy]];
        for (y, &ky) in k.iter().enumerate() {
            let at = (c.first[yy] + y - row0) * stride + cols.start * 3;
            for (s, &p) in ss.iter_mut().zip(&src.data[at..at + width]) {
                *s += i64::from(p) * i64::from(ky);
            }
        }
        for (o, &s) in row.iter_mut().zip(&ss) {
            *o = clip8(s);
        }
    }
    out
}
