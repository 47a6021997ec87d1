//! The dualpriv command line: flags and printing only. Each command's work is a
//! library function in [`dualpriv::cmd`] (or [`dualpriv::selfcheck`]); this file
//! maps the flags onto its settings, prints what it returns, and names the flag
//! behind an error the library reports in its own terms.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use dualpriv::backend::cpu::Cpu;
use dualpriv::backend::dp::DpBackend;
use dualpriv::cmd::account::{self, AccountAnswer, AccountArgs};
use dualpriv::cmd::bench::{self, BenchArgs, Device};
use dualpriv::cmd::demo::{self, DemoArgs, DemoReport};
use dualpriv::cmd::eval::{self, EvalArgs, HfEvalArgs, HfEvalModel};
use dualpriv::cmd::export::{self, ExportArgs, MergeArgs};
use dualpriv::cmd::generate::{self, GenerateArgs, StopReason};
use dualpriv::cmd::pretrain::{self, PretrainArgs};
use dualpriv::cmd::study::{self, StudyArgs, StudyOutcome};
use dualpriv::cmd::train::{self, HfData, TrainArgs};
use dualpriv::dp::accountant::AccountantKind;
use dualpriv::dp::noise::RngKind;
use dualpriv::error::Setting;
use dualpriv::hf::conversation::Template;
use dualpriv::hf::image::AspectMode;
use dualpriv::selfcheck;
use dualpriv::study::run::Settings;
use dualpriv::study::spec::Plan;
use dualpriv::train::checkpoint::ModelSpec;
use dualpriv::train::method::Method;
use dualpriv::train::optim::{OptConfig, OptKind};
use dualpriv::train::sampler::Sampling;
use dualpriv::train::{PruneScope, RunSummary};
use dualpriv::{Error, Result};

#[global_allocator]
static ALLOC: dualpriv::mem::CountingAlloc = dualpriv::mem::CountingAlloc;

/// Differentially private fine-tuning of multimodal LLMs with Dual-Priv Pruning.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Cpu,
    Cuda,
}

/// What `dualpriv data` writes.
#[derive(Subcommand)]
enum DataCmd {
    /// The built-in synthetic task (the demo's data: train seed 1, test seed 2).
    Synthetic {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Which split.
        #[arg(long, value_enum, default_value = "private")]
        split: SplitArg,
        /// Examples.
        #[arg(long, default_value_t = 8000)]
        examples: usize,
        /// Seed of the split (the demo trains on seed 1 and tests on seed 2).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Image side in pixels (the tiny model's is 32).
        #[arg(long, default_value_t = 32)]
        image_size: usize,
    },
}

/// A split of the built-in task.
#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    /// The public pretraining split.
    Public,
    /// The private fine-tuning split.
    Private,
    /// The held-out test split.
    Test,
}

