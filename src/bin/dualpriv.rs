//! The dualpriv command line. Training commands arrive with the training driver;
//! today it runs the self-check and the kernel micro-benchmarks.
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

use dualpriv::backend::cpu::Cpu;
use dualpriv::backend::dp::DpBackend;
use dualpriv::bench::{self, Device};
use dualpriv::data::synthetic::{Dataset, Split};
use dualpriv::dp::accountant::AccountantKind;
use dualpriv::dp::key::RunKey;
use dualpriv::model::Mllm;
use dualpriv::run;
use dualpriv::selfcheck;
use dualpriv::train::checkpoint::{self, ModelSpec};
use dualpriv::train::method::Method;
use dualpriv::train::optim::{OptConfig, OptKind};
use dualpriv::train::sampler::Sampling;
use dualpriv::train::{PruneScope, TrainConfig, Trainer};

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

#[derive(Subcommand)]
enum Cmd {
    /// The README's main job: fine-tunes the shipped tiny pretrained model on the
    /// built-in private task with nonprivate, dpsgd, dualpriv and dpzo at ε = 3, δ = 1e-5, and prints one
    /// table of accuracy, ε, peak memory and time (CPU, a few minutes on 2 cores).
    ///
    /// Example: cargo run --release -- demo
    #[command(verbatim_doc_comment)]
    Demo {
        /// Pretrained checkpoint folder (pretrained first when it has no model.safetensors).
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
    /// DP fine-tuning (or non-private, for comparison) from a pretrained checkpoint.
    ///
    /// Examples:
    ///   dualpriv train --method dualpriv --init assets/tiny-pretrained --out runs/dp --epsilon 3
    ///   dualpriv train --method ghost --init assets/tiny-pretrained --out runs/ghost --epsilon 3 --accountant rdp
    ///   dualpriv train --method dualpriv --init assets/tiny-pretrained --out runs/ablate --epsilon 3 --keep-frac 1 --no-token-pruning
    ///   dualpriv train --resume runs/dp --steps 200
    #[command(verbatim_doc_comment)]
    Train(Box<TrainArgs>),
    /// Step time, memory and throughput of each training method on a fixed batch.
    ///
    /// Examples:
    ///   dualpriv bench --backend cpu --preset tiny --method all --batch 32
    ///   dualpriv bench --backend cpu --method ghost,nonprivate --json
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
    },
    /// Accuracy of a checkpoint on the test split.
    ///
    /// Example: dualpriv eval --checkpoint runs/dp
    #[command(verbatim_doc_comment)]
    Eval {
        /// Checkpoint folder written by `train` or `pretrain`.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Test examples.
        #[arg(long, default_value_t = 1000)]
        test_examples: usize,
        /// Seed of the test split.
        #[arg(long, default_value_t = 2)]
        data_seed: u64,
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
            let a = run::DemoArgs {
                pretrained,
                out,
                train_examples,
                test_examples,
                epsilon,
                delta,
                progress: true,
            };
            run::demo(&Cpu, &a).map(|rep| {
                print_demo(&rep);
                true
            })
        }
        Cmd::Pretrain {
            out,
            preset,
            examples,
            steps,
            batch,
            lr,
            seed,
        } => {
            let a = run::PretrainArgs {
                preset,
                out,
                examples,
                steps,
                batch,
                lr,
                seed,
                progress: true,
            };
            run::pretrain(&Cpu, &a).map(|(s, acc)| {
                println!(
                    "pretrained {} steps in {:.1} s; held-out public accuracy {acc:.4}",
                    s.steps, s.seconds
                );
                println!("checkpoint: {}", a.out.join("model.safetensors").display());
                true
            })
        }
        Cmd::Train(a) => train(*a).map(|_| true),
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
        } => bench_args(
            preset,
            &method,
            batch,
            keep_tokens,
            keep_frac,
            lora_rank,
            steps,
        )
        .and_then(|a| match backend {
            Backend::Cpu => bench_on(&Cpu, &a, json),
            Backend::Cuda => with_cuda(|be| bench_on(be, &a, json)),
        })
        .map(|_| true),
        Cmd::Eval {
            checkpoint,
            test_examples,
            data_seed,
            backend,
        } => match backend {
            Backend::Cpu => eval_on(&Cpu, &checkpoint, test_examples, data_seed),
            Backend::Cuda => with_cuda(|be| eval_on(be, &checkpoint, test_examples, data_seed)),
        }
        .map(|_| true),
        Cmd::Selfcheck => selfcheck::run().map(|rep| {
            print!("{}", rep.markdown());
            rep.all_passed()
        }),
        Cmd::BenchKernels { backend } => {
            let dev = match backend {
                Backend::Cpu => Device::Cpu,
                Backend::Cuda => Device::Cuda,
            };
            bench::run(dev).map(|rows| {
                print!("{}", bench::markdown(&rows));
                print!("{}", bench::rng_ratios(&rows));
                true
            })
        }
        Cmd::Account {
            sample_rate,
            noise_multiplier,
            target_epsilon,
            steps,
            delta,
            accountant,
        } => account(
            sample_rate,
            noise_multiplier,
            target_epsilon,
            steps,
            delta,
            accountant,
        )
        .map(|_| true),
    };
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("dualpriv: some checks failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("dualpriv: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Options of `dualpriv train`.
#[derive(clap::Args)]
struct TrainArgs {
    /// The training method.
    #[arg(long, value_enum, ignore_case = true, default_value = "dualpriv")]
    method: Method,
    /// Pretrained checkpoint folder to start from (model.safetensors).
    #[arg(long, default_value = "assets/tiny-pretrained")]
    init: PathBuf,
    /// Output folder: checkpoints, metrics.jsonl, state.json.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run saved in this folder (same data; ε keeps accumulating).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    preset: String,
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
    /// LoRA rank (0: full fine-tuning of --full groups).
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f32,
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
    #[arg(long, default_value = "chacha20")]
    rng: String,
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
    /// Backend (cuda needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
}

fn train(a: TrainArgs) -> dualpriv::Result<()> {
    match a.backend {
        Backend::Cpu => train_on(&Cpu, a),
        Backend::Cuda => with_cuda(|be| train_on(be, a)),
    }
}

fn train_on<B: DpBackend>(be: &B, a: TrainArgs) -> dualpriv::Result<()> {
    let data = Dataset::generate(Split::Private, a.train_examples, a.seed, run::TINY_IMAGE)?;
    let held_out = Dataset::generate(Split::Test, a.eval_examples.max(1), 2, run::TINY_IMAGE)?;
    if let Some(dir) = &a.resume {
        let mut t = Trainer::resume(be, dir, &data, Some(a.steps))?;
        t.progress = true;
        t.eval_data = Some(held_out);
        eprintln!(
            "resuming {} at step {} of {}",
            dir.display(),
            t.step,
            t.cfg.steps
        );
        return report(t.run(&data, a.checkpoint_every)?);
    }
    let method = a.method;
    let spec = ModelSpec {
        preset: a.preset.clone(),
        lora_rank: (a.lora_rank > 0).then_some(a.lora_rank),
        lora_alpha: a.lora_alpha,
        full_groups: a
            .full
            .split(',')
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty())
            .collect(),
    };
    let (mcfg, mode) = spec.build()?;
    let (default_keep, default_context) = mcfg.vision.default_token_select();
    let keep_tokens = match (a.no_token_pruning, a.keep_tokens, method) {
        (true, ..) => None,
        (false, Some(k), _) => Some(k),
        (false, None, Method::Dualpriv) => Some(default_keep),
        _ => None,
    };
    let text_len = data
        .max_text_len()
        .max(Dataset::generate(Split::Test, 1000, 2, run::TINY_IMAGE)?.max_text_len());
    let cfg = TrainConfig {
        micro_batch: a.micro_batch,
        sampling: a.sampling,
        steps: a.steps,
        opt: OptConfig {
            momentum: a.momentum,
            weight_decay: a.weight_decay,
            ..match a.optimizer {
                OptKind::Adamw => OptConfig::adamw(a.lr),
                OptKind::Sgd => OptConfig::sgd(a.lr),
            }
        },
        clip_norm: a.clip_norm,
        epsilon: a.epsilon,
        delta: a.delta,
        noise_multiplier: a.noise_multiplier,
        accountant: a.accountant,
        keep_tokens,
        context_tokens: if keep_tokens.is_some() {
            a.context_tokens.unwrap_or(default_context)
        } else {
            0
        },
        fuse_noise_std: a.fuse_noise_std,
        keep_frac: a.keep_frac,
        prune_scope: a.prune_scope,
        dpzo_lambda: a.dpzo_lambda,
        rng: a.rng.parse()?,
        log_private_stats: a.log_private_stats,
        eval_every: a.eval_every,
        // The built-in data's size is a flag, so public; q and σ derive from it.
        public_size: Some(a.train_examples),
        ..TrainConfig::new(method, a.batch, text_len)
    };
    let model = Mllm::load(be, &mcfg, &mode, &checkpoint::model_path(&a.init)?)?;
    let key = match a.insecure_seed {
        Some(s) => {
            eprintln!(
                "warning: --insecure-seed {s}: batches and noise follow a public number, so this \
                 run is NOT private; its ε is reported as ∞ in its outputs and the ledger"
            );
            RunKey::from_insecure_seed(s)
        }
        None => RunKey::from_os()?,
    };
    let mut t = Trainer::with_key(be, model, spec, cfg, &data, key)?;
    t.out_dir = a.out.clone();
    t.progress = true;
    t.eval_data = Some(held_out);
    eprintln!(
        "{method}: {} trainable values, q = {:.4}, sigma = {:.4}",
        t.model.trainable().iter().map(|p| p.len).sum::<usize>(),
        a.batch as f64 / a.train_examples as f64,
        t.sigma
    );
    report(t.run(&data, a.checkpoint_every)?)
}

