//! The synthetic multimodal task: determinism, answers recomputed from the scene,
//! scene validity, the collated layout, vocabulary bounds, errors, class balance,
//! image statistics, the per-split question mix, baselines and the PPM preview.
mod common;

use std::collections::HashMap;

use dualpriv::data::synthetic::{
    ascii_preview, encode_ppm, majority_baseline, write_ppm, Dataset, Example, Object,
    QuestionKind, Split, Vocab, BOS, MIN_GAP, PAD, SCENE_UNITS, SEP, VOCAB_SIZE,
};
use dualpriv::Error;

fn gen(split: Split, n: usize, seed: u64) -> Dataset {
    Dataset::generate(split, n, seed, 32).expect("generate")
}

/// The object of `ex` with the given colour word.
fn by_color<'a>(ex: &'a Example, word: &str) -> &'a Object {
    let hits: Vec<_> = ex
        .scene
        .objects
        .iter()
        .filter(|o| o.color.word() == word)
        .collect();
    assert_eq!(hits.len(), 1, "colour {word} must name exactly one object");
    hits[0]
}

/// The answer to `ex`'s question, computed from its scene and its decoded words.
fn recompute(ex: &Example) -> String {
    let v = Vocab::new();
    let words: Vec<&str> = ex
        .question()
        .iter()
        .map(|&id| v.word(id).unwrap())
        .collect();
    let objs = &ex.scene.objects;
    match words.as_slice() {
        ["what", "color", "is", "the", shape, "?"] => {
            let hits: Vec<_> = objs.iter().filter(|o| o.shape.word() == *shape).collect();
            assert_eq!(hits.len(), 1, "shape {shape} must name exactly one object");
            hits[0].color.word().to_string()
        }
        ["what", "shape", "is", "the", color, "object", "?"] => {
            by_color(ex, color).shape.word().to_string()
        }
        ["how", "many", "shapes", "are", "there", "?"] => {
            ["one", "two", "three"][objs.len() - 1].to_string()
        }
        ["is", "the", c1, "shape", "left", "or", "right", "of", "the", c2, "shape", "?"] => {
            let (a, b) = (by_color(ex, c1), by_color(ex, c2));
            let (a0, _, a1, _) = a.bbox();
            let (b0, _, b1, _) = b.bbox();
            if a1 + MIN_GAP <= b0 {
                "left".into()
            } else if b1 + MIN_GAP <= a0 {
                "right".into()
            } else {
                panic!("left/right question without a clear gap: {a:?} {b:?}")
            }
        }
        ["is", "the", c1, "shape", "above", "or", "below", "the", c2, "shape", "?"] => {
            let (a, b) = (by_color(ex, c1), by_color(ex, c2));
            let (_, a0, _, a1) = a.bbox();
            let (_, b0, _, b1) = b.bbox();
            if a1 + MIN_GAP <= b0 {
                "above".into()
            } else if b1 + MIN_GAP <= a0 {
                "below".into()
            } else {
                panic!("above/below question without a clear gap: {a:?} {b:?}")
            }
        }
        other => panic!("unexpected question {other:?}"),
    }
}

fn kind_of_question(ex: &Example) -> QuestionKind {
    let v = Vocab::new();
    let w = |i: usize| v.word(ex.question()[i]).unwrap();
    match (w(0), w(1)) {
        ("what", "color") => QuestionKind::Color,
        ("what", "shape") => QuestionKind::Shape,
        ("how", _) => QuestionKind::Count,
        ("is", _) if w(4) == "left" => QuestionKind::LeftRight,
        ("is", _) => QuestionKind::AboveBelow,
        _ => panic!("unknown question"),
    }
}