#[derive(Subcommand)]
enum Cmd {
    /// The README's main job: fine-tunes the shipped tiny pretrained model on the
    /// built-in private task with nonprivate, dpsgd, dualpriv and dpzo at ε = 3, δ = 1e-5, and prints one
    /// table of accuracy, ε, peak memory and time (CPU, a few minutes on 2 cores).
    ///
    /// Example: cargo run --release -- demo
    #[command(verbatim_doc_comment)]
    Demo {
        /// The pretrained LLaVA folder (pretrained first when it has no config.json and weights).
        #[arg(long, default_value = "assets/tiny-pretrained")]
        pretrained: PathBuf,
        /// Where the fine-tunes write checkpoints and metrics.
        #[arg(long, default_value = "target/demo")]
        out: PathBuf,
        /// Private training examples.
        #[arg(long, default_value_t = 16000)]
        train_examples: usize,
        /// Test examples.
        #[arg(long, default_value_t = 1000)]
        test_examples: usize,
        /// Target ε of every DP run.
        #[arg(long, default_value_t = 3.0)]
        epsilon: f64,
        /// δ of every DP run.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
    },
    /// The utility study: every method at ε ∈ {1, 3, 8} and ∞ and every dualpriv ablation
    /// at ε = 3, 3 repetitions each; writes DIR/results.jsonl (a line per finished run),
    /// DIR/RESULTS.md (tables) and DIR/plots/ (PNG, SVG). About 30 minutes on 2 cores;
    /// an interrupted study continues with --resume DIR.
    ///
    /// Examples:
    ///   dualpriv study --out target/study
    ///   dualpriv study --resume target/study
    ///   dualpriv study --quick --out target/study-quick
    #[command(verbatim_doc_comment)]
    Study(StudyFlags),
    /// Non-private pretraining on the public split: builds the public starting
    /// checkpoint (projector, decoder, embeddings and lm_head trained; the vision
    /// tower stays frozen).
    ///
    /// Example (the recipe of the shipped checkpoint):
    ///   dualpriv pretrain --out assets/tiny-pretrained
    #[command(verbatim_doc_comment)]
    Pretrain {
        /// Output checkpoint folder.
        #[arg(long)]
        out: PathBuf,
        /// Model preset.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Public examples.
        #[arg(long, default_value_t = 40_000)]
        examples: usize,
        /// Optimizer steps.
        #[arg(long, default_value_t = 2000)]
        steps: u32,
        /// Batch size.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// AdamW learning rate.
        #[arg(long, default_value_t = 1e-3)]
        lr: f32,
        /// Seed of data and initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Writes the built-in task as LLaVA conversation data: DIR/<split>.json and
    /// the images DIR/<split>/NNNNNN.png, the records the demo and `train` render
    /// in memory (same pixels, same ids), for `train --model`, `eval --data` or any
    /// LLaVA tool.
    ///
    /// Examples:
    ///   dualpriv data synthetic --out data/builtin --split private --examples 8000 --seed 1
    ///   dualpriv data synthetic --out data/builtin --split test --examples 1000 --seed 2
    #[command(verbatim_doc_comment)]
    Data {
        #[command(subcommand)]
        what: DataCmd,
    },
    /// DP fine-tuning (or non-private, for comparison) from a pretrained checkpoint.
    ///
    /// Examples:
    ///   dualpriv train --method dualpriv --init assets/tiny-pretrained --out runs/dp --epsilon 3
    ///   dualpriv train --method ghost --init assets/tiny-pretrained --out runs/ghost --epsilon 3 --accountant rdp
    ///   dualpriv train --method dualpriv --init assets/tiny-pretrained --out runs/ablate --epsilon 3 --keep-frac 1 --no-token-pruning
    ///   dualpriv train --resume runs/dp --steps 200
    #[command(verbatim_doc_comment)]
    Train(Box<TrainFlags>),
    /// Writes a LoRA run's adapter as a PEFT adapter folder (adapter_config.json +
    /// adapter_model.safetensors) that peft.PeftModel.from_pretrained loads.
    ///
    /// With --merged, writes the HF model folder with the LoRA merged in
    /// (W + (alpha/r)·B·A in the base's dtype; every other tensor and the config,
    /// tokenizer and processor files copied), for LlavaForConditionalGeneration.
    ///
    /// Examples:
    ///   dualpriv export --run runs/dp --peft runs/dp/adapter
    ///   dualpriv export --run runs/dp --merged runs/dp/merged
    #[command(verbatim_doc_comment)]
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["peft", "merged"])))]
    Export {
        /// The run folder (a `train --out` folder).
        #[arg(long)]
        run: PathBuf,
        /// Where to write the PEFT adapter.
        #[arg(long)]
        peft: Option<PathBuf>,
        /// Where to write the merged HF model (a new or empty folder; HF runs only).
        #[arg(long)]
        merged: Option<PathBuf>,
    },
    /// Memory of a model without training it: with --model alone, loads a transformers
    /// LLaVA folder on the CPU and prints the parameter counts, the f32 bytes and the
    /// process's peak resident set (the loader's host-memory bound); with --plan, the
    /// device memory of one training step of each method (the model code run on
    /// buffer sizes only; no GPU needed), for --preset or --model's config.json.
    ///
    /// Examples:
    ///   dualpriv inspect --model path/to/llava-1.5-7b-hf
    ///   dualpriv inspect --plan --model path/to/llava-1.5-7b-hf --lora-rank 128 --batch 4
    ///   dualpriv inspect --plan --preset llava-7b --lora-rank 128 --batch 4 --method dualpriv
    #[command(verbatim_doc_comment)]
    Inspect {
        /// A transformers LLaVA folder (with --plan only its config.json is read).
        #[arg(long, required_unless_present = "preset")]
        model: Option<PathBuf>,
        /// A model preset (with --plan).
        #[arg(long, conflicts_with = "model", requires = "plan")]
        preset: Option<String>,
        /// Print the device memory plan instead of loading the weights.
        #[arg(long)]
        plan: bool,
        /// LoRA rank on every decoder linear (α = 2r).
        #[arg(long, default_value_t = 128)]
        lora_rank: usize,
        /// Examples per step (with --plan).
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Comma list of methods, or "all" (with --plan).
        #[arg(long, default_value = "all")]
        method: String,
    },
    /// Step time, memory and throughput of each training method on a fixed batch.
    ///
    /// Examples:
    ///   dualpriv bench --backend cpu --preset tiny --method all --batch 32
    ///   dualpriv bench --backend cpu --method ghost,nonprivate --json
    ///   dualpriv bench --preset small --batch 32 --describe
    ///   dualpriv bench --backend cuda --preset llava-7b --lora-rank 128 --batch 4 --method all
    #[command(verbatim_doc_comment)]
    Bench {
        /// Backend (cuda needs a build with `--features cuda`).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
        /// Model preset.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Comma list of methods, or "all".
        #[arg(long, default_value = "all")]
        method: String,
        /// Examples per step.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Visual tokens kept by dualpriv (K).
        #[arg(long)]
        keep_tokens: Option<usize>,
        /// Update fraction of dualpriv.
        #[arg(long, default_value_t = 0.8)]
        keep_frac: f64,
        /// LoRA rank.
        #[arg(long, default_value_t = 8)]
        lora_rank: usize,
        /// Timed steps per method (after 2 warm-up steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Print JSON instead of a markdown table.
        #[arg(long)]
        json: bool,
        /// Print, as JSON, the model and step settings the run would time (sizes,
        /// LoRA, trainable count, text length, per-method optimizer, C and σ), for a
        /// peer implementation to build the same model; times nothing.
        #[arg(long)]
        describe: bool,
        /// After timing, profile as many steps again op by op, with all threads and
        /// on one thread, and print each method's table (CPU backend only: CUDA ops
        /// return before the device finishes).
        #[arg(long)]
        profile: bool,
        /// Go round the methods one timed step at a time, each with its own model
        /// and each round starting one method later, so a slow spell of a shared
        /// machine falls on all of them alike (their ratios then come from one
        /// run); without it each method's steps run in a block, on one model handed
        /// from method to method. CPU backend only.
        #[arg(long)]
        interleave: bool,
    },
    /// Accuracy of a checkpoint on the built-in test split (--checkpoint), or
    /// exact-match accuracy of greedy generation on LLaVA conversation JSON
    /// (--model HF_DIR [--adapter DIR], or --run of a `train --model` run, with --data).
    ///
    /// With --data, every assistant turn of every record is generated from the
    /// conversation before it (earlier reference answers included) and compared
    /// with its reference after trimming whitespace, case-sensitively unless
    /// --ignore-case. Only the aggregate is printed; --show-answers also prints each
    /// answer, which reveals the test data (the test set is not covered by any
    /// training ε; the training data is not revealed by this).
    ///
    /// Examples:
    ///   dualpriv eval --checkpoint runs/dp
    ///   dualpriv eval --model llava-1.5-7b-hf --adapter runs/dp/adapter --data test.json --image-folder images/
    ///   dualpriv eval --run runs/dp --data test.json --image-folder images/
    #[command(verbatim_doc_comment)]
    Eval {
        /// Checkpoint folder written by `train` or `pretrain` (the built-in task).
        #[arg(long, required_unless_present_any = ["model", "run"], conflicts_with_all = ["model", "run", "data"])]
        checkpoint: Option<PathBuf>,
        /// Test examples.
        #[arg(long, default_value_t = 1000)]
        test_examples: usize,
        /// Seed of the test split.
        #[arg(long, default_value_t = 2)]
        data_seed: u64,
        /// A transformers LLaVA folder to evaluate on --data.
        #[arg(long, requires = "data", conflicts_with = "run")]
        model: Option<PathBuf>,
        /// A PEFT LoRA adapter to apply to --model.
        #[arg(long, requires = "model")]
        adapter: Option<PathBuf>,
        /// A `train --model` run folder: its current checkpoint is evaluated on --data.
        #[arg(long, requires = "data")]
        run: Option<PathBuf>,
        /// LLaVA conversation JSON of test records (each ending with an answer).
        #[arg(long)]
        data: Option<PathBuf>,
        /// The folder the records' image paths are relative to.
        #[arg(long)]
        image_folder: Option<PathBuf>,
        /// Prompt template (the one the model was trained with).
        #[arg(long, value_enum, default_value = "vicuna-v1")]
        template: TemplateFlag,
        /// How images become squares (the one the model was trained with).
        #[arg(long, value_enum, default_value = "pad")]
        aspect: AspectFlag,
        /// At most this many new tokens per answer.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Compare answers case-insensitively.
        #[arg(long)]
        ignore_case: bool,
        /// Also print every answer with its reference: REVEALS THE TEST DATA.
        #[arg(long)]
        show_answers: bool,
        /// Backend (cuda needs a build with `--features cuda`).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
    },
    /// Greedy decoding with a transformers LLaVA folder (and a PEFT adapter) for one
    /// image and question; prints the answer. No KV cache yet: each new token
    /// recomputes the forward. Text-only prompts are not supported yet.
    ///
    /// Example:
    ///   dualpriv generate --model llava-1.5-7b-hf --adapter runs/dp/adapter --image cat.png --prompt $'<image>\nWhat is this?'
    #[command(verbatim_doc_comment)]
    Generate {
        /// A transformers LLaVA folder.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter folder (e.g. from `dualpriv export --peft`).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The image (PNG or JPEG).
        #[arg(long)]
        image: Option<PathBuf>,
        /// The question, with `<image>` where the image goes.
        #[arg(long)]
        prompt: String,
        /// Prompt template: vicuna-v1 (LLaVA-1.5's training format) or llava-hf.
        #[arg(long, value_enum, default_value = "vicuna-v1")]
        template: TemplateFlag,
        /// How the image becomes a square: pad (LLaVA-1.5) or crop (transformers).
        #[arg(long, value_enum, default_value = "pad")]
        aspect: AspectFlag,
        /// At most this many new tokens.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Backend (cuda needs a build with `--features cuda`).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
    },
    /// Checks every mechanism against its reference (and the GPU against the CPU
    /// when built with `--features cuda` on a machine with a GPU).
    ///
    /// Example: cargo run --release -- selfcheck
    Selfcheck,
    /// Micro-benchmarks of each kernel: median time and throughput, as markdown.
    ///
    /// Examples:
    ///   dualpriv bench-kernels --backend cpu
    ///   dualpriv bench-kernels --backend cuda
    BenchKernels {
        /// Where to run: the CPU reference or the CUDA kernels.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
    },
    /// One-run empirical privacy audit (Steinke, Nasr & Jagielski 2023): an ε lower bound at
    /// 95 % confidence per method and claimed ε, from canaries each included by a secret coin,
    /// on the built-in task from the pretrained checkpoint. White-box gradient canaries for
    /// the gradient methods, black-box (wrong-answer) ones for dpzo. Nothing is persisted
    /// except --out's table: the bounds concern these audit runs only.
    ///
    /// Examples:
    ///   dualpriv audit                       # the default audit (every method, ε = 1, 3, 8)
    ///   dualpriv audit --method dpsgd --epsilon 3 --canaries 1000 --out target/audit
    ///   dualpriv audit --quick
    #[command(verbatim_doc_comment)]
    Audit(Box<AuditFlags>),
    /// Privacy accounting for the Poisson-subsampled Gaussian mechanism.
    ///
    /// Prints ε for a noise multiplier, or the smallest noise multiplier for a
    /// target ε. The last line is `epsilon = <value>` or `noise_multiplier = <value>`.
    ///
    /// Examples:
    ///   dualpriv account --sample-rate 0.01 --noise-multiplier 1.0 --steps 1000 --delta 1e-5
    ///   dualpriv account --sample-rate 0.01 --target-epsilon 3 --steps 1000 --delta 1e-5
    ///   dualpriv account --accountant pld --sample-rate 0.004 --noise-multiplier 1.1 --steps 10000 --delta 1e-5
    #[command(verbatim_doc_comment)]
    Account {
        /// Poisson sampling rate q = B_expected / N, in (0, 1].
        #[arg(long)]
        sample_rate: f64,
        /// Noise multiplier σ (noise std / clipping norm).
        #[arg(
            long,
            conflicts_with = "target_epsilon",
            required_unless_present = "target_epsilon"
        )]
        noise_multiplier: Option<f64>,
        /// Target ε: print the smallest σ that reaches it instead.
        #[arg(long)]
        target_epsilon: Option<f64>,
        /// Number of steps T.
        #[arg(long)]
        steps: u64,
        /// δ of the (ε, δ) guarantee, in (0, 1).
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// Accountant: pld (the default; tight, matches dp_accounting) or rdp (Opacus-compatible).
        #[arg(long, value_enum, ignore_case = true, default_value = "pld")]
        accountant: AccountantKind,
    },
}

