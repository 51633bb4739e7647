//! An HF-style directory (config.json, model.safetensors in HF layout, tokenizer.json,
//! tokenizer_config.json) loads into the same model as the GGUF it was written from:
//! same tokens, same logits. This exercises the HF loader and the q/k row permutation.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use graft_server::model::{
    tiny::{write_tiny_gguf, TinySpec},
    weights::permute_gguf_to_hf,
    BaseModel, SeqChunk,
};

fn last_logits(m: &BaseModel, ids: &[u32]) -> Vec<f32> {
    let mut pool = m.llama.kv_pool(8192).expect("KV pool");
    let mut cache = graft_server::model::KvCache::new();
    m.llama
        .forward_batch(
            &mut pool,
            &mut [SeqChunk {
                tokens: ids,
                cache: &mut cache,
                want_logits: true,
                decode: false,
                adapter: None,
            }],
        )
        .expect("forward")
        .squeeze(0)
        .expect("row")
        .to_vec1()
        .expect("vec")
}

#[test]
fn hf_directory_matches_the_gguf_it_came_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &TinySpec::default()).expect("tiny");
    let g = BaseModel::load(&gguf, &Device::Cpu).expect("load gguf");
    let cfg = g.config().clone();

    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).expect("mkdir");
    let w = &g.llama.weights;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        w.embed.weight().expect("embed"),
    );
    t.insert("model.norm.weight".into(), w.final_norm.clone());
    for (i, l) in w.layers.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{i}.{s}.weight");
        let q = permute_gguf_to_hf(&l.q.weight().expect("q"), cfg.num_heads).expect("permute q");
        let k = permute_gguf_to_hf(&l.k.weight().expect("k"), cfg.num_kv_heads).expect("permute k");
        t.insert(
            p("self_attn.q_proj"),
            q.to_dtype(candle_core::DType::BF16).expect("bf16"),
        );
        t.insert(p("self_attn.k_proj"), k);
        t.insert(p("self_attn.v_proj"), l.v.weight().expect("weight"));
        t.insert(p("self_attn.o_proj"), l.o.weight().expect("weight"));
        t.insert(p("mlp.gate_proj"), l.gate.weight().expect("weight"));
        t.insert(p("mlp.up_proj"), l.up.weight().expect("weight"));
        t.insert(p("mlp.down_proj"), l.down.weight().expect("weight"));
        t.insert(p("input_layernorm"), l.attn_norm.clone());
        t.insert(p("post_attention_layernorm"), l.ffn_norm.clone());
    }
    candle_core::safetensors::save(&t, hf.join("model.safetensors")).expect("save");
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": true,
        "bos_token_id": 1,
        "eos_token_id": 2
    });
    std::fs::write(hf.join("config.json"), config.to_string()).expect("config");
    g.tokenizer
        .save(&hf.join("tokenizer.json"))
        .expect("tokenizer");
    let tok_cfg = serde_json::json!({
        "add_bos_token": false,
        "chat_template": graft_server::model::chat::CHATML_TEMPLATE
    });
    std::fs::write(hf.join("tokenizer_config.json"), tok_cfg.to_string())
        .expect("tokenizer_config");

    let h = BaseModel::load(&hf, &Device::Cpu).expect("load hf dir");
    assert_eq!(h.config(), g.config());
    let text = "the three thin things in the theatre 123";
    let ids = g.tokenizer.encode(text).expect("encode");
    assert_eq!(h.tokenizer.encode(text).expect("encode"), ids);
    assert_eq!(h.tokenizer.eos_ids, vec![2]);
    let (a, b) = (last_logits(&g, &ids), last_logits(&h, &ids));
    // q went through bf16 on the HF side: allow its rounding, nothing more.
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.05, "max |logit diff| {worst}");
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .map(|x| x.0)
    };
    assert_eq!(argmax(&a), argmax(&b));
}

#[test]
fn a_directory_without_weights_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#,
    )
    .expect("config");
    let err = BaseModel::load(dir.path(), &Device::Cpu).expect_err("no weights");
    assert!(
        err.to_string().contains("tokenizer.json") || err.to_string().contains("safetensors"),
        "{err}"
    );
}
