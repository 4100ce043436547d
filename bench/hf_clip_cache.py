"""Give an offline WebUI the one thing from the model hub it loads at start: `openai/clip-vit-large-patch14`'s
tokenizer and text-encoder config, which A1111's SD1.x model code asks transformers for by name. Written into a
Hugging Face cache folder from the CLIP merges this package ships; no weights (the checkpoint brings them).

    python bench/hf_clip_cache.py ~/.cache/huggingface/hub     # then start the WebUI with HF_HUB_OFFLINE=1
"""
import json
import sys
from pathlib import Path

from erasure_core.backends.single_file import write_clip_vocabulary

REPO, REVISION = "models--openai--clip-vit-large-patch14", "0" * 40
TEXT_CONFIG = {"model_type": "clip_text_model", "architectures": ["CLIPTextModel"], "vocab_size": 49408,
               "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
               "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
TOKENIZER_CONFIG = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>"}

if __name__ == "__main__":
    hub = Path(sys.argv[1]).expanduser()
    snapshot = hub / REPO / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    (hub / REPO / "refs").mkdir(exist_ok=True)
    (hub / REPO / "refs" / "main").write_text(REVISION)
    write_clip_vocabulary(snapshot)
    (snapshot / "config.json").write_text(json.dumps(TEXT_CONFIG, indent=1))
    (snapshot / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1))
    (snapshot / "special_tokens_map.json").write_text(json.dumps(
        {k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=1))
    print(f"wrote {snapshot}")