fn main() -> ExitCode {
    // Before any thread exists, so the rayon pool inherits it (see its doc);
    // DUALPRIV_IEEE_SUBNORMALS set (to any value) keeps IEEE subnormals (slower).
    if std::env::var_os("DUALPRIV_IEEE_SUBNORMALS").is_none() {
        dualpriv::backend::cpu::math::flush_subnormals_on_this_thread();
    }
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Demo {
            pretrained,
            out,
            train_examples,
            test_examples,
            epsilon,
            delta,
        } => {
            let a = DemoArgs {
                pretrained,
                out,
                train_examples,
                test_examples,
                epsilon,
                delta,
                progress: true,
            };
            demo::demo(&Cpu, &a).map(|rep| {
                print_demo(&rep);
                true
            })
        }
        Cmd::Data {
            what:
                DataCmd::Synthetic {
                    out,
                    split,
                    examples,
                    seed,
                    image_size,
                },
        } => {
            let split = match split {
                SplitArg::Public => dualpriv::data::synthetic::Split::Public,
                SplitArg::Private => dualpriv::data::synthetic::Split::Private,
                SplitArg::Test => dualpriv::data::synthetic::Split::Test,
            };
            dualpriv::data::builtin::write(&out, split, examples, seed, image_size).map(|json| {
                println!(
                    "wrote {examples} records to {} (images under {})",
                    json.display(),
                    out.display()
                );
                true
            })
        }
        Cmd::Study(f) => f.into_args().and_then(|a| {
            let out = study::study(&Cpu, &a)?;
            print_study(&out);
            Ok(true)
        }),
        Cmd::Pretrain {
            out,
            preset,
            examples,
            steps,
            batch,
            lr,
            seed,
        } => {
            let a = PretrainArgs {
                preset,
                out,
                examples,
                steps,
                batch,
                lr,
                seed,
                progress: true,
            };
            pretrain::pretrain(&Cpu, &a).map(|(s, acc)| {
                println!(
                    "pretrained {} steps in {:.1} s; held-out public accuracy {acc:.4}",
                    s.steps, s.seconds
                );
                println!("checkpoint: {}", a.out.join("model.safetensors").display());
                true
            })
        }
        Cmd::Inspect {
            model,
            preset,
            plan,
            lora_rank,
            batch,
            method,
        } => run_inspect(model, preset, plan, lora_rank, batch, &method).map(|()| true),
        Cmd::Export { run, peft, merged } => (|| -> Result<bool> {
            if let Some(peft) = peft {
                let r = export::export_peft(&ExportArgs {
                    run: run.clone(),
                    peft: peft.clone(),
                })?;
                println!(
                    "exported {} LoRA tensors (r = {}, step {}) for base model {} to {}",
                    r.tensors,
                    r.r,
                    r.step,
                    r.base_model,
                    peft.display()
                );
            }
            if let Some(out) = merged {
                let (r, step) = export::export_merged(&MergeArgs {
                    run,
                    out: out.clone(),
                })?;
                println!(
                    "merged model (step {step}) written to {}: {} LoRA weights merged, {} \
                     trained tensors replaced, {} copied unchanged; {} other files copied{}",
                    out.display(),
                    r.merged,
                    r.replaced,
                    r.copied,
                    r.other_files.len(),
                    if r.dtypes.iter().any(|d| d != "F32") {
                        format!(
                            "; merged weights rounded to the base's {} (nearest-even)",
                            r.dtypes.join("/")
                        )
                    } else {
                        String::new()
                    }
                );
            }
            Ok(true)
        })(),
        Cmd::Train(f) => {
            let backend = f.backend;
            let given = (f.lora_rank.is_some(), f.lora_alpha.is_some());
            let mut a = f.into_args();
            let init = a.hf.as_ref().and_then(|h| h.init_adapter.clone());
            match init {
                Some(dir) if a.resume.is_none() => {
                    train::lora_from_adapter(&mut a.model, &dir, given.0, given.1)
                        .map_err(|e| with_flag(e, "--init-adapter, --lora-rank, --lora-alpha"))
                }
                _ => Ok(()),
            }
            .and_then(|()| match backend {
                Backend::Cpu => train_on(&Cpu, &a),
                Backend::Cuda => with_cuda(|be| train_on(be, &a)),
            })
            .map(|_| true)
        }
        Cmd::Bench {
            backend,
            preset,
            method,
            batch,
            keep_tokens,
            keep_frac,
            lora_rank,
            steps,
            json,
            describe,
            profile,
            interleave,
        } => parse_methods(&method)
            .map(|methods| BenchArgs {
                preset,
                methods,
                batch,
                keep_tokens,
                keep_frac,
                lora_rank,
                warmup: 2,
                steps,
                profile,
                interleave,
            })
            .and_then(|a| {
                if describe {
                    let d = bench::describe(&a)?;
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&d)
                            .map_err(|e| Error::Format(e.to_string()))?
                    );
                    return Ok(());
                }
                match backend {
                    Backend::Cpu => bench_on(&Cpu, &a, json),
                    Backend::Cuda if profile => Err(Error::Config(
                        "bench --profile times ops on the host, which only the CPU backend \
                         finishes before returning; drop --profile with --backend cuda \
                         (nsys or ncu profile the kernels)"
                            .into(),
                    )),
                    Backend::Cuda if interleave => Err(Error::Config(
                        "bench --interleave keeps every method's model on the device, so each \
                         method's device peak would include the others'; drop --interleave \
                         with --backend cuda (CUDA events time the device alone)"
                            .into(),
                    )),
                    Backend::Cuda => with_cuda(|be| bench_on(be, &a, json)),
                }
            })
            .map(|_| true),
        Cmd::Eval {
            checkpoint,
            test_examples,
            data_seed,
            model,
            adapter,
            run,
            data,
            image_folder,
            template,
            aspect,
            max_new_tokens,
            ignore_case,
            show_answers,
            backend,
        } => match (checkpoint, data) {
            (Some(checkpoint), _) => {
                let a = EvalArgs {
                    checkpoint,
                    test_examples,
                    data_seed,
                };
                match backend {
                    Backend::Cpu => eval::eval(&Cpu, &a),
                    Backend::Cuda => with_cuda(|be| eval::eval(be, &a)),
                }
                .map(|r| {
                    println!(
                        "test examples = {}, majority baseline = {:.4}",
                        r.examples, r.majority_baseline
                    );
                    println!("accuracy = {:.4}", r.accuracy);
                    true
                })
            }
            (None, Some(data)) => {
                let which = match (model, run) {
                    (Some(model), _) => Ok(HfEvalModel::Folder { model, adapter }),
                    (None, Some(run)) => Ok(HfEvalModel::Run(run)),
                    (None, None) => Err(Error::Config(
                        "eval --data needs --model HF_DIR or --run RUNDIR".into(),
                    )),
                };
                which.and_then(|which| {
                    let a = HfEvalArgs {
                        model: which,
                        data,
                        image_folder,
                        template: template.into(),
                        aspect: aspect.into(),
                        max_new_tokens,
                        ignore_case,
                        keep_answers: show_answers,
                    };
                    match backend {
                        Backend::Cpu => eval::eval_hf(&Cpu, &a),
                        Backend::Cuda => with_cuda(|be| eval::eval_hf(be, &a)),
                    }
                    .map(|r| {
                        if show_answers {
                            println!("(per-answer lines reveal the test data)");
                            for o in &r.outcomes {
                                println!(
                                    "{} record {:?} turn {}: generated {:?}, reference {:?}",
                                    if o.correct { "match" } else { "miss " },
                                    o.id,
                                    o.turn,
                                    o.generated,
                                    o.reference
                                );
                            }
                        }
                        println!(
                            "records = {}, answers = {}, exact matches = {} ({})",
                            r.records,
                            r.answers,
                            r.correct,
                            if ignore_case {
                                "whitespace-trimmed, case-insensitive"
                            } else {
                                "whitespace-trimmed, case-sensitive"
                            }
                        );
                        println!("accuracy = {:.4}", r.accuracy);
                        true
                    })
                })
            }
            (None, None) => Err(Error::Config(
                "eval: give --checkpoint (the built-in task) or --data with --model or --run"
                    .into(),
            )),
        },
        Cmd::Generate {
            model,
            adapter,
            image,
            prompt,
            template,
            aspect,
            max_new_tokens,
            backend,
        } => {
            let a = GenerateArgs {
                model,
                adapter,
                image,
                prompt,
                template: template.into(),
                aspect: aspect.into(),
                max_new_tokens,
            };
            match backend {
                Backend::Cpu => generate::generate(&Cpu, &a),
                Backend::Cuda => with_cuda(|be| generate::generate(be, &a)),
            }
            .map(|g| {
                eprintln!(
                    "generated {} tokens ({})",
                    g.ids.len(),
                    match g.stop {
                        StopReason::Stop => "stopped at </s>",
                        StopReason::MaxTokens => "reached --max-new-tokens",
                        StopReason::ContextFull => "reached max_position_embeddings",
                    }
                );
                println!("{}", g.text);
                true
            })
        }
        Cmd::Selfcheck => selfcheck::run().map(|rep| {
            print!("{}", rep.markdown());
            rep.all_passed()
        }),
        Cmd::BenchKernels { backend } => {
            let dev = match backend {
                Backend::Cpu => Device::Cpu,
                Backend::Cuda => Device::Cuda,
            };
            bench::kernels(dev).map(|rows| {
                print!("{}", bench::markdown(&rows));
                print!("{}", bench::rng_ratios(&rows));
                true
            })
        }
        Cmd::Audit(f) => run_audit(*f),
        Cmd::Account {
            sample_rate,
            noise_multiplier,
            target_epsilon,
            steps,
            delta,
            accountant,
        } => {
            let a = AccountArgs {
                accountant,
                sample_rate,
                noise_multiplier,
                target_epsilon,
                steps,
                delta,
            };
            a.validate()
                .map(|()| {
                    println!(
                        "accountant = {accountant}, q = {sample_rate}, steps = {steps}, delta = {delta}"
                    )
                })
                .and_then(|()| account::account(&a))
                .map(|ans| {
                    match ans {
                        AccountAnswer::Epsilon(e) => println!("epsilon = {e}"),
                        AccountAnswer::NoiseMultiplier(s) => println!("noise_multiplier = {s}"),
                    }
                    true
                })
        }
    };
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("dualpriv: some checks failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            match flag_of(&e) {
                Some(flag) => eprintln!("dualpriv: {e} ({flag})"),
                None => eprintln!("dualpriv: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// The flag behind an error the library reports in its own terms.
fn flag_of(e: &Error) -> Option<&'static str> {
    Some(match e {
        Error::NoCudaDriver => "--backend cpu",
        Error::Setting { setting, .. } => match setting {
            Setting::OutDir => "to continue that run: --resume DIR; for a new one: another --out",
            Setting::RunDir => "`dualpriv train --out DIR` writes a run folder",
            Setting::Steps => "--steps",
            Setting::Optimizer => "--lr, --momentum, --weight-decay",
            Setting::KeepTokens => "--keep-tokens",
            Setting::ContextTokens => "--context-tokens, or fewer --keep-tokens",
            Setting::KeepFrac => "--keep-frac",
            _ => return None,
        },
        _ => return None,
    })
}

/// `e` with the flags to change named after its message.
fn with_flag(e: Error, flags: &str) -> Error {
    match e {
        Error::Config(m) => Error::Config(format!("{m} ({flags})")),
        other => other,
    }
}

/// `--template`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum TemplateFlag {
    VicunaV1,
    LlavaHf,
}