#[test]
fn determinism_and_distinct_streams() {
    let a = gen(Split::Private, 300, 7);
    let b = gen(Split::Private, 300, 7);
    let k = [7u8; 32];
    assert_eq!(a.fingerprint(&k), b.fingerprint(&k));
    assert_eq!(a.examples, b.examples);
    assert_eq!(a.fingerprint(&k).len(), 32);
    assert_ne!(
        a.fingerprint(&k),
        gen(Split::Private, 300, 8).fingerprint(&k)
    );
    assert_ne!(a.fingerprint(&k), gen(Split::Test, 300, 7).fingerprint(&k));
    assert_ne!(
        a.fingerprint(&k),
        gen(Split::Public, 300, 7).fingerprint(&k)
    );
    // Keyed: another ledger key gives an unrelated fingerprint of the same data.
    assert_ne!(a.fingerprint(&k), a.fingerprint(&[8u8; 32]));
    // Per-example streams: a prefix of a larger dataset is the smaller dataset.
    let big = gen(Split::Private, 400, 7);
    assert_eq!(&big.examples[..300], &a.examples[..]);
    assert_ne!(big.fingerprint(&k), a.fingerprint(&k));
    // Private and Test share no example.
    let t = gen(Split::Test, 300, 7);
    for e in &t.examples {
        assert!(!a.examples.iter().any(|p| p.image == e.image));
    }
}

#[test]
fn answers_match_the_scene() {
    for split in [Split::Public, Split::Private, Split::Test] {
        let d = gen(split, 1500, 11);
        let v = Vocab::new();
        for (i, ex) in d.examples.iter().enumerate() {
            assert_eq!(ex.kind, kind_of_question(ex), "example {i}");
            let want = recompute(ex);
            assert_eq!(v.word(ex.answer), Some(want.as_str()), "example {i}");
            assert_eq!(*ex.input_ids.last().unwrap(), ex.answer);
            assert!(ex.kind.answer_set().contains(&ex.answer));
        }
    }
}

#[test]
fn scenes_are_valid() {
    let d = gen(Split::Private, 2000, 3);
    for ex in &d.examples {
        let objs = &ex.scene.objects;
        assert!((1..=3).contains(&objs.len()));
        if ex.kind.is_position() {
            assert!(objs.len() >= 2);
        }
        for (i, a) in objs.iter().enumerate() {
            // A lone object is drawn larger (12–20 units) than objects that share
            // the canvas (6–12).
            let sizes = if objs.len() == 1 {
                12.0..=20.0
            } else {
                6.0..=12.0
            };
            assert!(
                sizes.contains(&a.size),
                "size {} with {} objects",
                a.size,
                objs.len()
            );
            let (x0, y0, x1, y1) = a.bbox();
            assert!(x0 >= 0.0 && y0 >= 0.0 && x1 <= SCENE_UNITS && y1 <= SCENE_UNITS);
            for b in &objs[i + 1..] {
                assert_ne!(a.shape, b.shape);
                assert_ne!(a.color, b.color);
                let (bx0, by0, bx1, by1) = b.bbox();
                let apart = x1 + MIN_GAP <= bx0
                    || bx1 + MIN_GAP <= x0
                    || y1 + MIN_GAP <= by0
                    || by1 + MIN_GAP <= y0;
                assert!(apart, "overlapping objects {a:?} {b:?}");
            }
        }
    }
}

#[test]
fn collate_layout() {
    let d = gen(Split::Test, 64, 5);
    let t = d.max_text_len();
    assert_eq!(t, 15);
    let idx = [3usize, 0, 63, 3, 17];
    for text_len in [t, t + 4] {
        let b = d.collate(&idx, text_len).unwrap();
        assert_eq!(b.size, idx.len());
        assert_eq!(b.image_size, 32);
        assert_eq!(b.text_len, text_len);
        assert_eq!(b.example_ids, idx);
        let px = 3 * 32 * 32;
        assert_eq!(b.images.len(), idx.len() * px);
        assert_eq!(b.input_ids.len(), idx.len() * text_len);
        assert_eq!(b.targets.len(), idx.len() * text_len);
        assert_eq!(b.loss_mask.len(), idx.len() * text_len);
        for (row, &i) in idx.iter().enumerate() {
            let ex = &d.examples[i];
            assert_eq!(&b.images[row * px..(row + 1) * px], &ex.image[..]);
            let ids = &b.input_ids[row * text_len..(row + 1) * text_len];
            let tg = &b.targets[row * text_len..(row + 1) * text_len];
            let m = &b.loss_mask[row * text_len..(row + 1) * text_len];
            let len = ex.input_ids.len();
            assert_eq!(ids[0], BOS);
            assert_eq!(ids[len - 2], SEP);
            assert_eq!(ids[len - 1], ex.answer);
            assert_eq!(&ids[..len], &ex.input_ids[..]);
            assert!(ids[len..].iter().all(|&x| x == PAD));
            for p in 0..text_len {
                let next = if p + 1 < text_len { ids[p + 1] } else { PAD };
                assert_eq!(tg[p], next, "targets are input_ids shifted left");
            }
            assert_eq!(tg[text_len - 1], PAD);
            let masked: Vec<usize> = (0..text_len).filter(|&p| m[p] != 0.0).collect();
            assert_eq!(masked, vec![ex.answer_position()]);
            assert_eq!(m[ex.answer_position()], 1.0);
            assert_eq!(tg[ex.answer_position()], ex.answer);
        }
    }
}

