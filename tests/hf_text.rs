//! The HF text side against Python: tokenizer ids and decodes (tests/data/hf/prompts.json,
//! from scripts/make_hf_fixture.py), conversation prompts and label masks of both
//! templates (tests/data/hf/text_refs.json, from scripts/make_text_fixture.py), and
//! every validation error on hostile input.
mod common;

use std::path::{Path, PathBuf};

use dualpriv::hf::conversation::{
    Conversations, DropReason, Role, Template, TextExample, Turn, VICUNA_V1_SYSTEM,
};
use dualpriv::hf::tokenizer::Tokenizer;
use serde_json::Value;

fn data() -> PathBuf {
    common::hf_data()
}

fn tok() -> Tokenizer {
    Tokenizer::from_file(data().join("tokenizer.json")).expect("fixture tokenizer")
}

fn json(name: &str) -> Value {
    let text = std::fs::read_to_string(data().join(name)).expect(name);
    serde_json::from_str(&text).expect(name)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn fixture() -> Conversations {
    Conversations::load(data().join("conversations.json"), Some(&data())).expect("fixture data")
}

fn template_key(t: Template) -> &'static str {
    match t {
        Template::LlavaHf => "hf",
        Template::VicunaV1 => "vicuna_v1",
    }
}

const TEMPLATES: [Template; 2] = [Template::LlavaHf, Template::VicunaV1];

// ---------------------------------------------------------------- tokenizer