/// `--aspect`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum AspectFlag {
    Pad,
    Crop,
}

impl From<TemplateFlag> for Template {
    fn from(t: TemplateFlag) -> Self {
        match t {
            TemplateFlag::VicunaV1 => Template::VicunaV1,
            TemplateFlag::LlavaHf => Template::LlavaHf,
        }
    }
}

impl From<AspectFlag> for AspectMode {
    fn from(a: AspectFlag) -> Self {
        match a {
            AspectFlag::Pad => AspectMode::Pad,
            AspectFlag::Crop => AspectMode::Crop,
        }
    }
}

/// Flags of `dualpriv train` (their defaults are [`TrainArgs::default`]'s, tested).
#[derive(clap::Args)]
struct TrainFlags {
    /// The training method.
    #[arg(long, value_enum, ignore_case = true, default_value = "dualpriv")]
    method: Method,
    /// The pretrained LLaVA folder the built-in task fine-tunes (config.json,
    /// model.safetensors, tokenizer.json, preprocessor_config.json; written by
    /// `dualpriv pretrain`).
    #[arg(long, default_value = "assets/tiny-pretrained")]
    init: PathBuf,
    /// Output folder: checkpoints, metrics.jsonl, state.json.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run saved in this folder (same data; ε keeps accumulating).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Target ε (σ is calibrated for --steps; training stops before exceeding it).
    #[arg(long)]
    epsilon: Option<f64>,
    /// δ.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// Fixed noise multiplier σ instead of a target ε.
    #[arg(long, conflicts_with = "epsilon")]
    noise_multiplier: Option<f64>,
    /// Accountant: pld (tighter) or rdp.
    #[arg(long, value_enum, ignore_case = true, default_value = "pld")]
    accountant: AccountantKind,
    /// Logical steps.
    #[arg(long, default_value_t = 25)]
    steps: u32,
    /// Expected batch size (Poisson rate q = batch / N).
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Largest physical micro-batch.
    #[arg(long, default_value_t = 128)]
    micro_batch: usize,
    /// poisson (accounted) or shuffle (NOT covered by the accounting).
    #[arg(long, value_enum, default_value = "poisson")]
    sampling: Sampling,
    /// The optimizer.
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptKind,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-2)]
    lr: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.0)]
    momentum: f32,
    /// Weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Per-example clipping norm C.
    #[arg(long, default_value_t = 1.0)]
    clip_norm: f32,
    /// Visual tokens: K dominant patches kept (dualpriv default 6 for tiny, 53 for llava).
    #[arg(long)]
    keep_tokens: Option<usize>,
    /// Visual tokens: M contextual tokens (default 2 for tiny, 10 for llava).
    #[arg(long)]
    context_tokens: Option<usize>,
    /// Switch visual token pruning off (ablation).
    #[arg(long)]
    no_token_pruning: bool,
    /// Heuristic noise on fused tokens (NOT part of the DP guarantee).
    #[arg(long, default_value_t = 0.0)]
    fuse_noise_std: f32,
    /// Fraction of coordinates updated per step (dualpriv; 1 switches update pruning off).
    #[arg(long, default_value_t = 0.8)]
    keep_frac: f64,
    /// tensor or global top-k threshold.
    #[arg(long, value_enum, default_value = "tensor")]
    prune_scope: PruneScope,
    /// LoRA rank (0: full fine-tuning of --full groups) [default: 8, or the
    /// --init-adapter's r]
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha [default: 16, or the --init-adapter's lora_alpha]
    #[arg(long)]
    lora_alpha: Option<f32>,
    /// Full fine-tuning groups when --lora-rank 0 (comma list of projector, attention, mlp, lm_head).
    #[arg(long, default_value = "projector,attention,mlp,lm_head")]
    full: String,
    /// DPZO perturbation scale λ.
    #[arg(long, default_value_t = 1e-2)]
    dpzo_lambda: f32,
    /// Private training examples of the built-in task.
    #[arg(long, default_value_t = 8000)]
    train_examples: usize,
    /// Seed of the built-in private data (public: it controls only data
    /// generation; batches and noise come from the run's secret key).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// NOT PRIVATE: derive the run key from this number instead of OS entropy, so
    /// batches and noise are reproducible by anyone. The run reports ε = ∞.
    #[arg(long)]
    insecure_seed: Option<u64>,
    /// Noise generator: chacha20 (cryptographic, default) or philox (faster, not
    /// cryptographic).
    #[arg(long, default_value = "chacha20", value_parser = parse_rng)]
    rng: RngKind,
    /// Also log the private batches' loss, size and non-finite count to
    /// metrics.jsonl and the progress bar. NOT covered by ε.
    #[arg(long)]
    log_private_stats: bool,
    /// Evaluate on the held-out test split every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    eval_every: u32,
    /// Held-out test examples for --eval-every.
    #[arg(long, default_value_t = 1000)]
    eval_examples: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u32,
    /// A transformers LLaVA folder (config.json, safetensors, tokenizer.json,
    /// preprocessor_config.json) to fine-tune on --data instead of --init on the
    /// built-in task.
    #[arg(long, requires = "data")]
    model: Option<PathBuf>,
    /// LLaVA conversation JSON to train on (with --model). One record is the DP unit.
    #[arg(long, requires = "model")]
    data: Option<PathBuf>,
    /// The folder the records' image paths are relative to.
    #[arg(long)]
    image_folder: Option<PathBuf>,
    /// Prompt template for --data: vicuna-v1 (LLaVA-1.5's training format) or
    /// llava-hf (the Hub's chat template).
    #[arg(long, value_enum, default_value = "vicuna-v1")]
    template: TemplateFlag,
    /// How --data images become squares: pad (LLaVA-1.5's training) or crop
    /// (transformers' processor).
    #[arg(long, value_enum, default_value = "pad")]
    aspect: AspectFlag,
    /// Records longer than this many tokens are truncated (and counted).
    #[arg(long, default_value_t = 2048)]
    max_text_len: usize,
    /// With --data: a public dataset size N for the sampling rate q = batch / N, one
    /// that does not depend on the private records (without it the record count is
    /// used and published).
    #[arg(long, requires = "data")]
    public_size: Option<usize>,
    /// With --model: start the LoRA from this PEFT adapter folder instead of a fresh
    /// init (its r and lora_alpha are taken unless --lora-rank/--lora-alpha are given,
    /// which must then agree). The adapter MUST BE PUBLIC: ε covers only --data, so
    /// an adapter trained on private data without its own accounting leaks that data.
    #[arg(long, requires = "model")]
    init_adapter: Option<PathBuf>,
    /// Backend (cuda needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
}

