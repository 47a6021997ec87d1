//! Greedy generation and exact-match evaluation on a transformers LLaVA folder
//! against transformers itself: the ids `model.generate(do_sample=False)` produced
//! on the fixture model, with and without the PEFT adapter, in both templates and
//! aspect modes, and with a stop token (tests/data/hf/generate.json, from
//! scripts/make_generate_fixture.py); `eval` on JSON built so that some answers are
//! the generated text and some are not; `train --init-adapter`; the CLI; hostile
//! input.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dualpriv::backend::cpu::Cpu;
use dualpriv::cmd::eval::{eval_hf, exact_match, HfEvalArgs, HfEvalModel};
use dualpriv::cmd::generate::{generate, GenerateArgs, Generator, StopReason};
use dualpriv::cmd::train::{lora_from_adapter, prepare, HfData, TrainArgs};
use dualpriv::hf::conversation::{Role, Template, Turn};
use dualpriv::hf::image::AspectMode;
use dualpriv::hf::peft::{read_adapter, write_adapter, AdapterTensor};
use dualpriv::train::checkpoint::ModelSpec;
use dualpriv::train::method::Method;
use serde_json::{json, Value};

fn fixture(p: &str) -> PathBuf {
    common::hf_data().join(p)
}

fn cases() -> Value {
    let text = std::fs::read_to_string(fixture("generate.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn case(name: &str) -> Value {
    cases()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in generate.json"))
        .clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn template(v: &Value) -> Template {
    match v.as_str().unwrap() {
        "llava-hf" => Template::LlavaHf,
        "vicuna-v1" => Template::VicunaV1,
        t => panic!("template {t}"),
    }
}

fn aspect(v: &Value) -> AspectMode {
    match v.as_str().unwrap() {
        "pad" => AspectMode::Pad,
        "crop" => AspectMode::Crop,
        a => panic!("aspect {a}"),
    }
}

/// Question, answer, ..., question; the first with `<image>` in front.
fn turns(v: &Value) -> Vec<Turn> {
    v.as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(j, t)| Turn {
            role: if j % 2 == 0 { Role::Human } else { Role::Gpt },
            value: if j == 0 {
                format!("<image>\n{}", t.as_str().unwrap())
            } else {
                t.as_str().unwrap().to_string()
            },
        })
        .collect()
}

#[test]
fn greedy_ids_equal_transformers_with_and_without_adapter() {
    let all = cases();
    let max_new = all["max_new_tokens"].as_u64().unwrap() as usize;
    let eos = all["eos_token_id"].as_u64().unwrap() as u32;
    // The hub layout (F32) and the v5 one transformers generated with (BF16-exact
    // values): the same weights.
    let mut base = Generator::open(&Cpu, &fixture("hub"), None).unwrap();
    let mut adapted = Generator::open(&Cpu, &fixture("v5"), Some(&fixture("adapter"))).unwrap();
    assert_eq!(base.tokenizer().eos_id(), eos);
    let mut checked = (0, 0);
    let mut distinct = std::collections::HashSet::new();
    for c in all["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let g = if c["adapter"].as_bool().unwrap() {
            checked.1 += 1;
            &mut adapted
        } else {
            checked.0 += 1;
            &mut base
        };
        let stop = c["stop_id"].as_u64().unwrap() as u32;
        g.set_stop_ids(vec![stop]);
        let (prompt, pos) = g
            .encode_prompt(template(&c["template"]), &turns(&c["turns"]), true)
            .unwrap();
        assert_eq!(prompt, ids(&c["prompt_ids"]), "{name}: prompt ids");
        let pixels = g
            .pixels(&fixture(c["image"].as_str().unwrap()), aspect(&c["aspect"]))
            .unwrap();
        let out = g.greedy(&prompt, pos, &pixels, max_new).unwrap();
        let want = ids(&c["generated_ids"]);
        assert_eq!(out.ids, want, "{name}: generated ids");
        assert_eq!(out.prompt_ids, prompt);
        assert_eq!(
            out.text,
            c["text"].as_str().unwrap(),
            "{name}: decoded text"
        );
        let expect_stop = if want.len() < max_new || stop != eos {
            StopReason::Stop
        } else {
            StopReason::MaxTokens
        };
        assert_eq!(out.stop, expect_stop, "{name}");
        distinct.insert(want);
    }
    // Both kinds exercised, and generations that differ between cases (a model
    // that ignored the prompt or the image would repeat one).
    assert!(checked.0 >= 3 && checked.1 >= 3, "{checked:?}");
    assert!(
        distinct.len() >= 6,
        "{} distinct generations",
        distinct.len()
    );
}

#[test]
fn the_stop_token_ends_generation_and_is_kept_in_the_ids() {
    let c = case("hf_crop_stop");
    let mut g = Generator::open(&Cpu, &fixture("hub"), None).unwrap();
    let (prompt, pos) = g
        .encode_prompt(Template::LlavaHf, &turns(&c["turns"]), true)
        .unwrap();
    let pixels = g.pixels(&fixture("image.png"), AspectMode::Crop).unwrap();
    let full = g.greedy(&prompt, pos, &pixels, 8).unwrap();
    assert_eq!(full.stop, StopReason::MaxTokens);
    assert_eq!(full.ids.len(), 8);
    g.set_stop_ids(vec![c["stop_id"].as_u64().unwrap() as u32]);
    let cut = g.greedy(&prompt, pos, &pixels, 8).unwrap();
    assert_eq!(cut.stop, StopReason::Stop);
    assert_eq!(cut.ids, ids(&c["generated_ids"]));
    assert_eq!(cut.ids[..], full.ids[..cut.ids.len()]);
    assert!(cut.ids.len() < full.ids.len());
    let none = g.greedy(&prompt, pos, &pixels, 0).unwrap();
    assert!(none.ids.is_empty() && none.text.is_empty());
}

/// Test records whose answers are, for some turns, exactly what the adapter model
/// generates (the texts transformers decoded) and, for others, not.
fn write_eval_json(dir: &Path) -> PathBuf {
    let a = case("v1_pad_adapter");
    let m = case("v1_multiturn_adapter");
    let ta = a["text"].as_str().unwrap();
    let tm = m["text"].as_str().unwrap();
    let mt = m["turns"].as_array().unwrap();
    let recs = json!([
        // 1 answer, matches.
        {"id": "a", "image": "image.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": ta}]},
        // 2 answers: the first is not what the model says, the second is (given the
        // reference first answer as history).
        {"id": "m", "image": "image/portrait.png", "conversations": [
            {"from": "human", "value": format!("<image>\n{}", mt[0].as_str().unwrap())},
            {"from": "gpt", "value": mt[1]},
            {"from": "human", "value": mt[2]},
            {"from": "gpt", "value": format!("  {tm}\n")}]},
        // 1 answer, wrong.
        {"id": 3, "image": "image.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": "A red square."}]},
        // 1 answer, right up to case.
        {"id": "upper", "image": "image.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": ta.to_uppercase()}]},
    ]);
    assert_ne!(ta, ta.to_uppercase(), "the case test needs letters");
    let p = dir.join("test.json");
    std::fs::write(&p, serde_json::to_string(&recs).unwrap()).unwrap();
    p
}

