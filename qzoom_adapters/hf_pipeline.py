"""A transformers pipeline for Q-Zoom: `pipeline("qzoom-image-text-to-text", model=..., adapters=...)`.

Importing this module registers the task with transformers' `PIPELINE_REGISTRY` (as kvpress registers its press
pipeline); it is not imported by `import qzoom_adapters`, because importing `transformers.pipelines` costs seconds:

    import qzoom_adapters.hf_pipeline  # registers "qzoom-image-text-to-text"
    # (a model folder with the project's offline tiny processor, e.g. the ZoomWorld default, also needs
    #  `import qzoom_adapters.backbones.tiny_processor` so that AutoProcessor knows it; core never imports backbones)
    from transformers import pipeline

    pipe = pipeline("qzoom-image-text-to-text", model="path/to/model", adapters="path/to/adapters")
    out = pipe({"image": image, "text": "What is written on the sign?"}, max_new_tokens=32)
    out["generated_text"], out["zoomed"], out["gate_prob"], out["bbox"], out["heatmap"]

transformers loads the model (a folder by its family's class, a hub id by `AutoModelForImageTextToText`; the usual
`dtype=`, `device=`, `device_map=` apply) and its processor; the pipeline attaches the adapters with
`QZoom.from_pretrained` (a folder written by `save_pretrained`), or reads them from the model's own released Q-Zoom
checkpoint with `adapters="reference"`. Keyword arguments that are `ZoomConfig` fields (`gate_threshold=0.05`,
`roi_threshold=...`) override the saved settings. Answers are greedy and come from `QZoom.generate` (a batch of
`batch_size` samples per call, each with its own gate decision).
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForImageTextToText, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .config import ZoomConfig
from .errors import QZoomError
from .images import source_image
from .outputs import ZoomOutput
from .pipeline import QZoom

TASK = "qzoom-image-text-to-text"


def _sample(item) -> dict:
    """One input as {"image", "text"}: a dict with "image" and "text" (or "question")."""
    if not isinstance(item, dict) or "image" not in item or not ({"text", "question"} & set(item)):
        raise QZoomError(f"each input must be a dict with 'image' and 'text', got {type(item).__name__}; e.g. "
                         "pipe({'image': img, 'text': 'What is written?'}) or pipe(images=[...], text=[...])")
    text = item.get("text", item.get("question"))
    if not isinstance(text, str):
        raise QZoomError(f"'text' must be a string, got {type(text).__name__}")
    return {"image": item["image"], "text": text}


class QZoomBackboneLoader:
    """What the pipeline factory calls `from_pretrained` on (the task's `pt_model`): a model folder loads as
    `model_files.load_model` loads it (its family's class; its config read through `compat.load_config`, so a folder
    saved on the other transformers line keeps its rope settings), a hub id through `AutoModelForImageTextToText`."""

    @classmethod
    def from_pretrained(cls, name_or_path, *args, **kwargs):
        from .model_files import load_model

        if Path(str(name_or_path)).is_dir():
            kwargs.pop("config", None)  # read again, version-proof, by load_model
            kwargs.pop("_from_pipeline", None)
            return load_model(name_or_path, *args, **kwargs)
        return AutoModelForImageTextToText.from_pretrained(name_or_path, *args, **kwargs)


class QZoomImageTextToTextPipeline(Pipeline):
    """Gated two-pass Q-Zoom answers with their gate probability, box and heatmap (see the module docstring)."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model, *args, adapters=None, zoom_config: ZoomConfig | dict | None = None, **kwargs):
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in ZoomConfig.model_fields}
        super().__init__(model, *args, **kwargs)
        if self.processor is None:
            raise QZoomError(f"the {TASK} pipeline needs the model's processor: pass processor= (or a model folder "
                             "that holds one)")
        self.zoom = self._attach(adapters, zoom_config, overrides)

    def _attach(self, adapters, zoom_config, overrides) -> QZoom:
        if adapters is None:
            raise QZoomError(f"the {TASK} pipeline needs adapters=: a folder written by QZoom.save_pretrained, or "
                             "'reference' for a released Q-Zoom checkpoint loaded as the model")
        if isinstance(adapters, QZoom):
            if adapters.model is not self.model:
                raise QZoomError("adapters= is a QZoom on another model; pass model=zoom.model")
            return adapters.with_config(zoom_config, **overrides)
        if str(adapters) == "reference":
            from .config import merge_zoom_config
            from .io import load_reference_adapters

            twig, gate, fields = load_reference_adapters(self.model.name_or_path, self.model)
            config = merge_zoom_config({**ZoomConfig().model_dump(), **fields}, zoom_config, overrides)
            return QZoom(self.model, self.processor, twig=twig, gate=gate, config=config)
        return QZoom.from_pretrained(adapters, self.model, self.processor, config=zoom_config, **overrides)

    def __call__(self, inputs=None, *, images=None, text=None, **kwargs):
        """`pipe({"image": img, "text": q})` -> one dict; `pipe([{...}, ...])` or `pipe(images=[...], text=[...])`
        -> a list of dicts. Keywords: `max_new_tokens` (default 32), `batch_size`."""
        if images is not None or text is not None:
            if inputs is not None:
                raise QZoomError("pass either inputs or images=/text=, not both")
            single = isinstance(text, str)
            images, text = ([images], [text]) if single else (list(images or []), list(text or []))
            if len(images) != len(text):
                raise QZoomError(f"got {len(images)} images for {len(text)} texts")
            inputs = [{"image": i, "text": t} for i, t in zip(images, text)]
            inputs = inputs[0] if single else inputs
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(inputs, list):
            inputs = [_sample(item) for item in inputs]
        elif inputs is not None:
            inputs = _sample(inputs)
        else:
            raise QZoomError("nothing to answer: pass {'image': ..., 'text': ...} or images=/text=")
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, max_new_tokens=None, **kwargs):
        if kwargs:
            raise QZoomError(f"unknown {TASK} call options {sorted(kwargs)}; it takes max_new_tokens and batch_size")
        forward = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        return {}, forward, {}

    def preprocess(self, inputs) -> dict:
        # the source image stays a PIL image: QZoom re-encodes its crop from the original resolution
        return {"image": source_image(inputs["image"]), "question": inputs["text"]}

    def _forward(self, model_inputs, max_new_tokens: int = 32) -> dict:
        batched = not isinstance(model_inputs["question"], str)  # batch_size > 1: lists, collated by transformers
        images = model_inputs["image"] if batched else [model_inputs["image"]]
        questions = model_inputs["question"] if batched else [model_inputs["question"]]
        outs = self.zoom.generate(images, questions, max_new_tokens=max_new_tokens)
        return {"output": outs if batched else outs[0]}

    def postprocess(self, model_outputs) -> dict:
        out: ZoomOutput = model_outputs["output"]
        return {"generated_text": out.text, "zoomed": out.zoomed, "gate_prob": out.gate_prob, "bbox": out.bbox,
                "heatmap": out.heatmap, "visual_tokens": out.visual_tokens, "tokens": out.tokens}


def register() -> None:
    """Register `TASK` with transformers (done on import of this module; calling it again is harmless)."""
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=QZoomImageTextToTextPipeline,
                                            pt_model=QZoomBackboneLoader, type="multimodal")


register()