/// `--rng`: the library's names, any case.
fn parse_rng(s: &str) -> std::result::Result<RngKind, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

impl TrainFlags {
    /// The library's settings for these flags.
    fn into_args(self) -> TrainArgs {
        let opt = match self.optimizer {
            OptKind::Adamw => OptConfig::adamw(self.lr),
            OptKind::Sgd => OptConfig::sgd(self.lr),
        };
        TrainArgs {
            method: self.method,
            model: ModelSpec {
                preset: format!(
                    "{}{}",
                    dualpriv::train::checkpoint::HF_PRESET,
                    self.init.display()
                ),
                lora_rank: Some(self.lora_rank.unwrap_or(8)).filter(|&r| r > 0),
                lora_alpha: self.lora_alpha.unwrap_or(16.0),
                full_groups: self
                    .full
                    .split(',')
                    .map(|g| g.trim().to_string())
                    .filter(|g| !g.is_empty())
                    .collect(),
            },
            init: self.init,
            out: self.out,
            resume: self.resume,
            epsilon: self.epsilon,
            delta: self.delta,
            noise_multiplier: self.noise_multiplier,
            accountant: self.accountant,
            steps: self.steps,
            batch: self.batch,
            micro_batch: self.micro_batch,
            sampling: self.sampling,
            opt: OptConfig {
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                ..opt
            },
            clip_norm: self.clip_norm,
            token_pruning: !self.no_token_pruning,
            keep_tokens: self.keep_tokens,
            context_tokens: self.context_tokens,
            fuse_noise_std: self.fuse_noise_std,
            keep_frac: self.keep_frac,
            prune_scope: self.prune_scope,
            dpzo_lambda: self.dpzo_lambda,
            train_examples: self.train_examples,
            seed: self.seed,
            insecure_seed: self.insecure_seed,
            rng: self.rng,
            log_private_stats: self.log_private_stats,
            eval_every: self.eval_every,
            eval_examples: self.eval_examples,
            checkpoint_every: self.checkpoint_every,
            progress: true,
            hf: match (self.model, self.data) {
                (Some(model), Some(data)) => Some(HfData {
                    model,
                    data,
                    image_folder: self.image_folder,
                    template: self.template.into(),
                    aspect: self.aspect.into(),
                    max_text_len: self.max_text_len,
                    public_size: self.public_size,
                    init_adapter: self.init_adapter,
                }),
                _ => None,
            },
        }
    }
}