#[test]
fn collating_into_a_used_batch_leaves_nothing_of_it() {
    // A training step collates into the batch the last step used (the thread's
    // reused buffers): nothing of the earlier examples may remain, whatever the
    // sizes, or one step's examples would reach another's gradient.
    use dualpriv::data::DataSource;
    let d = gen(Split::Test, 64, 5);
    let t = d.max_text_len();
    let mut scratch = d.collate(&[1, 2, 3, 4, 5, 6, 7, 8], t + 6).unwrap();
    // A spliced layout left over from another data source must go too.
    scratch.image_pos = Some(vec![Some(1); 8]);
    for (idx, text_len) in [(vec![9usize, 0, 63], t), (vec![], t), (vec![5; 9], t + 2)] {
        DataSource::collate_into(&d, &idx, text_len, &mut scratch).unwrap();
        assert_eq!(scratch, d.collate(&idx, text_len).unwrap(), "{idx:?}");
    }
}

#[test]
fn empty_collate_and_empty_dataset() {
    let d = gen(Split::Private, 10, 1);
    let b = d.collate(&[], 16).unwrap();
    assert_eq!(b.size, 0);
    assert!(b.images.is_empty() && b.input_ids.is_empty() && b.targets.is_empty());
    assert!(b.loss_mask.is_empty() && b.example_ids.is_empty());
    let e = gen(Split::Private, 0, 1);
    assert!(e.is_empty());
    assert_eq!(e.len(), 0);
    assert_eq!(e.max_text_len(), 0);
    assert_eq!(e.collate(&[], 16).unwrap().size, 0);
    assert_eq!(e.baselines().majority, 0.0);
    assert_eq!(
        e.fingerprint(&[0; 32]),
        gen(Split::Test, 0, 9).fingerprint(&[0; 32])
    );
}

#[test]
fn errors_for_bad_arguments() {
    for s in [0usize, 1, 7, 5000] {
        assert!(matches!(
            Dataset::generate(Split::Private, 4, 0, s),
            Err(Error::Config(_))
        ));
    }
    assert!(matches!(
        Dataset::generate(Split::Private, usize::MAX / 2, 0, 32),
        Err(Error::Config(_))
    ));
    let d = gen(Split::Private, 20, 2);
    let t = d.max_text_len();
    assert!(matches!(d.collate(&[0, 20], t), Err(Error::Shape(_))));
    let longest = (0..20)
        .find(|&i| d.examples[i].input_ids.len() == t)
        .unwrap();
    assert!(matches!(d.collate(&[longest], t - 1), Err(Error::Shape(_))));
    assert!(matches!(d.collate(&[longest], 0), Err(Error::Shape(_))));
    let mut broken = d.clone();
    broken.examples[0].input_ids.clear();
    assert!(broken.examples[0].question().is_empty());
    assert!(matches!(broken.collate(&[0], t), Err(Error::Shape(_))));
    broken.examples[1].answer = PAD;
    assert!(matches!(broken.collate(&[1], t), Err(Error::Shape(_))));
    assert!(Vocab::new().encode("what colour").is_err());
    assert!(matches!(encode_ppm(&[0.0; 10], 32), Err(Error::Shape(_))));
    assert!(ascii_preview(&[0.0; 3], 0).is_err());
}