#[allow(clippy::too_many_arguments)]
fn bench_args(
    preset: String,
    method: &str,
    batch: usize,
    keep_tokens: Option<usize>,
    keep_frac: f64,
    lora_rank: usize,
    steps: usize,
) -> dualpriv::Result<run::BenchArgs> {
    let methods: Vec<Method> = if method == "all" {
        Method::ALL.to_vec()
    } else {
        method
            .split(',')
            .map(|m| m.parse())
            .collect::<dualpriv::Result<_>>()?
    };
    Ok(run::BenchArgs {
        preset,
        methods,
        batch,
        keep_tokens,
        keep_frac,
        lora_rank,
        warmup: 2,
        steps,
    })
}

fn bench_on<B: DpBackend>(be: &B, a: &run::BenchArgs, json: bool) -> dualpriv::Result<()> {
    let rows = run::bench_methods(be, a)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows)
                .map_err(|e| dualpriv::Error::Config(e.to_string()))?
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
        "| method | median step | peak memory (step) | tokens/s | visual tokens | model TFLOP/step | of peak |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let mem = match (r.device_peak_bytes, r.peak_bytes) {
            (Some(d), _) => format!("{} device", mib(d as usize)),
            (None, Some(h)) => format!("{} heap", mib(h)),
            (None, None) => "n/a".into(),
        };
        println!(
            "| {} | {:.1} ms | {mem} | {:.0} | {} | {:.3} | {} |",
            r.method,
            r.median_ms,
            r.tokens_per_s,
            r.visual_tokens,
            r.step_flops / 1e12,
            r.peak_fraction
                .map_or("n/a".into(), |f| format!("{:.1} %", 100.0 * f))
        );
    }
    Ok(())
}