fn eval_args(data: &Path, ignore_case: bool) -> HfEvalArgs {
    HfEvalArgs {
        model: HfEvalModel::Folder {
            model: fixture("v5"),
            adapter: Some(fixture("adapter")),
        },
        data: data.to_path_buf(),
        image_folder: Some(fixture("")),
        template: Template::VicunaV1,
        aspect: AspectMode::Pad,
        max_new_tokens: 8,
        ignore_case,
        keep_answers: true,
    }
}

#[test]
fn eval_counts_exact_matches_per_answer() {
    let dir = common::tmp_dir("hf_eval");
    let data = write_eval_json(&dir);
    let r = eval_hf(&Cpu, &eval_args(&data, false)).unwrap();
    assert_eq!((r.records, r.answers, r.correct), (4, 5, 2));
    assert!((r.accuracy - 0.4).abs() < 1e-12);
    let hits: Vec<(&str, usize, bool)> = r
        .outcomes
        .iter()
        .map(|o| (o.id.as_str(), o.turn, o.correct))
        .collect();
    assert_eq!(
        hits,
        [
            ("a", 1, true),
            ("m", 1, false),
            ("m", 3, true),
            ("3", 1, false),
            ("upper", 1, false)
        ]
    );
    let r = eval_hf(&Cpu, &eval_args(&data, true)).unwrap();
    assert_eq!(r.correct, 3);
    // Without the adapter the base model generates something else: nothing matches.
    let mut a = eval_args(&data, true);
    a.model = HfEvalModel::Folder {
        model: fixture("v5"),
        adapter: None,
    };
    a.keep_answers = false;
    let r = eval_hf(&Cpu, &a).unwrap();
    assert_eq!((r.answers, r.correct), (5, 0));
    assert!(r.outcomes.is_empty(), "outcomes only when asked for");
}