fn train_on<B: DpBackend>(be: &B, a: &TrainArgs) -> Result<()> {
    if let (Some(s), None) = (a.insecure_seed, &a.resume) {
        eprintln!(
            "warning: --insecure-seed {s}: batches and noise follow a public number, so this \
             run is NOT private; its ε is reported as ∞ in its outputs and the ledger"
        );
    }
    let mut job = train::prepare(be, a)?;
    let t = &job.trainer;
    match &a.resume {
        Some(dir) => eprintln!(
            "resuming {} at step {} of {}",
            dir.display(),
            t.step,
            t.cfg.steps
        ),
        None => eprintln!(
            "{}: {} trainable values, q = {:.4}, sigma = {:.4}",
            a.method,
            t.model.trainable().iter().map(|p| p.len).sum::<usize>(),
            a.batch as f64 / t.cfg.public_size.unwrap_or(job.data.len()) as f64,
            t.sigma
        ),
    }
    report(job.run()?);
    Ok(())
}

/// `dualpriv inspect`: a load's host memory, or a step's device memory plan.
fn run_inspect(
    model: Option<PathBuf>,
    preset: Option<String>,
    plan: bool,
    lora_rank: usize,
    batch: usize,
    method: &str,
) -> Result<()> {
    use dualpriv::cmd::inspect;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if !plan {
        let dir = model.ok_or_else(|| Error::Config("inspect needs --model DIR".into()))?;
        let r = inspect::load(&dir, lora_rank)?;
        println!("{}", r.summary);
        for (g, n) in &r.groups {
            println!("  {g:<17} {n:>14} values");
        }
        println!(
            "converted f32 model: {} bytes ({:.3} GiB); tensor files on disk {:.3} GiB; load {:.1} s",
            r.f32_bytes,
            gib(r.f32_bytes),
            gib(r.file_bytes),
            r.seconds
        );
        if let Some(h) = r.peak_heap {
            println!(
                "peak heap {h} bytes ({:.3} GiB, {:.4}x the f32 model)",
                gib(h),
                h as f64 / r.f32_bytes as f64
            );
        }
        match r.peak_rss {
            Some(p) => println!(
                "peak RSS (VmHWM) {p} bytes ({:.3} GiB, {:.4}x the f32 model)",
                gib(p),
                p as f64 / r.f32_bytes as f64
            ),
            None => println!("peak RSS: /proc/self/status is not readable here"),
        }
        return Ok(());
    }
    let preset = match (&model, preset) {
        (Some(dir), _) => format!(
            "{}{}",
            dualpriv::train::checkpoint::HF_PRESET,
            dir.display()
        ),
        (None, Some(p)) => p,
        (None, None) => {
            return Err(Error::Config(
                "inspect --plan needs --model DIR or --preset NAME".into(),
            ))
        }
    };
    let spec = bench::bench_spec(&preset, lora_rank);
    let p = inspect::plan(&spec, batch, &parse_methods(method)?)?;
    println!(
        "model {}: {} base + {} trainable parameters; weights on the device {:.2} GiB (f32); \
         batch {batch}, {} text tokens, LoRA r={lora_rank}",
        p.model,
        p.base_params,
        p.trainable_params,
        gib(p.weight_bytes),
        p.text_len
    );
    println!(
        "| method | peak GiB (pool classes) | peak GiB (requested) | resident after step GiB |"
    );
    println!("|---|---|---|---|");
    for r in &p.rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} |",
            r.method,
            gib(r.peak_bytes),
            gib(r.requested_peak_bytes),
            gib(r.resident_bytes)
        );
    }
    Ok(())
}