#[test]
fn ids_equal_python_on_every_fixture_prompt() {
    let tok = tok();
    let refs = json("prompts.json");
    let prompts = refs["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 5);
    for p in prompts {
        let text = p["text"].as_str().unwrap();
        let want = ids(&p["ids"]);
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
        // Without BOS: the same ids after it.
        assert_eq!(tok.encode(text, false).unwrap(), want[1..], "{text:?}");
    }
    assert_eq!(tok.encode("", true).unwrap(), [tok.bos_id()]);
}

#[test]
fn special_ids_found_by_name() {
    let tok = tok();
    let refs = json("prompts.json");
    assert_eq!(tok.bos_id(), 1);
    assert_eq!(tok.eos_id(), 2);
    assert_eq!(
        u64::from(tok.image_id()),
        refs["image_token_id"].as_u64().unwrap()
    );
    assert_eq!(
        u64::from(tok.pad_id()),
        refs["pad_token_id"].as_u64().unwrap()
    );
    assert_eq!(tok.vocab_size(), 521);
    // A folder works as well as the file.
    assert_eq!(
        Tokenizer::from_file(data()).unwrap().image_id(),
        tok.image_id()
    );
}

/// The normaliser runs per segment between added tokens, so the text after `<image>`
/// (and after `</s>`) starts with `▁`, as Python's tokenizer does.
#[test]
fn text_after_image_starts_with_metaspace() {
    let tok = tok();
    let space = tok.token_to_id("▁").unwrap();
    let newline = tok.token_to_id("<0x0A>").unwrap();
    let refs = json("prompts.json");
    let first = ids(&refs["prompts"][0]["ids"]);
    let at = first.iter().position(|&i| i == tok.image_id()).unwrap();
    assert_eq!(
        first[at + 1..at + 3],
        [space, newline],
        "<image>\\n -> ▁ <0x0A>"
    );
    assert_eq!(
        tok.encode("USER: <image>\nWhat", true).unwrap()[2..5],
        [tok.image_id(), space, newline]
    );
    // `<image>at the end`: `▁` then the piece, not `at` glued to the image.
    let fourth = ids(&refs["prompts"][3]["ids"]);
    let at = fourth.iter().position(|&i| i == tok.image_id()).unwrap();
    assert_eq!(fourth[at + 1], space);
    // And after `</s>` in a multi-turn prompt: the round tokenises as it would alone.
    let second = ids(&refs["prompts"][1]["ids"]);
    let eos = second.iter().position(|&i| i == tok.eos_id()).unwrap();
    let alone = tok
        .encode("USER: And the shape? ASSISTANT: Round.</s>", false)
        .unwrap();
    assert_eq!(second[eos + 1..], alone[..]);
    assert_eq!(tok.id_to_token(second[eos + 1]).as_deref(), Some("▁USER:▁"));
}

#[test]
fn decode_equals_python() {
    let tok = tok();
    let refs = json("text_refs.json");
    let cases = refs["decode"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let part = ids(&c["ids"]);
        assert_eq!(
            tok.decode(&part, true).unwrap(),
            c["skip_special"].as_str().unwrap(),
            "{part:?}"
        );
        assert_eq!(
            tok.decode(&part, false).unwrap(),
            c["keep_special"].as_str().unwrap(),
            "{part:?}"
        );
    }
    // Round trip of plain text through encode and decode (what generate prints).
    let text = "Café naïve — 東京 🚀 tab\there";
    assert_eq!(
        tok.decode(&tok.encode(text, true).unwrap(), true).unwrap(),
        text
    );
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let tok = tok();
    let e = tok.decode(&[1, 5, 32000], true).unwrap_err().to_string();
    assert!(
        e.contains("32000") && e.contains("tokenizer.json") && e.contains("521"),
        "{e}"
    );
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn tokenizer_file_errors_name_file_problem_and_fix() {
    let dir = common::tmp_dir("tokenizer_file_errors");
    let missing = dir.join("nope.json");
    let e = Tokenizer::from_file(&missing).unwrap_err().to_string();
    assert!(
        e.contains("nope.json") && e.contains("cannot read") && e.contains("llava-hf"),
        "{e}"
    );

    let bad = write(&dir, "bad.json", "{\"version\": \"1.0\", \"model\": 3}");
    let e = Tokenizer::from_file(&bad).unwrap_err().to_string();
    assert!(
        e.contains("bad.json") && e.contains("not a Hugging Face tokenizers file"),
        "{e}"
    );

    let base: Value = json("tokenizer.json");
    // No <image> at all.
    let mut t = base.clone();
    t["added_tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|a| a["content"] != "<image>");
    let p = write(&dir, "noimage.json", &t.to_string());
    let e = Tokenizer::from_file(&p).unwrap_err().to_string();
    assert!(
        e.contains("noimage.json")
            && e.contains("no token `<image>`")
            && e.contains("add_special_tokens"),
        "{e}"
    );
    // No <pad>.
    let mut t = base.clone();
    t["added_tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|a| a["content"] != "<pad>");
    let p = write(&dir, "nopad.json", &t.to_string());
    let e = Tokenizer::from_file(&p).unwrap_err().to_string();
    assert!(
        e.contains("nopad.json") && e.contains("no token `<pad>`"),
        "{e}"
    );
    // <image> in the vocabulary but not an added token: the text would not map to it.
    let mut t = base;
    t["added_tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|a| a["content"] != "<image>");
    t["model"]["vocab"]["<image>"] = 519.into();
    let p = write(&dir, "vocabimage.json", &t.to_string());
    let e = Tokenizer::from_file(&p).unwrap_err().to_string();
    assert!(
        e.contains("vocabimage.json") && e.contains("not an added token"),
        "{e}"
    );
}

// ---------------------------------------------------------------- conversations vs Python

#[test]
fn fixture_loads_with_resolved_images() {
    let c = fixture();
    let canon = std::fs::canonicalize(data().join("image.png")).unwrap();
    assert_eq!(c.records.len(), 5);
    let with_image: Vec<_> = c.records.iter().filter(|r| r.image.is_some()).collect();
    assert_eq!(with_image.len(), 4);
    for r in with_image {
        assert_eq!(r.image.as_ref().unwrap().path, canon, "{}", r.id);
    }
    // `"./image.png"` is kept as written and resolves to the same file.
    assert_eq!(c.records[3].image.as_ref().unwrap().relative, "./image.png");
    // A numeric id is kept as its JSON text.
    assert_eq!(c.records[1].id, "17");
    assert_eq!(c.records[1].turns.len(), 6);
    assert_eq!(c.records[1].turns[5].role, Role::Gpt);
}

#[test]
fn prompts_ids_and_labels_equal_python_for_both_templates() {
    let tok = tok();
    let c = fixture();
    let refs = json("text_refs.json");
    for t in TEMPLATES {
        let want = refs[template_key(t)].as_array().unwrap();
        let (ex, stats) = c.encode(&tok, t, 4096).unwrap();
        assert_eq!(ex.len(), want.len(), "{t:?}");
        assert_eq!(
            (stats.records, stats.kept, stats.truncated),
            (5, 5, 0),
            "{t:?}"
        );
        assert!(stats.dropped.is_empty(), "{t:?}: {:?}", stats.dropped);
        for ((e, w), r) in ex.iter().zip(want).zip(&c.records) {
            assert_eq!(e.id, w["id"].as_str().unwrap());
            assert_eq!(t.prompt(r), w["prompt"].as_str().unwrap(), "{t:?} {}", e.id);
            if t == Template::VicunaV1 {
                assert!(t
                    .prompt(r)
                    .starts_with(&format!("{VICUNA_V1_SYSTEM} USER: ")));
            }
            assert_eq!(e.input_ids, ids(&w["input_ids"]), "{t:?} {}", e.id);
            let labels: Vec<i64> = w["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            assert_eq!(e.hf_labels(), labels, "{t:?} {}", e.id);
            assert_eq!(e.loss_mask.len(), e.input_ids.len());
            assert!(!e.loss_mask[e.loss_mask.len() - 1]);
            assert!(!e.truncated);
            let image_at = e.input_ids.iter().position(|&i| i == tok.image_id());
            assert_eq!(e.image_position, image_at, "{t:?} {}", e.id);
            assert_eq!(e.image.is_some(), r.image.is_some());
        }
        assert_eq!(
            stats.longest,
            ex.iter().map(|e| e.input_ids.len()).max().unwrap()
        );
    }
}

/// The convention: `loss_mask[t]` means "input_ids[t + 1] is a target".
#[test]
fn loss_mask_convention_and_answer_ends() {
    let tok = tok();
    let c = fixture();
    let (ex, _) = c.encode(&tok, Template::VicunaV1, 4096).unwrap();
    let single = &ex[0];
    let n = single.input_ids.len();
    assert_eq!(single.input_ids[n - 1], tok.eos_id());
    // The `</s>` after the answer is learned: predicted from position n - 2.
    assert!(single.loss_mask[n - 2]);
    // Nothing about the system prompt, the question or the image is learned.
    let first = single.loss_mask.iter().position(|&m| m).unwrap();
    assert!(first > single.image_position.unwrap());
    // preprocess_v1 masks len(instruction) - 2 tokens, assuming the space after
    // `ASSISTANT:` merges into the answer (as with Llama's vocabulary); the fixture's
    // BPE merges it into `ASSISTANT:▁` instead, so that header token is a target too.
    assert_eq!(
        tok.id_to_token(single.input_ids[first + 1]).as_deref(),
        Some("ASSISTANT:▁")
    );
    // Each of the three answers of record "17" ends with a learned `</s>`.
    let r17 = &ex[1];
    let eos_targets = (0..r17.input_ids.len() - 1)
        .filter(|&t| r17.input_ids[t + 1] == tok.eos_id() && r17.loss_mask[t])
        .count();
    assert_eq!(eos_targets, 3);
    // The HF template has no `</s>` at all, and its targets start at the answer.
    let (hf, _) = c.encode(&tok, Template::LlavaHf, 4096).unwrap();
    assert!(hf.iter().all(|e| !e.input_ids.contains(&tok.eos_id())));
    let first = hf[0].loss_mask.iter().position(|&m| m).unwrap();
    assert_eq!(
        tok.id_to_token(hf[0].input_ids[first]).as_deref(),
        Some("ASSISTANT:▁")
    );
    assert_eq!(
        tok.id_to_token(hf[0].input_ids[first + 1]).as_deref(),
        Some("A▁")
    );
}

#[test]
fn generation_prompts_equal_python() {
    let c = fixture();
    let refs = json("text_refs.json");
    let gens = refs["generation"].as_array().unwrap();
    for (r, g) in c.records.iter().zip(gens) {
        let turns = &r.turns[..r.turns.len() - 1];
        for t in TEMPLATES {
            let got = t.generation_prompt(turns, r.image.is_some()).unwrap();
            assert_eq!(got, g[template_key(t)].as_str().unwrap(), "{t:?} {}", r.id);
        }
    }
}

#[test]
fn generation_prompt_errors() {
    let q = |v: &str| Turn {
        role: Role::Human,
        value: v.into(),
    };
    let a = |v: &str| Turn {
        role: Role::Gpt,
        value: v.into(),
    };
    let t = Template::LlavaHf;
    let e = t
        .generation_prompt(&[q("<image>\nHi"), a("Hello")], true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("generation prompt") && e.contains("end with the human question"),
        "{e}"
    );
    let e = t
        .generation_prompt(&[q("Hi")], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("0 `<image>`"), "{e}");
    let e = t
        .generation_prompt(&[q("<image> Hi")], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no \"image\""), "{e}");
    let e = t.generation_prompt(&[], false).unwrap_err().to_string();
    assert!(e.contains("no turns"), "{e}");
}

// ---------------------------------------------------------------- truncation and padding

#[test]
fn truncation_cuts_labels_and_is_counted() {
    let tok = tok();
    let c = fixture();
    let (full, _) = c.encode(&tok, Template::VicunaV1, 4096).unwrap();
    let r17 = full.iter().find(|e| e.id == "17").unwrap();
    assert_eq!((r17.image_position, r17.input_ids.len()), (Some(47), 92));

    let (ex, stats) = c.encode(&tok, Template::VicunaV1, 70).unwrap();
    let long = full.iter().filter(|e| e.input_ids.len() > 70).count();
    assert_eq!(stats.truncated, long);
    assert_eq!(stats.longest, 105);
    let cut = ex.iter().find(|e| e.id == "17").unwrap();
    assert!(cut.truncated);
    assert_eq!(cut.input_ids, r17.input_ids[..70]);
    // The labels before the cut are kept; the last position predicts nothing.
    assert_eq!(cut.loss_mask[..69], r17.loss_mask[..69]);
    assert!(!cut.loss_mask[69]);
    assert!(ex
        .iter()
        .filter(|e| e.input_ids.len() < 70)
        .all(|e| !e.truncated));

    // Cut after the image but before the first answer token: reported, left out.
    let (ex, stats) = c.encode(&tok, Template::VicunaV1, 50).unwrap();
    assert_eq!(stats.kept, ex.len());
    assert_eq!(stats.kept + stats.dropped.len(), 5);
    let d = stats.dropped.iter().find(|d| d.id == "17").unwrap();
    assert_eq!((d.index, d.reason), (1, DropReason::AnswersCut));
    assert!(ex.iter().all(|e| e.id != "17"));
    // Cut at the image itself.
    let (_, stats) = c.encode(&tok, Template::VicunaV1, 47).unwrap();
    let d = stats.dropped.iter().find(|d| d.id == "17").unwrap();
    assert_eq!(d.reason, DropReason::ImageCut);
    // The text-only record has no image to lose.
    let d = stats.dropped.iter().find(|d| d.id == "text-only").unwrap();
    assert_eq!(d.reason, DropReason::AnswersCut);

    let e = c
        .encode(&tok, Template::VicunaV1, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_len 1"), "{e}");
}

#[test]
fn right_padding_masks_the_padding() {
    let tok = tok();
    let c = fixture();
    let (ex, _) = c.encode(&tok, Template::LlavaHf, 4096).unwrap();
    let e: &TextExample = &ex[0];
    let n = e.input_ids.len();
    let p = e.pad(n + 5, tok.pad_id()).unwrap();
    assert_eq!(p.input_ids.len(), n + 5);
    assert_eq!(p.input_ids[..n], e.input_ids[..]);
    assert!(p.input_ids[n..].iter().all(|&i| i == tok.pad_id()));
    assert_eq!(p.targets[..n - 1], e.input_ids[1..]);
    assert!(p.targets[n - 1..].iter().all(|&i| i == tok.pad_id()));
    assert_eq!(p.loss_mask[..n], e.loss_mask[..]);
    assert!(p.loss_mask[n..].iter().all(|&m| !m));
    // Exact length: no padding, the last target is the pad id.
    let p = e.pad(n, tok.pad_id()).unwrap();
    assert_eq!(p.input_ids, e.input_ids);
    assert_eq!(p.targets[n - 1], tok.pad_id());
    let err = e.pad(n - 1, tok.pad_id()).unwrap_err().to_string();
    assert!(
        err.contains("more than the padded length") && err.contains("single"),
        "{err}"
    );
}

// ---------------------------------------------------------------- hostile input

/// Loads `text` as `data.json` in a fresh folder whose `images/` holds `a.png`, and
/// returns the error message, which must name the file.
fn load_err(name: &str, text: &str) -> String {
    let dir = common::tmp_dir(name);
    let root = dir.join("images");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("a.png"), b"png").unwrap();
    let p = write(&dir, "data.json", text);
    let e = Conversations::load(&p, Some(&root))
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.json"), "{e}");
    e
}

fn rec(image: Option<&str>, turns: &[(&str, &str)]) -> String {
    let conv: Vec<Value> = turns
        .iter()
        .map(|(f, v)| serde_json::json!({"from": f, "value": v}))
        .collect();
    let mut r = serde_json::json!({"id": "r1", "conversations": conv});
    if let Some(i) = image {
        r["image"] = i.into();
    }
    r.to_string()
}

/// A good record then `bad`: errors name index 1 and the id.
fn with_good(bad: &str) -> String {
    format!(
        "[{}, {bad}]",
        rec(Some("a.png"), &[("human", "<image>\nQ?"), ("gpt", "A.")])
    )
}

#[test]
fn bad_json_and_shape() {
    let e = load_err("bad_json", "[{\"id\": 1, ");
    assert!(
        e.contains("not LLaVA conversation JSON") && e.contains("line 1"),
        "{e}"
    );
    let e = load_err("object", "{\"id\": 1}");
    assert!(e.contains("Expected a list"), "{e}");
    let e = load_err("empty", "[]");
    assert!(e.contains("no records"), "{e}");
    let e = load_err(
        "value_type",
        "[{\"id\": 1, \"conversations\": [{\"from\": \"human\", \"value\": 3}]}]",
    );
    assert!(e.contains("invalid type"), "{e}");
    let dir = common::tmp_dir("missing_file");
    let e = Conversations::load(dir.join("gone.json"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gone.json") && e.contains("cannot read"), "{e}");
}

#[test]
fn missing_fields() {
    let e = load_err("no_id", &with_good("{\"conversations\": []}"));
    assert!(e.contains("record 1") && e.contains("has no \"id\""), "{e}");
    let e = load_err("no_conv", &with_good("{\"id\": \"x7\"}"));
    assert!(
        e.contains("record 1 (id \"x7\")") && e.contains("no \"conversations\""),
        "{e}"
    );
    let e = load_err(
        "no_turns",
        &with_good("{\"id\": \"x7\", \"conversations\": []}"),
    );
    assert!(e.contains("record 1") && e.contains("no turns"), "{e}");
    let e = load_err(
        "no_from",
        &with_good("{\"id\": \"x7\", \"conversations\": [{\"value\": \"Q\"}]}"),
    );
    assert!(e.contains("turn 0 has no \"from\""), "{e}");
    let e = load_err(
        "no_value",
        &with_good("{\"id\": \"x7\", \"conversations\": [{\"from\": \"human\"}]}"),
    );
    assert!(e.contains("turn 0 has no \"value\""), "{e}");
    let e = load_err(
        "empty_value",
        &with_good(&rec(None, &[("human", "Q"), ("gpt", "")])),
    );
    assert!(
        e.contains("record 1 (id \"r1\")") && e.contains("turn 1 has an empty"),
        "{e}"
    );
}

#[test]
fn wrong_roles_order() {
    let e = load_err(
        "bad_role",
        &with_good(&rec(None, &[("system", "S"), ("gpt", "A")])),
    );
    assert!(
        e.contains("turn 0 is from \"system\"") && e.contains("\"human\" (the question)"),
        "{e}"
    );
    let e = load_err(
        "leading_gpt",
        &with_good(&rec(None, &[("gpt", "A"), ("human", "Q"), ("gpt", "A")])),
    );
    assert!(
        e.contains("record 1") && e.contains("turn 0 is from \"gpt\"") && e.contains("leading gpt"),
        "{e}"
    );
    let e = load_err(
        "two_humans",
        &with_good(&rec(None, &[("human", "Q"), ("human", "Q2"), ("gpt", "A")])),
    );
    assert!(
        e.contains("turn 1 is from \"human\" where \"gpt\"") && e.contains("alternate"),
        "{e}"
    );
    let e = load_err(
        "ends_human",
        &with_good(&rec(None, &[("human", "Q"), ("gpt", "A"), ("human", "Q2")])),
    );
    assert!(
        e.contains("ends with a human turn") && e.contains("add the gpt answer"),
        "{e}"
    );
}

#[test]
fn image_token_counts() {
    let e = load_err(
        "zero_images",
        &with_good(&rec(Some("a.png"), &[("human", "Q"), ("gpt", "A")])),
    );
    assert!(
        e.contains("record 1") && e.contains("has an image but 0 `<image>`"),
        "{e}"
    );
    let e = load_err(
        "two_images",
        &with_good(&rec(
            Some("a.png"),
            &[("human", "<image> Q <image>"), ("gpt", "A")],
        )),
    );
    assert!(
        e.contains("has an image but 2 `<image>`") && e.contains("exactly one"),
        "{e}"
    );
    let e = load_err(
        "two_turn_images",
        &with_good(&rec(
            Some("a.png"),
            &[
                ("human", "<image> Q"),
                ("gpt", "A"),
                ("human", "<image>"),
                ("gpt", "B"),
            ],
        )),
    );
    assert!(e.contains("2 `<image>`"), "{e}");
    let e = load_err(
        "text_with_image",
        &with_good(&rec(None, &[("human", "<image>\nQ"), ("gpt", "A")])),
    );
    assert!(
        e.contains("no \"image\" but 1 `<image>`") && e.contains("add the \"image\" path"),
        "{e}"
    );
    let e = load_err(
        "image_in_answer",
        &with_good(&rec(Some("a.png"), &[("human", "Q"), ("gpt", "A <image>")])),
    );
    assert!(e.contains("is in turn 1, an answer"), "{e}");
}

#[test]
fn image_paths_that_escape_or_fail() {
    let e = load_err(
        "absolute",
        &with_good(&rec(
            Some("/etc/passwd"),
            &[("human", "<image>Q"), ("gpt", "A")],
        )),
    );
    assert!(
        e.contains("record 1") && e.contains("\"/etc/passwd\" is absolute"),
        "{e}"
    );
    let e = load_err(
        "dotdot",
        &with_good(&rec(
            Some("sub/../../data.json"),
            &[("human", "<image>Q"), ("gpt", "A")],
        )),
    );
    assert!(e.contains("contains `..`"), "{e}");
    let e = load_err(
        "missing_image",
        &with_good(&rec(Some("b.png"), &[("human", "<image>Q"), ("gpt", "A")])),
    );
    assert!(e.contains("b.png cannot be found"), "{e}");
    let e = load_err(
        "empty_path",
        &with_good(&rec(Some(""), &[("human", "<image>Q"), ("gpt", "A")])),
    );
    assert!(e.contains("empty \"image\" path"), "{e}");

    // Symlinks: a file link and a folder link that lead out, and a broken one.
    let dir = common::tmp_dir("symlinks");
    let root = dir.join("images");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("a.png"), b"png").unwrap();
    std::fs::write(dir.join("secret.png"), b"png").unwrap();
    std::os::unix::fs::symlink(dir.join("secret.png"), root.join("link.png")).unwrap();
    std::os::unix::fs::symlink(&dir, root.join("up")).unwrap();
    std::os::unix::fs::symlink(root.join("a.png"), root.join("inside.png")).unwrap();
    std::os::unix::fs::symlink(dir.join("gone.png"), root.join("broken.png")).unwrap();
    let load = |image: &str| {
        let p = write(
            &dir,
            "data.json",
            &format!(
                "[{}]",
                rec(Some(image), &[("human", "<image>Q"), ("gpt", "A")])
            ),
        );
        Conversations::load(&p, Some(&root))
    };
    for out in ["link.png", "up/secret.png"] {
        let e = load(out).unwrap_err().to_string();
        assert!(
            e.contains("outside the image folder") && e.contains("symlink"),
            "{out}: {e}"
        );
    }
    let e = load("broken.png").unwrap_err().to_string();
    assert!(
        e.contains("broken.png cannot be found") && e.contains("broken symlink"),
        "{e}"
    );
    // A link that stays inside is fine and resolves to its target.
    let ok = load("inside.png").unwrap();
    assert_eq!(
        ok.records[0].image.as_ref().unwrap().path,
        std::fs::canonicalize(root.join("a.png")).unwrap()
    );
    // A folder is not an image.
    let e = load("sub").unwrap_err().to_string();
    assert!(e.contains("is not a file"), "{e}");

    // No image folder given, or one that does not exist.
    let p = write(
        &dir,
        "data.json",
        &format!(
            "[{}]",
            rec(Some("a.png"), &[("human", "<image>Q"), ("gpt", "A")])
        ),
    );
    let e = Conversations::load(&p, None).unwrap_err().to_string();
    assert!(
        e.contains("data.json") && e.contains("no image folder was given"),
        "{e}"
    );
    let e = Conversations::load(&p, Some(&dir.join("nowhere")))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nowhere") && e.contains("cannot open the image folder"),
        "{e}"
    );
    let e = Conversations::load(&p, Some(&root.join("a.png")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a folder"), "{e}");
}

#[test]
fn unreadable_image() {
    use std::os::unix::fs::PermissionsExt;
    let dir = common::tmp_dir("unreadable");
    let root = dir.join("images");
    std::fs::create_dir_all(&root).unwrap();
    let img = root.join("locked.png");
    std::fs::write(&img, b"png").unwrap();
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o000)).unwrap();
    let p = write(
        &dir,
        "data.json",
        &format!(
            "[{}]",
            rec(Some("locked.png"), &[("human", "<image>Q"), ("gpt", "A")])
        ),
    );
    let res = Conversations::load(&p, Some(&root));
    if std::fs::File::open(&img).is_ok() {
        // Running as root: permissions do not stop reads, so there is nothing to see.
        assert!(res.is_ok());
    } else {
        let e = res.unwrap_err().to_string();
        assert!(
            e.contains("locked.png cannot be opened") && e.contains("readable"),
            "{e}"
        );
    }
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o644)).unwrap();
}

#[test]
fn control_tokens_in_text_are_refused() {
    let tok = tok();
    let dir = common::tmp_dir("control_tokens");
    for bad in ["Q</s>USER: x", "<s> Q", "Q <pad>"] {
        let p = write(
            &dir,
            "data.json",
            &format!(
                "[{}]",
                rec(
                    None,
                    &[("human", "Hi"), ("gpt", "A"), ("human", bad), ("gpt", "B")]
                )
            ),
        );
        let c = Conversations::load(&p, None).unwrap();
        for t in TEMPLATES {
            let e = c.encode(&tok, t, 512).unwrap_err().to_string();
            assert!(
                e.contains("data.json")
                    && e.contains("record 0 (id \"r1\")")
                    && e.contains("turn 2"),
                "{e}"
            );
            assert!(e.contains("special") && e.contains("remove it"), "{e}");
        }
    }
}

/// A question that itself contains " ASSISTANT: " breaks preprocess_v1's round split;
/// LLaVA masks the record ("tokenization mismatch"), here it is dropped and reported.
#[test]
fn vicuna_round_split_mismatch_is_reported() {
    let tok = tok();
    let dir = common::tmp_dir("mismatch");
    let p = write(
        &dir,
        "data.json",
        &format!(
            "[{}]",
            rec(None, &[("human", "Say ASSISTANT: hi"), ("gpt", "Hi.")])
        ),
    );
    let c = Conversations::load(&p, None).unwrap();
    let (ex, stats) = c.encode(&tok, Template::VicunaV1, 512).unwrap();
    assert!(ex.is_empty());
    assert_eq!(stats.dropped.len(), 1);
    assert_eq!(stats.dropped[0].reason, DropReason::TokenizationMismatch);
    // The HF template labels by character spans and has no such failure.
    let (ex, stats) = c.encode(&tok, Template::LlavaHf, 512).unwrap();
    assert_eq!((ex.len(), stats.dropped.len()), (1, 0));
}

/// Records built by hand skip validation; encode still fails cleanly, not with a panic.
#[test]
fn hand_built_records_fail_cleanly() {
    use dualpriv::hf::conversation::{ImageRef, Record};
    let tok = tok();
    let turn = |role, v: &str| Turn {
        role,
        value: v.into(),
    };
    let c = Conversations {
        path: "built.json".into(),
        image_root: None,
        records: vec![Record {
            index: 0,
            id: "h".into(),
            image: Some(ImageRef {
                relative: "a.png".into(),
                path: data().join("image.png"),
            }),
            turns: vec![turn(Role::Human, "Q"), turn(Role::Gpt, "A")],
        }],
    };
    for t in TEMPLATES {
        let e = c.encode(&tok, t, 64).unwrap_err().to_string();
        assert!(e.contains("built.json") && e.contains("0 `<image>`"), "{e}");
    }
}