#[test]
fn exact_match_trims_whitespace_and_optionally_case() {
    assert!(exact_match(" A cat.\n", "A cat.", false));
    assert!(!exact_match("a cat.", "A cat.", false));
    assert!(exact_match("a cat.", "A CAT.", true));
    assert!(!exact_match("A cat", "A cat.", true));
    assert!(
        !exact_match("A  cat.", "A cat.", false),
        "inner spaces count"
    );
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dualpriv"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn cli_generate(
    extra: &[&str],
    prompt: &str,
    image: Option<&Path>,
    adapter: Option<&Path>,
) -> Output {
    let mut c = bin();
    c.arg("generate").arg("--model").arg(fixture("v5"));
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    if let Some(i) = image {
        c.arg("--image").arg(i);
    }
    c.args(["--prompt", prompt, "--max-new-tokens", "8"])
        .args(extra);
    c.output().unwrap()
}

#[test]
fn cli_generate_and_eval() {
    let c = case("v1_pad_adapter");
    let out = cli_generate(
        &["--template", "vicuna-v1", "--aspect", "pad"],
        "<image>\nDescribe the image.",
        Some(&fixture("image.png")),
        Some(&fixture("adapter")),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}\n", c["text"].as_str().unwrap()));
    assert!(
        stderr(&out).contains("generated 8 tokens"),
        "{}",
        stderr(&out)
    );
    let c = case("hf_crop");
    let out = cli_generate(
        &["--template", "llava-hf", "--aspect", "crop"],
        "<image>\nWhat is in the picture?",
        Some(&fixture("image.png")),
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}\n", c["text"].as_str().unwrap()));

    let dir = common::tmp_dir("hf_eval_cli");
    let data = write_eval_json(&dir);
    let eval = |extra: &[&str]| {
        bin()
            .arg("eval")
            .arg("--model")
            .arg(fixture("v5"))
            .arg("--adapter")
            .arg(fixture("adapter"))
            .arg("--data")
            .arg(&data)
            .arg("--image-folder")
            .arg(fixture(""))
            .args(["--max-new-tokens", "8"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = eval(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("records = 4, answers = 5, exact matches = 2"),
        "{text}"
    );
    assert!(text.ends_with("accuracy = 0.4000\n"), "{text}");
    // Only the aggregate by default: no reference answer appears.
    assert!(
        !text.contains("A red square") && !text.contains("reference"),
        "{text}"
    );
    let out = eval(&["--show-answers", "--ignore-case"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("reveal the test data"), "{text}");
    assert!(text.contains("\"A red square.\""), "{text}");
    assert!(text.ends_with("accuracy = 0.6000\n"), "{text}");
    // The built-in path still works alongside (flags conflict rather than mix).
    let out = bin()
        .args(["eval", "--checkpoint", "x", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--data"), "{}", stderr(&out));
}

#[test]
fn hostile_generate_input_names_the_file_or_flag() {
    let img = fixture("image.png");
    // Missing image.
    let missing = fixture("no-such-image.png");
    let out = cli_generate(&[], "<image>\nHi?", Some(&missing), None);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("no-such-image.png") && e.contains("--image"),
        "{e}"
    );
    // --image without <image>, <image> without --image, two <image>s.
    let out = cli_generate(&[], "What is this?", Some(&img), None);
    let e = stderr(&out);
    assert!(
        !out.status.success() && e.contains("--prompt has no `<image>`"),
        "{e}"
    );
    let out = cli_generate(&[], "<image>\nWhat is this?", None, None);
    let e = stderr(&out);
    assert!(!out.status.success() && e.contains("no --image"), "{e}");
    let out = cli_generate(&[], "<image> and <image>", Some(&img), None);
    let e = stderr(&out);
    assert!(!out.status.success() && e.contains("2 times"), "{e}");
    // Text-only: no image, no `<image>`: the text alone is decoded.
    let out = cli_generate(&[], "What is this?", None, None);
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    // A control token in the prompt.
    let g = GenerateArgs {
        model: fixture("hub"),
        adapter: None,
        image: Some(img.clone()),
        prompt: "<image>\nHi</s>USER: more".into(),
        template: Template::VicunaV1,
        aspect: AspectMode::Pad,
        max_new_tokens: 2,
    };
    let e = generate(&Cpu, &g).unwrap_err().to_string();
    assert!(e.contains("`</s>`"), "{e}");
    // A corrupt image names the file.
    let dir = common::tmp_dir("hf_gen_hostile");
    let bad = dir.join("bad.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let e = generate(
        &Cpu,
        &GenerateArgs {
            image: Some(bad),
            prompt: "<image>\nHi".into(),
            ..g.clone()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bad.png"), "{e}");
}

/// The fixture adapter with every tensor changed by `f` (name, shape, data).
fn altered_adapter(dir: &Path, f: impl Fn(&mut AdapterTensor)) -> PathBuf {
    let src = read_adapter(&fixture("adapter")).unwrap();
    let mut tensors = src.tensors.clone();
    tensors.iter_mut().for_each(f);
    write_adapter(dir, &src.config, &tensors).unwrap();
    dir.to_path_buf()
}

#[test]
fn an_adapter_of_another_base_model_is_refused() {
    let tmp = common::tmp_dir("hf_gen_adapter");
    // Wider inputs: an adapter of a model with another hidden size.
    let wide = altered_adapter(&tmp.join("wide"), |t| {
        if t.name.contains(".lora_A.") {
            t.shape[1] += 8;
            t.data.resize(t.shape.iter().product(), 0.0);
        }
    });
    let out = cli_generate(
        &[],
        "<image>\nHi?",
        Some(&fixture("image.png")),
        Some(&wide),
    );
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("wide") && e.contains("shape") && e.contains("--adapter"),
        "{e}"
    );
    // More layers than the model has.
    let deep = altered_adapter(&tmp.join("deep"), |t| {
        t.name = t.name.replace("llm.layers.1.", "llm.layers.7.");
    });
    let e = Generator::open(&Cpu, &fixture("hub"), Some(&deep))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("deep") && e.contains("layers.7"), "{e}");
    // Not an adapter folder at all.
    let e = Generator::open(&Cpu, &fixture("hub"), Some(&tmp.join("nothing")))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
}

#[test]
fn hostile_eval_data_names_the_record() {
    let dir = common::tmp_dir("hf_eval_hostile");
    let write = |name: &str, v: Value| {
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    };
    let missing = write(
        "missing.json",
        json!([{"id": "x", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]}]),
    );
    let e = eval_hf(&Cpu, &eval_args(&missing, false))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nope.png") && e.contains(&missing.display().to_string()),
        "{e}"
    );
    // A text-only record is evaluated from its text alone.
    let text_only = write(
        "text.json",
        json!([{"id": "t", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]),
    );
    let r = eval_hf(&Cpu, &eval_args(&text_only, false)).unwrap();
    assert_eq!((r.records, r.answers), (1, 1));
}

/// Text-only greedy decoding against transformers: at prefixes of the text-only
/// reference prompt (`scripts/make_textonly_fixture.py`, no `pixel_values`), the one
/// token generated is the argmax of transformers' logits at the prefix's last
/// position. Positions whose top two logits are closer than 1e-3 (50× the logits'
/// agreement) are skipped, and at least 5 must remain.
#[test]
fn text_only_greedy_matches_transformers_argmax() {
    use safetensors::SafeTensors;
    let bytes = std::fs::read(fixture("textonly_refs.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u32)
        .collect();
    let lt = st.tensor("logits").unwrap();
    let v = lt.shape()[2];
    let logits: Vec<f32> = lt
        .data()
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let g = Generator::open(&Cpu, &fixture("hub"), None).unwrap();
    let mut checked = 0;
    for k in (2..=ids.len()).rev().step_by(4) {
        let row = &logits[(k - 1) * v..k * v];
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        if row[order[0]] - row[order[1]] < 1e-3 {
            continue;
        }
        let out = g.greedy(&ids[..k], None, &[], 1).unwrap();
        assert_eq!(out.ids, vec![order[0] as u32], "prefix of {k} tokens");
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} prefixes had a clear argmax");
}

fn train_json(dir: &Path) -> PathBuf {
    let recs = json!([
        {"id": 0, "image": "image.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]},
        {"id": 1, "image": "image/portrait.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "Blue."}]},
    ]);
    let p = dir.join("train.json");
    std::fs::write(&p, recs.to_string()).unwrap();
    p
}

fn hf_train_args(dir: &Path, init: Option<PathBuf>) -> TrainArgs {
    TrainArgs {
        method: Method::Nonprivate,
        model: ModelSpec {
            preset: String::new(),
            lora_rank: Some(4),
            lora_alpha: 8.0,
            full_groups: vec![],
        },
        out: Some(dir.join("run")),
        steps: 1,
        batch: 2,
        micro_batch: 2,
        insecure_seed: Some(1),
        hf: Some(HfData {
            model: fixture("hub"),
            data: train_json(dir),
            image_folder: Some(fixture("")),
            template: Template::VicunaV1,
            aspect: AspectMode::Pad,
            max_text_len: 96,
            public_size: Some(2),
            init_adapter: init,
        }),
        ..TrainArgs::default()
    }
}

#[test]
fn train_starts_from_an_init_adapter_in_either_key_layout() {
    let dir = common::tmp_dir("hf_init_adapter");
    let old = common::old_layout_adapter(&fixture("adapter"), &dir.join("old"));
    let want = read_adapter(&fixture("adapter")).unwrap();
    let a = hf_train_args(&dir, Some(old.clone()));
    let mut job = prepare(&Cpu, &a).unwrap();
    for t in &want.tensors {
        assert_eq!(
            job.trainer.model.tensor(&t.name).unwrap(),
            &t.data,
            "{} starts at the adapter's value",
            t.name
        );
    }
    let rec = job.trainer.cfg.init_adapter.clone().unwrap();
    assert_eq!(rec.path, old);
    job.run().unwrap();
    let (state, _) = dualpriv::train::checkpoint::load_state(&dir.join("run")).unwrap();
    assert_eq!(
        state.train.init_adapter.as_ref(),
        Some(&rec),
        "recorded in state.json"
    );
    // `eval --run` on the trained checkpoint answers as its exported adapter does
    // on the base folder, and differently from the adapter it started from.
    let exported = dir.join("exported");
    dualpriv::cmd::export::export_peft(&dualpriv::cmd::export::ExportArgs {
        run: dir.join("run"),
        peft: exported.clone(),
    })
    .unwrap();
    let data = write_eval_json(&dir);
    let answers = |model: HfEvalModel| {
        let mut a = eval_args(&data, false);
        a.model = model;
        eval_hf(&Cpu, &a)
            .unwrap()
            .outcomes
            .into_iter()
            .map(|o| o.generated)
            .collect::<Vec<_>>()
    };
    let from_run = answers(HfEvalModel::Run(dir.join("run")));
    // `eval --checkpoint` scores the built-in task: it refuses a conversation-data run.
    let err = dualpriv::cmd::eval::eval(
        &Cpu,
        &dualpriv::cmd::eval::EvalArgs {
            checkpoint: dir.join("run"),
            test_examples: 4,
            data_seed: 2,
        },
    )
    .map(|_| ())
    .expect_err("a conversation-data run is not evaluated on the built-in task")
    .to_string();
    assert!(err.contains("eval --run"), "{err}");
    let folder = |adapter: &Path| HfEvalModel::Folder {
        model: fixture("hub"),
        adapter: Some(adapter.to_path_buf()),
    };
    assert_eq!(from_run, answers(folder(&exported)));
    assert_ne!(from_run, answers(folder(&fixture("adapter"))));
    // Without it, the LoRA B starts at zero (PEFT's init), so the start differs.
    let fresh = prepare(&Cpu, &hf_train_args(&common::tmp_dir("hf_no_init"), None)).unwrap();
    let b = want
        .tensors
        .iter()
        .find(|t| t.name.contains("lora_B"))
        .unwrap();
    assert!(fresh
        .trainer
        .model
        .tensor(&b.name)
        .unwrap()
        .iter()
        .all(|&x| x == 0.0));
    assert!(fresh.trainer.cfg.init_adapter.is_none());
    // A resume given another adapter is refused; the same one, or none, is fine.
    let other = altered_adapter(&dir.join("other"), |t| t.data[0] += 1.0);
    let resume = |init: Option<PathBuf>| {
        let mut r = hf_train_args(&dir, init);
        r.out = None;
        r.resume = Some(dir.join("run"));
        r.steps = 2;
        prepare(&Cpu, &r).map(|_| ())
    };
    let e = resume(Some(other)).unwrap_err().to_string();
    assert!(
        e.contains("started from the adapter") && e.contains("old"),
        "{e}"
    );
    resume(Some(old)).unwrap();
    resume(None).unwrap();
}

#[test]
fn init_adapter_rank_and_alpha_are_checked_or_taken() {
    let spec = |r: Option<usize>, alpha: f32| ModelSpec {
        preset: String::new(),
        lora_rank: r,
        lora_alpha: alpha,
        full_groups: vec!["mlp".into()],
    };
    let ad = fixture("adapter");
    // Defaults not given: taken from the adapter (r = 4, α = 8).
    let mut s = spec(Some(8), 16.0);
    lora_from_adapter(&mut s, &ad, false, false).unwrap();
    assert_eq!((s.lora_rank, s.lora_alpha), (Some(4), 8.0));
    // Given and agreeing.
    let mut s = spec(Some(4), 8.0);
    lora_from_adapter(&mut s, &ad, true, true).unwrap();
    // Given and disagreeing.
    let e = lora_from_adapter(&mut spec(Some(8), 8.0), &ad, true, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("r = 4") && e.contains("rank 8"), "{e}");
    let e = lora_from_adapter(&mut spec(Some(4), 32.0), &ad, false, true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_alpha = 8") && e.contains("alpha 32"),
        "{e}"
    );
    let e = lora_from_adapter(&mut spec(None, 0.0), &ad, true, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a LoRA run"), "{e}");
}

#[test]
fn cli_train_init_adapter_takes_the_adapters_rank_or_names_the_flags() {
    let dir = common::tmp_dir("hf_init_cli");
    let json = train_json(&dir);
    let run = |extra: &[&str], out: &str| {
        bin()
            .args([
                "train",
                "--method",
                "nonprivate",
                "--steps",
                "1",
                "--batch",
                "2",
            ])
            .args([
                "--micro-batch",
                "2",
                "--insecure-seed",
                "1",
                "--public-size",
                "2",
            ])
            .args(["--max-text-len", "96"])
            .arg("--model")
            .arg(fixture("hub"))
            .arg("--data")
            .arg(&json)
            .arg("--image-folder")
            .arg(fixture(""))
            .arg("--init-adapter")
            .arg(fixture("adapter"))
            .arg("--out")
            .arg(dir.join(out))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[], "a");
    assert!(out.status.success(), "{}", stderr(&out));
    let (state, _) = dualpriv::train::checkpoint::load_state(&dir.join("a")).unwrap();
    assert_eq!(
        (state.model.lora_rank, state.model.lora_alpha),
        (Some(4), 8.0)
    );
    assert!(state.train.init_adapter.is_some());
    let out = run(&["--lora-rank", "8"], "b");
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("r = 4") && e.contains("--init-adapter, --lora-rank"),
        "{e}"
    );
    // Only with --model.
    let out = bin()
        .args(["train", "--out"])
        .arg(dir.join("c"))
        .arg("--init-adapter")
        .arg(fixture("adapter"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--model"), "{}", stderr(&out));
}