/// `--method`: a comma list of methods, or `all`.
fn parse_methods(list: &str) -> Result<Vec<Method>> {
    if list == "all" {
        return Ok(Method::ALL.to_vec());
    }
    list.split(',').map(|m| m.parse()).collect()
}

fn bench_on<B: DpBackend>(be: &B, a: &BenchArgs, json: bool) -> Result<()> {
    let rows = bench::methods(be, a)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).map_err(|e| Error::Format(e.to_string()))?
        );
        return Ok(());
    }
    let device = be
        .device_name()
        .unwrap_or_else(|| format!("cpu, {} threads", rayon::current_num_threads()));
    println!(
        "preset {}, batch {}, LoRA r={}, backend {} ({device}{})",
        a.preset,
        a.batch,
        a.lora_rank,
        be.name(),
        if be.tf32_gemms() { ", TF32 GEMMs" } else { "" }
    );
    println!(
        "| method | median step | peak memory (step) | allocs/step | of which GEMM | pool misses/step | tokens/s | visual tokens | model TFLOP/step | of peak |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let mem = match (r.device_peak_bytes, r.peak_bytes) {
            (Some(d), _) => format!("{} device", mib(d as usize)),
            (None, Some(h)) => format!("{} heap", mib(h)),
            (None, None) => "n/a".into(),
        };
        println!(
            "| {} | {:.1} ms | {mem} | {} | {} | {} | {:.0} | {} | {:.3} | {} |",
            r.method,
            r.median_ms,
            count(r.allocs_per_step),
            count(r.gemm_allocs_per_step),
            count(r.pool_misses_per_step),
            r.tokens_per_s,
            r.visual_tokens,
            r.step_flops / 1e12,
            r.peak_fraction
                .map_or("n/a".into(), |f| format!("{:.1} %", 100.0 * f))
        );
    }
    for r in &rows {
        if let Some(p) = &r.profile {
            println!(
                "\n{}: time per op, {} threads against one thread",
                r.method,
                rayon::current_num_threads()
            );
            println!("| op | calls/step | ms/step | share | ms/step, 1 thread | speed-up |");
            println!("|---|---|---|---|---|---|");
            for o in p {
                println!(
                    "| {} | {} | {:.2} | {:.1} % | {:.2} | {:.2} |",
                    o.op,
                    if o.op == bench::BETWEEN_OPS {
                        "".into()
                    } else {
                        format!("{:.0}", o.calls_per_step)
                    },
                    o.ms,
                    100.0 * o.share,
                    o.ms_one_thread,
                    o.ms_one_thread / o.ms.max(1e-9)
                );
            }
        }
    }
    Ok(())
}

/// A per-step count for the bench table ("n/a" when not measured).
fn count(n: Option<f64>) -> String {
    // A fraction is shown as one: "0" must mean none at all.
    n.map_or("n/a".into(), |n| {
        if n.fract() == 0.0 {
            format!("{n:.0}")
        } else {
            format!("{n:.1}")
        }
    })
}

fn report(s: RunSummary) {
    let mut line = format!(
        "steps = {} | sigma = {:.4} | {:.1} s | peak heap {} | {}",
        s.steps,
        s.sigma,
        s.seconds,
        s.peak_bytes.map_or("n/a".into(), mib),
        s.stop_reason
    );
    if let Some(e) = s.eval {
        line += &format!(
            " | held-out accuracy = {:.4}, loss = {:.4}",
            e.accuracy, e.loss
        );
    }
    if let Some(l) = s.final_loss {
        line += &format!(" | training loss (private) = {l:.4}");
    }
    println!("{line}");
    match s.not_private {
        Some(why) => println!("epsilon = inf (not private: {why})"),
        None => println!("epsilon = {}", s.epsilon),
    }
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// `dualpriv study`'s flags.
#[derive(clap::Args)]
struct StudyFlags {
    /// Folder of a new study (it must not hold one yet).
    #[arg(long, default_value = "target/study")]
    out: PathBuf,
    /// Continue the study in DIR: runs only what its results.jsonl lacks, with the plan
    /// and settings of its study.json, then rewrites RESULTS.md and the plots.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["out", "quick", "reps", "steps", "batch", "train_examples", "test_examples", "pretrained", "main_only", "ablation_epsilons"])]
    resume: Option<PathBuf>,
    /// A tiny grid (a few runs of a few steps) that checks the pipeline in seconds.
    #[arg(long)]
    quick: bool,
    /// Repetitions of every cell, each with a fresh secret key (at least 2 for intervals).
    #[arg(long)]
    reps: Option<u32>,
    /// Optimizer steps of every run.
    #[arg(long)]
    steps: Option<u32>,
    /// Expected (Poisson) batch size of every run.
    #[arg(long)]
    batch: Option<usize>,
    /// Private training examples (the declared public dataset size).
    #[arg(long)]
    train_examples: Option<usize>,
    /// Test examples.
    #[arg(long)]
    test_examples: Option<usize>,
    /// Pretrained checkpoint folder every run starts from.
    #[arg(long, default_value = "assets/tiny-pretrained")]
    pretrained: PathBuf,
    /// The main grid only (no ablations).
    #[arg(long)]
    main_only: bool,
    /// ε levels of the dualpriv ablations (each level adds a full set of ablation runs).
    #[arg(long, value_delimiter = ',', default_value = "3")]
    ablation_epsilons: Vec<f64>,
}

/// The default study's sizes: (reps, steps, batch, train examples, test examples).
const STUDY_DEFAULT: (u32, u32, usize, usize, usize) = (3, 25, 256, 16_000, 1000);
/// `--quick`'s sizes.
const STUDY_QUICK: (u32, u32, usize, usize, usize) = (2, 3, 16, 400, 64);

impl StudyFlags {
    fn into_args(self) -> Result<StudyArgs> {
        let d = if self.quick {
            STUDY_QUICK
        } else {
            STUDY_DEFAULT
        };
        let reps = self.reps.unwrap_or(d.0);
        if reps == 0 {
            return Err(Error::Config("--reps must be at least 1".into()));
        }
        let (steps, batch) = (self.steps.unwrap_or(d.1), self.batch.unwrap_or(d.2));
        let mut plan = if self.quick {
            Plan::quick(steps, batch)
        } else {
            Plan::default_study(reps, steps, batch)
        };
        plan.reps = reps;
        if self.main_only {
            plan.ablations.clear();
        }
        if let Some(e) = self
            .ablation_epsilons
            .iter()
            .find(|e| !(**e > 0.0 && e.is_finite()))
        {
            return Err(Error::Config(format!(
                "--ablation-epsilons: {e} is not a finite ε > 0"
            )));
        }
        plan.ablation_epsilons = self.ablation_epsilons;
        let (dir, resume) = match self.resume {
            Some(d) => (d, true),
            None => (self.out, false),
        };
        Ok(StudyArgs {
            dir,
            resume,
            plan,
            settings: Settings {
                train_examples: self.train_examples.unwrap_or(d.3),
                test_examples: self.test_examples.unwrap_or(d.4),
                delta: 1e-5,
            },
            pretrained: self.pretrained,
            progress: true,
        })
    }
}

fn print_study(o: &StudyOutcome) {
    println!(
        "study: {} runs in the grid, {} run now ({:.0} s), {} already done",
        o.grid, o.ran, o.seconds, o.skipped
    );
    println!("study: tables in {}", o.results_md.display());
    for p in &o.plots {
        println!("study: plot {}", p.display());
    }
}

fn print_demo(rep: &DemoReport) {
    let rows = &rep.rows;
    println!(
        "test accuracy before fine-tuning = {:.4}, majority-answer baseline = {:.4}",
        rep.pretrained_accuracy, rep.majority_baseline
    );
    println!(
        "(a comparison, not a deployment: every method trains on the same private split with its own \
         fresh secret key. Each DP row alone is (ε, δ)-DP; together they compose, and the non-private \
         row is not private at all, so the set of outputs is not private)"
    );
    println!("| method | accuracy | epsilon | peak heap | time | visual tokens |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.4} | {} | {} | {:.1} s | {} |",
            r.method,
            r.accuracy,
            if r.epsilon.is_finite() {
                format!("{:.3}", r.epsilon)
            } else {
                "∞".into()
            },
            r.peak_bytes.map_or("n/a".into(), mib),
            r.seconds,
            r.visual_tokens
        );
    }
    let acc = |m: Method| {
        rows.iter()
            .find(|r| r.method == m)
            .map_or(f64::NAN, |r| r.accuracy)
    };
    let eps = rows
        .iter()
        .filter(|r| r.epsilon.is_finite())
        .map(|r| r.epsilon)
        .fold(0.0, f64::max);
    println!(
        "demo: dualpriv_accuracy={:.4} dpsgd_accuracy={:.4} nonprivate_accuracy={:.4} dpzo_accuracy={:.4} epsilon={:.3}",
        acc(Method::Dualpriv),
        acc(Method::Dpsgd),
        acc(Method::Nonprivate),
        acc(Method::Dpzo),
        eps
    );
}

