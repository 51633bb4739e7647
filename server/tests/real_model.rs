//! The real SmolLM2-135M-Instruct against references produced by the Hugging Face stack
//! (`tests/fixtures/`): tokenizer ids, chat template, logits and greedy continuation;
//! and the serving path (batched, chunked, KV-cached) against the plain reference path.

mod common;

use candle_core::{Device, Tensor};
use common::{fixtures, ids, json, log_softmax, model, top_k};
use graft_server::model::{BaseModel, ChatMessage, SeqChunk};

/// Logits of the last prompt position through the serving path, prefilled in `chunk`s.
fn serving_last_logits(m: &BaseModel, prompt: &[u32], chunk: usize) -> Vec<f32> {
    let mut pool = m.llama.kv_pool(8192).expect("KV pool");
    let mut cache = graft_server::model::KvCache::new();
    let mut last = None;
    for (i, c) in prompt.chunks(chunk).enumerate() {
        let want = (i + 1) * chunk >= prompt.len();
        let l = m
            .llama
            .forward_batch(
                &mut pool,
                &mut [SeqChunk {
                    tokens: c,
                    cache: &mut cache,
                    want_logits: want,
                    decode: false,
                    adapter: None,
                }],
            )
            .expect("forward");
        if want {
            last = Some(l.squeeze(0).expect("row").to_vec1::<f32>().expect("vec"));
        }
    }
    last.expect("logits")
}

#[test]
fn tokenizer_matches_hugging_face_ids() {
    let m = model();
    let fx = json(fixtures().join("tokenizer-smollm2.json"));
    for case in fx["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        let got = m.tokenizer.encode(text).expect("encode");
        assert_eq!(got, want, "ids of {text:?}");
        // Round trip (special tokens are dropped from decoded text, so skip that case).
        if !text.contains("<|") {
            assert_eq!(m.tokenizer.decode(&got).expect("decode"), text);
        }
    }
}

#[test]
fn chat_template_renders_the_reference_prompt() {
    let m = model();
    let r = json(fixtures().join("peft-lora-smollm2/reference.json"));
    let messages: Vec<ChatMessage> = r["prompt"]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|x| ChatMessage {
            role: x["role"].as_str().expect("role").into(),
            content: x["content"].as_str().expect("content").into(),
        })
        .collect();
    let text = m.chat.render(&messages, true).expect("render");
    assert_eq!(text, r["prompt"]["rendered"].as_str().expect("rendered"));
    assert_eq!(
        m.tokenizer.encode(&text).expect("encode"),
        ids(&r["prompt"]["token_ids"])
    );
}

/// Tolerances, stated: we dequantise the same GGUF to f32 as the reference did, so only
/// float summation order differs. Log-probabilities of the reference top-20 must agree
/// within 1e-3 (measured: 2e-5; the fixture README allows 0.51 for llama.cpp's quantised kernels), top-1
/// must be equal and at least 19 of the top-20 shared.
const LOGPROB_TOL: f32 = 1e-3;

#[test]
fn base_logits_match_the_reference() {
    let m = model();
    let dir = fixtures().join("peft-lora-smollm2");
    let r = json(dir.join("reference.json"));
    let prompt = ids(&r["prompt"]["token_ids"]);
    let refs =
        candle_core::safetensors::load(dir.join("reference_logits.safetensors"), &Device::Cpu)
            .expect("reference logits");
    let want: Vec<f32> = refs["base"]
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec");
    let got = serving_last_logits(&m, &prompt, 512);
    let (lw, lg) = (log_softmax(&want), log_softmax(&got));
    let top_w = top_k(&want, 20);
    let top_g = top_k(&got, 20);
    assert_eq!(top_g[0], top_w[0], "top-1");
    let shared = top_g.iter().filter(|t| top_w.contains(t)).count();
    assert!(shared >= 19, "only {shared} of the top-20 shared");
    let worst = top_w
        .iter()
        .map(|&t| (lw[t as usize] - lg[t as usize]).abs())
        .fold(0f32, f32::max);
    eprintln!("worst top-20 logprob difference: {worst}");
    assert!(
        worst <= LOGPROB_TOL,
        "logprob difference {worst} > {LOGPROB_TOL}"
    );
}

#[test]
fn greedy_continuation_matches_the_reference() {
    let m = model();
    let r = json(fixtures().join("peft-lora-smollm2/reference.json"));
    let prompt = ids(&r["prompt"]["token_ids"]);
    let want = ids(&r["base"]["greedy"]["ids"]);
    let (_, got) = common::greedy(&m, None, &prompt, want.len());
    assert_eq!(got, want);
    assert!(m
        .tokenizer
        .decode(&got)
        .expect("decode")
        .contains("Canberra"));
}

#[test]
fn serving_path_matches_reference_path_and_chunking_does_not_matter() {
    let m = model();
    let prompt = m
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog because it was")
        .expect("encode");
    let reference: Tensor = m.llama.forward_reference(&prompt).expect("reference");
    let reference: Vec<f32> = reference
        .get(prompt.len() - 1)
        .expect("row")
        .to_vec1()
        .expect("vec");
    for chunk in [prompt.len(), 5, 1] {
        let got = serving_last_logits(&m, &prompt, chunk);
        let worst = got
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "chunk {chunk}: max |logit diff| {worst}");
        assert_eq!(top_k(&got, 5), top_k(&reference, 5), "chunk {chunk}");
    }
}