fn report(s: dualpriv::train::RunSummary) -> dualpriv::Result<()> {
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
    Ok(())
}

fn eval_on<B: DpBackend>(
    be: &B,
    dir: &std::path::Path,
    n: usize,
    seed: u64,
) -> dualpriv::Result<()> {
    let (st, folder) = checkpoint::load_state(dir)?;
    let (mcfg, mode) = st.model.build()?;
    let model = Mllm::load(be, &mcfg, &mode, &folder.join("model.safetensors"))?;
    let test = Dataset::generate(Split::Test, n, seed, mcfg.vision.image_size)?;
    let tokens = st.train.token_select();
    let text_len = st.train.text_len.max(test.max_text_len());
    let acc = run::evaluate(be, &model, &test, tokens.as_ref(), text_len)?;
    println!(
        "test examples = {n}, majority baseline = {:.4}",
        dualpriv::data::synthetic::majority_baseline(&test)
    );
    println!("accuracy = {acc:.4}");
    Ok(())
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn print_demo(rep: &run::DemoReport) {
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

fn account(
    q: f64,
    sigma: Option<f64>,
    target: Option<f64>,
    steps: u64,
    delta: f64,
    kind: AccountantKind,
) -> dualpriv::Result<()> {
    use dualpriv::dp::accountant::{calibrate_sigma, epsilon};
    if steps == 0 {
        return Err(dualpriv::Error::Config("--steps must be at least 1".into()));
    }
    println!("accountant = {kind}, q = {q}, steps = {steps}, delta = {delta}");
    match (sigma, target) {
        (Some(s), _) => println!("epsilon = {}", epsilon(kind, &[(q, s, steps)], delta)?),
        (None, Some(e)) => println!(
            "noise_multiplier = {}",
            calibrate_sigma(kind, q, steps, e, delta)?
        ),
        (None, None) => unreachable!("clap requires one of them"),
    }
    Ok(())
}

/// Runs `f` on the CUDA backend: a missing driver or a build without the `cuda`
/// feature is an error that says what to do, never a panic.
#[cfg(feature = "cuda")]
fn with_cuda<T>(
    f: impl FnOnce(&dualpriv::backend::cuda::Cuda) -> dualpriv::Result<T>,
) -> dualpriv::Result<T> {
    let be = dualpriv::backend::cuda::Cuda::new()?;
    f(&be)
}

/// Without the `cuda` feature there is no GPU backend in this binary.
#[cfg(not(feature = "cuda"))]
fn with_cuda<T>(
    _f: impl FnOnce(&dualpriv::backend::cpu::Cpu) -> dualpriv::Result<T>,
) -> dualpriv::Result<T> {
    Err(dualpriv::Error::Config(
        "--backend cuda: this binary was built without the `cuda` feature; rebuild with \
         `cargo build --release --features cuda` (or use --backend cpu)"
            .into(),
    ))
}
