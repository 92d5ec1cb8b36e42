"""GPU run of the stage-1 recipe at real shapes: label generation and twig training throughput.

No real weights can be downloaded, so the backbone is Qwen2.5-VL-3B's public architecture with
random weights (bf16), the offline tiny processor (a real Qwen2-VL image processor with a
character tokenizer), and synthetic ~1 MP scenes. Random weights rarely emit EOS, so every
response runs the full `max_new_tokens`: label throughput is a lower bound for real models.

Usage: python scripts/gpu_recipes.py WORKDIR OUT_JSON [samples] [steps]
  then:  accelerate launch --num_processes N -m qzoom_adapters.recipes.cli train stage1 --config WORKDIR/recipe.yaml
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import yaml


def build(work: Path, samples: int, steps: int) -> None:
    from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec
    from qzoom_adapters.backbones.tiny_processor import tiny_qwen2_5_vl_processor
    from qzoom_adapters.recipes.data import write_jsonl
    from qzoom_adapters.recipes.synthetic import demo_scenes

    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
    cls = Qwen2_5_VLSpec.model_class()
    cfg = cls.config_class(text_config=text, vision_config=vision, **Qwen2_5_VLSpec.TINY_IDS, **text)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls._from_config(cfg, dtype=torch.bfloat16)
    processor = tiny_qwen2_5_vl_processor()
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)
    model.save_pretrained(work / "model")
    processor.save_pretrained(work / "model")
    del model
    torch.cuda.empty_cache()
    (work / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(demo_scenes(samples, seed=0)):
        name = f"images/{i:05d}.png"
        s.image.resize((s.image.width * 4, s.image.height * 4)).save(work / name)  # ~1.2 MP
        rows.append({"id": f"s{i}", "image": name, "question": s.question, "answers": [s.answer],
                     "mode": "textual" if i % 2 == 0 else "natural"})
    write_jsonl(work / "records.jsonl", rows)
    recipe = {
        "model": {"path": "model", "dtype": "bfloat16"}, "K": 24, "T": 3,
        "labels_stage1": {"records": "records.jsonl", "out": "labels1", "grid": 24, "max_new_tokens": 128,
                          "batch_size": 16, "shard_size": 256, "num_workers": 8, "textual_pairs": {20: [1, 4], 22: [14]},
                          "natural_pairs": {21: [9, 11], 22: [0, 7]}, "natural_sink_pairs": {8: [1, 13]}},
        "stage1": {"labels": "labels1", "out": "stage1",
                   "train": {"batch_size": 16, "effective_batch": 32, "max_steps": steps, "save_every": steps, "num_workers": 8,
                             "log_every": 5}},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    samples = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build(work, samples, steps)
    result = {"build_s": time.perf_counter() - t0, "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__}
    import transformers

    from qzoom_adapters.recipes.config import load_config
    from qzoom_adapters.recipes.label_store import LabelStore
    from qzoom_adapters.recipes.stage1 import make_stage1_labels

    result["transformers"] = transformers.__version__
    cfg = load_config(work / "recipe.yaml")
    torch.cuda.reset_peak_memory_stats()
    result["labels"] = make_stage1_labels(cfg, show_progress=False)
    result["labels"]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    store = LabelStore(work / "labels1")
    result["labels"]["stored"] = len(store)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