#[test]
fn vocabulary_bounds_and_round_trip() {
    const { assert!(VOCAB_SIZE <= 64) };
    let v = Vocab::new();
    assert_eq!(v.len(), VOCAB_SIZE);
    for id in 0..VOCAB_SIZE as u32 {
        assert_eq!(v.id(v.word(id).unwrap()), Some(id));
    }
    assert_eq!(v.word(VOCAB_SIZE as u32), None);
    let ids = v.encode("what color is the circle ?").unwrap();
    assert_eq!(v.decode(&ids), "what color is the circle ?");
    assert_eq!(v.decode(&[BOS, PAD, 99]), "<bos> <99>");
    for split in [Split::Public, Split::Private, Split::Test] {
        let d = gen(split, 1000, 4);
        for ex in &d.examples {
            assert!(ex.input_ids.iter().all(|&id| (id as usize) < VOCAB_SIZE));
            assert!(ex
                .question()
                .iter()
                .all(|&id| id != PAD && id != BOS && id != SEP));
        }
    }
}

fn answer_counts(d: &Dataset) -> HashMap<QuestionKind, HashMap<u32, usize>> {
    let mut m: HashMap<QuestionKind, HashMap<u32, usize>> = HashMap::new();
    for ex in &d.examples {
        *m.entry(ex.kind).or_default().entry(ex.answer).or_default() += 1;
    }
    m
}

#[test]
fn answer_classes_are_balanced() {
    for split in [Split::Public, Split::Private] {
        let d = gen(split, 4000, 21);
        let by_kind = answer_counts(&d);
        let kinds = split.kind_mix().iter().filter(|&&f| f > 0.0).count();
        assert_eq!(by_kind.len(), kinds, "{split:?}: every asked kind appears");
        for (kind, counts) in by_kind {
            let total: usize = counts.values().sum();
            assert_eq!(
                counts.len(),
                kind.answer_set().len(),
                "every {kind} answer appears"
            );
            for (&a, &c) in &counts {
                let f = c as f64 / total as f64;
                assert!(f <= 0.6, "{kind}: answer {a} has frequency {f}");
                let uniform = 1.0 / kind.answer_set().len() as f64;
                assert!(
                    (f - uniform).abs() < 0.1,
                    "{kind}: answer {a} has frequency {f}, expected about {uniform}"
                );
            }
        }
    }
}

#[test]
fn question_mix_per_split() {
    let n = 4000;
    for split in [Split::Public, Split::Private, Split::Test] {
        let d = gen(split, n, 13);
        let mix = split.kind_mix();
        for (k, kind) in QuestionKind::ALL.iter().enumerate() {
            let f = d.examples.iter().filter(|e| e.kind == *kind).count() as f64 / n as f64;
            if mix[k] == 0.0 {
                assert_eq!(f, 0.0, "{split:?} has no {kind} questions");
            } else {
                assert!(
                    (f - mix[k]).abs() < 0.03,
                    "{split:?} {kind}: {f} vs {}",
                    mix[k]
                );
            }
        }
    }
    // Colour, the skill the demo's fine-tunes acquire, is rare in the Public split
    // (1/32) and half of Private and Test.
    let public = gen(Split::Public, 2000, 99);
    let colour = public
        .examples
        .iter()
        .filter(|e| e.kind == QuestionKind::Color)
        .count();
    assert!(
        (colour as f64 / 2000.0 - 1.0 / 32.0).abs() < 0.015,
        "{colour}"
    );
}

