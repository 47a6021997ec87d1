//! The dualpriv command line. Training commands arrive with the training driver;
//! today it runs the self-check and the kernel micro-benchmarks.
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use dualpriv::bench::{self, Device};
use dualpriv::selfcheck;

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
        #[arg(long, conflicts_with = "target_epsilon", required_unless_present = "target_epsilon")]
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
        /// Accountant: rdp (Opacus-compatible) or pld (tighter, dp_accounting-compatible).
        #[arg(long, default_value = "rdp")]
        accountant: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
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
                true
            })
        }
        Cmd::Account { sample_rate, noise_multiplier, target_epsilon, steps, delta, accountant } => {
            account(sample_rate, noise_multiplier, target_epsilon, steps, delta, &accountant).map(|_| true)
        }
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

fn account(q: f64, sigma: Option<f64>, target: Option<f64>, steps: u64, delta: f64, kind: &str) -> dualpriv::Result<()> {
    use dualpriv::dp::accountant::{calibrate_sigma, epsilon, AccountantKind};
    let kind: AccountantKind = kind.parse()?;
    if steps == 0 {
        return Err(dualpriv::Error::Config("--steps must be at least 1".into()));
    }
    println!("accountant = {kind}, q = {q}, steps = {steps}, delta = {delta}");
    match (sigma, target) {
        (Some(s), _) => println!("epsilon = {}", epsilon(kind, &[(q, s, steps)], delta)?),
        (None, Some(e)) => println!("noise_multiplier = {}", calibrate_sigma(kind, q, steps, e, delta)?),
        (None, None) => unreachable!("clap requires one of them"),
    }
    Ok(())
}