/// Runs `f` on the CUDA backend: a missing driver or a build without the `cuda`
/// feature is an error that says what to do, never a panic.
#[cfg(feature = "cuda")]
fn with_cuda<T>(f: impl FnOnce(&dualpriv::backend::cuda::Cuda) -> Result<T>) -> Result<T> {
    let be = dualpriv::backend::cuda::Cuda::new()?;
    f(&be)
}

/// Without the `cuda` feature there is no GPU backend in this binary.
#[cfg(not(feature = "cuda"))]
fn with_cuda<T>(_f: impl FnOnce(&Cpu) -> Result<T>) -> Result<T> {
    Err(Error::Config(
        "--backend cuda: this binary was built without the `cuda` feature; rebuild with \
         `cargo build --release --features cuda` (or use --backend cpu)"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags' defaults are the library's: `dualpriv train` and
    /// [`TrainArgs::default`] describe the same run.
    #[test]
    fn train_flag_defaults_are_the_library_defaults() {
        let Cmd::Train(f) = Cli::parse_from(["dualpriv", "train", "--out", "x"]).cmd else {
            panic!("not the train command");
        };
        let want = TrainArgs {
            out: Some("x".into()),
            progress: true,
            ..TrainArgs::default()
        };
        assert_eq!(f.into_args(), want);
    }
}

/// `dualpriv audit`'s flags.
#[derive(clap::Args)]
struct AuditFlags {
    /// Methods to audit (comma-separated); nonprivate runs once, the others at every ε.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "nonprivate,dpsgd,ghost,dualpriv,dpzo"
    )]
    method: Vec<Method>,
    /// Claimed ε values (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,3,8")]
    epsilon: Vec<f64>,
    /// δ of every claim and bound.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// m: canaries of each kind per run (default 1000; 100 with --quick).
    #[arg(long)]
    canaries: Option<usize>,
    /// White-box gradient canaries where the method has a per-coordinate gradient
    /// (all but dpzo); `--white-box false` audits with black-box canaries only.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    white_box: Option<bool>,
    /// A tiny audit (a smoke run: few canaries, steps and examples).
    #[arg(long)]
    quick: bool,
    /// Folder for audit.jsonl (one line per run) and audit.md (the table).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Pretrained checkpoint folder.
    #[arg(long, default_value = "assets/tiny-pretrained")]
    pretrained: PathBuf,
}

fn run_audit(f: AuditFlags) -> Result<bool> {
    use dualpriv::cmd::audit::{self as aud, AuditArgs};
    let a = AuditArgs {
        pretrained: f.pretrained,
        methods: f.method,
        epsilons: f.epsilon,
        delta: f.delta,
        canaries: f.canaries.unwrap_or(if f.quick { 100 } else { 1000 }),
        white_box: f.white_box,
        quick: f.quick,
        out: f.out,
        // Coins, canaries and run keys from the OS: never a public seed here.
        seed: None,
    };
    println!(
        "audit: {} runs; each trains a fresh copy on the built-in task with canaries and persists \
         nothing. The ε lower bounds concern these audit runs only, not any run of yours",
        aud::plan(&a).len()
    );
    let rows = aud::audit(&Cpu, &a, |i, n, r| {
        eprintln!(
            "[{}/{n}] {} ε={}: {} {}/{} correct, ε ≥ {:.3}, MIA AUC {:.3} ({:.0} s)",
            i + 1,
            r.method,
            r.claimed_epsilon.map_or("∞".into(), |e| e.to_string()),
            r.primary.kind,
            r.primary.correct,
            r.primary.guesses,
            r.primary.epsilon_lower_bound,
            r.mia_auc,
            r.seconds
        )
    })
    .map_err(|e| with_flag(e, "--method, --epsilon, --canaries, --white-box"))?;
    print!("{}", aud::markdown_table(&rows));
    if let Some(d) = &a.out {
        println!(
            "wrote {} and {}",
            d.join("audit.jsonl").display(),
            d.join("audit.md").display()
        );
    }
    let over = rows
        .iter()
        .filter(|r| {
            r.claimed_epsilon
                .is_some_and(|e| r.primary.epsilon_lower_bound > e)
        })
        .count();
    if over > 0 {
        println!("audit: {over} run(s) have a lower bound above their claimed ε: the mechanism leaks more than it claims");
    }
    Ok(over == 0)
}