#[test]
fn image_statistics() {
    let d = gen(Split::Private, 1000, 8);
    let plane = 32 * 32;
    let (mut sum, mut sq, mut n) = ([0f64; 3], [0f64; 3], 0f64);
    let mut bg_fraction = 0.0;
    for ex in &d.examples {
        assert_eq!(ex.image.len(), 3 * plane);
        assert!(ex.image.iter().all(|x| x.is_finite()));
        for c in 0..3 {
            for &x in &ex.image[c * plane..(c + 1) * plane] {
                sum[c] += x as f64;
                sq[c] += (x as f64) * (x as f64);
            }
        }
        n += plane as f64;
        let art = ascii_preview(&ex.image, 32).unwrap();
        bg_fraction += art.chars().filter(|&ch| ch == '.').count() as f64 / plane as f64;
    }
    for c in 0..3 {
        let mean = sum[c] / n;
        let std = (sq[c] / n - mean * mean).sqrt();
        assert!(mean.abs() < 0.5, "channel {c} mean {mean}");
        assert!((0.5..2.0).contains(&std), "channel {c} std {std}");
    }
    // Most pixels are background, which is what token pruning exploits.
    let bg = bg_fraction / d.len() as f64;
    assert!(bg > 0.6 && bg < 0.98, "background fraction {bg}");
}

#[test]
fn scenes_do_not_depend_on_image_size() {
    let small = Dataset::generate(Split::Test, 6, 17, 32).unwrap();
    let large = Dataset::generate(Split::Test, 6, 17, 336).unwrap();
    let odd = Dataset::generate(Split::Test, 6, 17, 8).unwrap();
    assert_eq!(large.examples[0].image.len(), 3 * 336 * 336);
    for i in 0..6 {
        assert_eq!(small.examples[i].scene, large.examples[i].scene);
        assert_eq!(small.examples[i].input_ids, large.examples[i].input_ids);
        assert_eq!(small.examples[i].scene, odd.examples[i].scene);
        assert!(large.examples[i].image.iter().all(|x| x.is_finite()));
    }
    let b = large.collate(&[1, 2], large.max_text_len()).unwrap();
    assert_eq!(b.images.len(), 2 * 3 * 336 * 336);
}

#[test]
fn baselines_on_the_test_split() {
    let d = gen(Split::Test, 2000, 0);
    let b = d.baselines();
    println!("{b}");
    assert_eq!(majority_baseline(&d), b.majority);
    assert_eq!(b.per_kind.len(), 5);
    assert_eq!(b.per_kind.iter().map(|k| k.count).sum::<usize>(), 2000);
    // Expected ½·⅙ + ⅛·¼ + ⅛·⅓ + ¼·½ = 0.28125 for both; the empirical majority
    // is a little higher.
    assert!((b.uniform - 0.28125).abs() < 0.02, "{}", b.uniform);
    assert!(
        b.majority >= b.uniform - 0.01 && b.majority < 0.37,
        "{}",
        b.majority
    );
    for k in &b.per_kind {
        assert!(k.majority <= 0.6);
        // The majority answer really is the most frequent one of its kind.
        let hits = d
            .examples
            .iter()
            .filter(|e| e.kind == k.kind && e.answer == k.majority_answer)
            .count();
        assert_eq!(hits as f64 / k.count as f64, k.majority);
    }
    let public = gen(Split::Public, 1000, 0).baselines();
    assert_eq!(public.per_kind.len(), 5);
}

#[test]
fn ppm_preview() {
    let d = Dataset::generate(Split::Private, 4, 42, 32).unwrap();
    let dir = common::tmp_dir("ppm_preview");
    for (i, ex) in d.examples.iter().enumerate() {
        let path = dir.join(format!("example{i}.ppm"));
        write_ppm(&path, &ex.image, 32).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header = b"P6\n32 32\n255\n";
        assert_eq!(&bytes[..header.len()], header);
        assert_eq!(bytes.len(), header.len() + 3 * 32 * 32);
        assert_eq!(bytes, encode_ppm(&ex.image, 32).unwrap());
    }
    let bad = write_ppm(&dir.join("bad.ppm"), &[0.0; 5], 32).unwrap_err();
    assert_eq!(bad.kind(), std::io::ErrorKind::InvalidInput);
    if std::env::var_os("DUALPRIV_KEEP_PPM").is_some() {
        println!("kept previews in {}", dir.keep().display());
    }
}
