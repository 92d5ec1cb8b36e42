"""The model card (`README.md`) written beside the adapter files, as peft writes one."""
from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_write
from .config import AdapterConfig

CARD_NAME = "README.md"
CARD_MARKER = "<!-- qzoom-adapters: model card written by save_pretrained; remove this line to keep your edits -->"


def _write_model_card(path: Path, cfg: AdapterConfig, model_class: str) -> None:
    """A short model card beside the adapter files, as peft writes one. A README.md without our marker line is
    the user's: it is left alone."""
    card = path / CARD_NAME
    if card.exists() or card.is_symlink():
        try:
            ours = card.is_file() and not card.is_symlink() and CARD_MARKER in card.read_text(errors="replace").splitlines()
        except OSError:
            ours = False
        if not ours:
            return
    atomic_write(card, lambda tmp: Path(tmp).write_text(model_card(cfg, model_class)))


def model_card(cfg: AdapterConfig, model_class: str = "AutoModelForImageTextToText") -> str:
    """The model card text for an adapter folder described by `cfg`."""
    base = cfg.base_model_name_or_path
    z = cfg.zoom
    parts = [f"twig RPN (layers {cfg.K}..{cfg.K + cfg.depth('twig') - 1}, T={cfg.depth('twig')})"] if cfg.has_twig else []
    if cfg.has_gate:
        parts.append(f"dynamic gate (layers {cfg.K}..{cfg.K + cfg.depth('gate') - 1}, T={cfg.depth('gate')})")
    front = ["---", "library_name: qzoom-adapters"] + ([f"base_model: {json.dumps(base)}"] if base else []) + [
        "tags:", "- qzoom", "- multimodal", "---"]
    load_base = base or "path/to/the/base/model"
    lines = front + [
        CARD_MARKER,
        "",
        "# Q-Zoom adapters",
        "",
        "Query-aware adaptive perception adapters for an unmodified Hugging Face multimodal model: a "
        + " and a ".join(parts) + f", both branching at decoder layer K={cfg.K}. The gate decides per question "
        "whether to zoom; the twig's heatmap gives the region that is cropped, re-encoded and appended to the "
        "global view. The base model's weights are not part of this folder.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base or 'not recorded'}{f' (revision {cfg.revision})' if cfg.revision else ''} |",
        f"| model type / family | {cfg.model_type} / {cfg.backbone_family} ({cfg.num_hidden_layers} decoder layers) |",
        f"| K / T | K={cfg.K}, " + ", ".join(
            f"{name} T={cfg.depth(name)}" for name, on in (("twig", cfg.has_twig), ("gate", cfg.has_gate)) if on) + " |",
        f"| gate threshold | {z.gate_threshold} |",
        f"| RoI threshold | {z.roi_threshold} |",
        f"| position mode | {z.position_mode or 'the backbone default'} |",
        f"| library | qzoom-adapters {cfg.library_version} |",
        "",
        "## Usage",
        "",
        "```python",
        "import qzoom_adapters as qz",
        "from PIL import Image",
        f"from transformers import AutoProcessor, {model_class}",
        "",
        f'model = {model_class}.from_pretrained("{load_base}"{f", revision={cfg.revision!r}" if cfg.revision else ""})',
        f'processor = AutoProcessor.from_pretrained("{load_base}")',
        'zoom = qz.QZoom.from_pretrained("path/to/this/folder", model=model, processor=processor)',
        'print(zoom.generate([Image.open("picture.jpg")], ["What is written on the sign?"])[0].text)',
        "```",
        "",
        "Settings saved here (`adapter_config.json`, `zoom`) can be overridden on load: "
        "`QZoom.from_pretrained(..., gate_threshold=0.5)`.",
        "",
    ]
    return "\n".join(lines)
