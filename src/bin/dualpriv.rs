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
