//! A quick end-to-end self-check of every mechanism, for `dualpriv selfcheck`: each
//! CPU reference against an independent computation, and, when a GPU is present,
//! each CUDA kernel against the CPU reference. The test suite is the thorough
//! version; this is what a user runs to see that the build works on their machine.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::dp::clip::{self, LinearShape};
use crate::dp::noise::{chacha20_block, philox4x32_10, RngKind, StreamKey};
use crate::dp::prune::{self, Optimizer, TensorState, UpdateConfig};
use crate::vision::tokens::{self, TokenSelectConfig, TokenShape};
use crate::Result;

/// One named check and what it found.
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// The measured quantity, e.g. a relative error.
    pub detail: String,
}

/// All checks of one run.
pub struct Report {
    /// The checks, in order.
    pub checks: Vec<Check>,
}

impl Report {
    fn add(&mut self, name: &str, passed: bool, detail: String) {
        self.checks.push(Check {
            name: name.into(),
            passed,
            detail,
        });
    }

    /// True when every check passed (skipped GPU checks count as passed).
    pub fn all_passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// The checks as a markdown table.
    pub fn markdown(&self) -> String {
        let mut s = String::from("| check | result | detail |\n|---|---|---|\n");
        for c in &self.checks {
            let r = if c.passed { "pass" } else { "FAIL" };
            s += &format!("| {} | {r} | {} |\n", c.name, c.detail);
        }
        s
    }
}

fn random(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-12))
        .fold(0.0, f64::max)
}

struct Inputs {
    s: LinearShape,
    x: Vec<f32>,
    g: Vec<f32>,
    ts: TokenShape,
    tc: TokenSelectConfig,
    attn: Vec<f32>,
    keys: Vec<f32>,
    hidden: Vec<f32>,
    grad: Vec<f32>,
    prune: UpdateConfig,
}

fn inputs() -> Result<Inputs> {
    let mut r = ChaCha8Rng::seed_from_u64(7);
    let s = LinearShape {
        b: 3,
        t: 20,
        d: 48,
        p: 40,
    };
    let ts = TokenShape {
        batch: 2,
        tokens: 577,
        heads: 16,
        head_dim: 64,
        hidden: 1024,
    };
    let tc = TokenSelectConfig {
        keep: 53,
        context: 10,
        fuse_noise_std: 0.0,
        noise: StreamKey::from_insecure_seed(RngKind::Chacha20, 0),
    };
    Ok(Inputs {
        x: random(&mut r, s.b * s.t * s.d),
        g: random(&mut r, s.b * s.t * s.p),
        s,
        attn: random(&mut r, ts.attn_len()?)
            .iter()
            .map(|v| v.abs())
            .collect(),
        keys: random(&mut r, ts.keys_len()?),
        hidden: random(&mut r, ts.hidden_len()?),
        ts,
        tc,
        grad: random(&mut r, 100_003),
        prune: UpdateConfig {
            keep_frac: 0.8,
            noise_std: 0.5,
            noise: StreamKey::from_insecure_seed(RngKind::Chacha20, 11),
            step: 2,
            inv_batch: 0.125,
            opt: Optimizer::Sgd {
                lr: 0.1,
                momentum: 0.0,
                weight_decay: 0.0,
            },
        },
    })
}

/// The CPU noise + top-k + SGD step on the check's gradient, from zero parameters.
fn cpu_prune(inp: &Inputs) -> Result<(prune::PruneReport, Vec<f32>)> {
    let mut p = vec![0.0; inp.grad.len()];
    let r = prune::noise_prune_update(
        &mut [TensorState {
            tensor_id: 0,
            grad: &inp.grad,
            param: &mut p,
            m: &mut [],
            v: &mut [],
        }],
        &inp.prune,
    )?;
    Ok((r, p))
}

/// The RFC 8439 §2.3.2 block-function test vector: key 00..1f, block count 1, nonce
/// 00:00:00:09:00:00:00:4a:00:00:00:00 (djb layout: counter = 1 | 0x09000000 << 32,
/// nonce = 0x4a000000).
pub fn chacha20_rfc8439_ok() -> bool {
    let key: [u32; 8] =
        std::array::from_fn(|i| u32::from_le_bytes(std::array::from_fn(|j| (4 * i + j) as u8)));
    let want: [u32; 16] = [
        0xe4e7f110, 0x15593bd1, 0x1fdd0f50, 0xc47120a3, 0xc7f4d1c7, 0x0368c033, 0x9aaa2204,
        0x4e6cd4c3, 0x466482d2, 0x09aa9f07, 0x05d7c214, 0xa2028bd9, 0xd19c12b5, 0xb94e16de,
        0xe883d0cb, 0x4e3c50a2,
    ];
    chacha20_block(&key, 1 | (0x0900_0000u64 << 32), 0x4a00_0000) == want
}

