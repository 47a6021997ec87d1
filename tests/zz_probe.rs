use dualpriv::backend::cpu::Cpu;
use dualpriv::data::synthetic::{Dataset, QuestionKind, Split};
use dualpriv::model::Mllm;
use dualpriv::run;
use dualpriv::train::method::Method;
use dualpriv::train::Trainer;
#[test]
fn probe() {
    let spec = run::pretrain_spec("tiny");
    let (c, m) = spec.build().unwrap();
    let model = Mllm::new(&Cpu, &c, &m, 0).unwrap();
    let d = Dataset::generate(Split::Private, 6000, 5, 32).unwrap();
    let mut cfg = run::demo_train_config(Method::Nonprivate, 3.0, 1e-5, d.max_text_len());
    cfg.batch = 32;
    cfg.micro_batch = 32;
    cfg.steps = 300;
    cfg.opt.lr = 3e-3;
    let mut t = Trainer::new(&Cpu, model, spec, cfg, &d).unwrap();
    let mut acc = 0.0;
    for s in 0..300u32 {
        let idx: Vec<usize> = (0..32).map(|i| ((s as usize) * 32 + i) % d.len()).collect();
        let o = t.one_step(&d, &idx).unwrap();
        t.step += 1;
        acc += o.loss;
        if s % 30 == 29 {
            println!("step {s} loss {:.3}", acc / 30.0);
            acc = 0.0;
        }
    }
    let test = Dataset::generate(Split::Test, 1500, 77, 32).unwrap();
    let tl = t.cfg.text_len;
    for k in QuestionKind::ALL {
        let sub = Dataset {
            examples: test
                .examples
                .iter()
                .filter(|e| e.kind == k)
                .cloned()
                .collect(),
            ..test.clone()
        };
        println!(
            "{:?} acc {:.3} (n={})",
            k,
            run::evaluate(&Cpu, &t.model, &sub, None, tl).unwrap(),
            sub.len()
        );
    }
}
