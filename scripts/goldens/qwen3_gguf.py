#!/usr/bin/env python3
"""tiny-qwen3 as GGUF files (tests/qwen3_goldens.rs): the safetensors checkpoint converted with
llama.cpp's own `gguf` package (its tensor-name map for MODEL_ARCH.QWEN3 and its Q8_0 quantizer),
so the Rust GGUF reader is checked against an independent writer. The references are the
transformers logits already in tests/fixtures/tiny-qwen3/reference.safetensors.

Writes tests/fixtures/tiny-qwen3/model-f32.gguf and model-q8_0.gguf (weights only: no tokenizer
metadata; the tests feed token ids).

Run: target/py/bin/python scripts/goldens/qwen3_gguf.py
"""
import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tiny-qwen3"


def write(path, quant):
    cfg = json.loads((DIR / "config.json").read_text())
    sd = load_file(DIR / "model.safetensors")
    n = cfg["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_name("tiny-qwen3")
    w.add_block_count(n)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant else gguf.LlamaFileType.ALL_F32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, n)
    for hf, t in sorted(sd.items()):
        if hf == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SystemExit(f"no GGUF name for {hf}")
        t = t.astype(np.float32)
        if quant and t.ndim == 2:
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", path)


write(DIR / "model-f32.gguf", False)
write(DIR / "model-q8_0.gguf", True)