/// Runs every check.
pub fn run() -> Result<Report> {
    let mut rep = Report { checks: Vec::new() };
    let inp = inputs()?;
    let kat = philox4x32_10([0; 4], [0; 2]) == [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8];
    rep.add(
        "Philox4x32-10 known answer",
        kat,
        "Random123 vector 1".into(),
    );
    rep.add(
        "ChaCha20 block known answer",
        chacha20_rfc8439_ok(),
        "RFC 8439 §2.3.2".into(),
    );

    let ghost = clip::ghost_sq_norms(&inp.x, &inp.g, inp.s)?;
    let inst = clip::instantiated_sq_norms(&inp.x, &inp.g, inp.s)?;
    let e = max_rel(&ghost, &inst);
    rep.add(
        "ghost = instantiated per-example norms",
        e < 1e-9,
        format!("max rel err {e:.1e}"),
    );

    let c = clip::clip_factors(&[1e12, 0.25], &[0.0, 0.0], 1.0)?.0;
    let ok = (c[0] as f64 * 1e6 - 1.0).abs() < 1e-5 && c[1] == 1.0;
    rep.add(
        "clipping bounds a 1e6-norm example by C",
        ok,
        format!("factors {c:?}"),
    );

    let keys: Vec<u32> = inp.grad.iter().map(|&x| prune::magnitude_key(x)).collect();
    let k = prune::keep_count(0.8, keys.len() as u64)?;
    let t = prune::radix_select(|| keys.iter().copied(), k);
    let want = prune::select_nth_threshold(&keys, k);
    rep.add(
        "radix select = select_nth_unstable",
        t.key == want,
        format!("k={k} of {}", keys.len()),
    );

    let (r, p) = cpu_prune(&inp)?;
    let changed = p.iter().filter(|&&x| x != 0.0).count() as u64;
    rep.add(
        "noisy top-k updates exactly k",
        r.kept == k && changed == k,
        format!("kept {changed} of {}", r.n),
    );

    let id_cfg = TokenSelectConfig {
        keep: inp.ts.patches(),
        context: 0,
        ..inp.tc
    };
    let id = tokens::select_tokens(&inp.attn, &inp.keys, &inp.hidden, &inp.ts, &id_cfg)?;
    rep.add(
        "token selection K=all, M=0 is the identity",
        id.tokens == inp.hidden,
        "B=2 N=577".into(),
    );
    let sel = tokens::select_tokens(&inp.attn, &inp.keys, &inp.hidden, &inp.ts, &inp.tc)?;
    let ok = sel.tokens.len() == inp.ts.batch * 64 * inp.ts.hidden;
    rep.add(
        "token selection keeps CLS + 53 + 10",
        ok,
        format!("{} -> 64 tokens", inp.ts.tokens),
    );

    gpu_checks(&mut rep, &inp)?;
    Ok(rep)
}

#[cfg(not(feature = "cuda"))]
fn gpu_checks(rep: &mut Report, _: &Inputs) -> Result<()> {
    rep.add(
        "GPU kernels vs CPU",
        true,
        "skipped: built without --features cuda".into(),
    );
    Ok(())
}

#[cfg(feature = "cuda")]
fn gpu_checks(rep: &mut Report, inp: &Inputs) -> Result<()> {
    use crate::dp::clip::NormMethod;
    use crate::dp::noise::NoiseKey;
    use crate::gpu::{self, Gpu};
    let gpu = match Gpu::new() {
        Ok(g) => g,
        Err(crate::Error::NoCudaDriver) => {
            rep.add("GPU kernels vs CPU", true, "skipped: no CUDA driver".into());
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let name = gpu.name()?;
    let (dx, dg) = (gpu.upload(&inp.x)?, gpu.upload(&inp.g)?);
    for method in [NormMethod::Ghost, NormMethod::Instantiated] {
        let mut tot = gpu.zeros::<f64>(inp.s.b)?;
        gpu::clip::add_layer_sq_norms(&gpu, &dx, &dg, inp.s, method, false, &mut tot)?;
        let want = clip::layer_sq_norms(&inp.x, &inp.g, inp.s, method, false)?;
        let e = max_rel(&gpu.download(&tot)?, &want);
        rep.add(
            &format!("GPU {method:?} norms vs CPU ({name})"),
            e < 1e-4,
            format!("max rel err {e:.1e}"),
        );
    }
    for rng in [RngKind::Chacha20, RngKind::Philox] {
        let key = NoiseKey {
            stream: StreamKey::from_insecure_seed(rng, 5),
            tensor_id: 1,
            step: 9,
        };
        let mut want = vec![0.0f32; 10_001];
        key.add_scaled(0, 1.0, &mut want);
        let mut z = gpu.zeros::<f32>(want.len())?;
        gpu::noise::noise_axpy(&gpu, key, 0, 1.0, true, &mut z)?;
        let got = gpu.download(&z)?;
        let exact = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() == b.to_bits())
            .count();
        rep.add(
            &format!("GPU {rng} noise vs CPU"),
            exact == want.len(),
            format!("{exact}/{} bit-exact", want.len()),
        );
    }
    let dgr = gpu.upload(&inp.grad)?;
    let mut dp = gpu.zeros::<f32>(inp.grad.len())?;
    let mut plan = gpu::prune::PrunePlan::new(&gpu, 1, inp.grad.len() as u64)?;
    let t = gpu::prune::DeviceTensor::plain(&gpu, 0, &dgr, &mut dp)?;
    let r = plan.run(&gpu, &[t], &inp.prune)?;
    let (want, p) = cpu_prune(inp)?;
    let same = gpu.download(&dp)? == p;
    rep.add(
        "GPU noise + top-k + SGD vs CPU",
        r == want && same,
        format!("threshold {}", r.threshold),
    );
    let sel =
        gpu::tokens::select_tokens(&gpu, &inp.attn, &inp.keys, &inp.hidden, &inp.ts, &inp.tc)?;
    let cpu = tokens::select_tokens(&inp.attn, &inp.keys, &inp.hidden, &inp.ts, &inp.tc)?;
    let e = sel
        .tokens
        .iter()
        .zip(&cpu.tokens)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    rep.add(
        "GPU token selection vs CPU",
        sel.kept == cpu.kept && e < 1e-5,
        format!("max abs err {e:.1e}"),
    );
    Ok(())
}
