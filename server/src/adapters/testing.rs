//! Random PEFT LoRA adapters, for tests and benchmarks (deterministic from a seed).

use super::formats::{self, Details, Parsed};
use crate::model::{lora::LoraPair, Adapter, BaseModel, Module};

/// Random LoRA weights on all seven modules of `model` at rank `rank` (scale 2): every A and
/// B entry uniform in `[-spread/2, spread/2)`, from a xorshift stream seeded by `seed`.
pub fn random_lora(model: &BaseModel, seed: u64, rank: usize, spread: f32) -> Adapter {
    let cfg = model.config();
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * spread
    };
    let mut w = Adapter::new(cfg.num_layers);
    for layer in 0..cfg.num_layers {
        for m in Module::ALL {
            let base = m.of(&model.llama.weights.layers[layer]);
            let (o, i) = (base.out_features(), base.in_features());
            w.set(
                layer,
                m,
                LoraPair {
                    a: (0..rank * i).map(|_| rnd()).collect::<Vec<f32>>().into(),
                    b: (0..o * rank).map(|_| rnd()).collect::<Vec<f32>>().into(),
                    rank,
                    in_features: i,
                    out_features: o,
                    scale: 2.0,
                },
            );
        }
    }
    w
}

/// PEFT files of a random LoRA adapter (all seven modules, rank `rank`) for `model`.
pub fn random_peft(model: &BaseModel, seed: u64, rank: usize) -> (Vec<u8>, Vec<u8>) {
    peft_files(model, random_lora(model, seed, rank, 0.2), rank)
}

/// PEFT files (config, weights) of `adapter`: LoRA pairs of rank `rank` on all seven
/// modules, alpha `2 * rank`.
pub fn peft_files(model: &BaseModel, adapter: Adapter, rank: usize) -> (Vec<u8>, Vec<u8>) {
    let parsed = Parsed {
        details: Details::Lora {
            rank,
            alpha: 2.0 * rank as f64,
            target_modules: Module::ALL
                .iter()
                .map(|m| m.hf_name().to_string())
                .collect(),
            use_rslora: false,
            use_dora: false,
        },
        adapter,
        prompt: None,
    };
    formats::write(&parsed, model.config(), &model.name).expect("write PEFT files")
}
