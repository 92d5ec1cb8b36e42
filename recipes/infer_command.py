"""The `qzoom infer` command: its argument and path checks (run before any model loads) and the run."""
from __future__ import annotations

from pathlib import Path


def _heatmap_target(path: str, image: Path, overwrite: bool) -> Path:
    """Where `--heatmap` writes, checked before the run: an existing folder, an image extension PIL can
    write, and no existing file unless `--overwrite` (never the input image)."""
    from PIL import Image

    from qzoom_adapters.errors import QZoomError

    out = Path(path)
    if out.is_dir():
        raise QZoomError(f"--heatmap {out} is a folder; give a file name such as {out / 'heatmap.png'}")
    if not out.parent.is_dir():
        raise QZoomError(f"--heatmap {out}: the folder {out.parent} does not exist; create it first")
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise QZoomError(f"--heatmap {out}: {out.suffix or 'no extension'} is not an image format PIL can write; "
                         "use .png or .jpg")
    if out.exists():
        if out.resolve() == image.resolve() or out.samefile(image):
            raise QZoomError(f"--heatmap {out} is the input image; write the heatmap to another file")
        if not overwrite:
            raise QZoomError(f"--heatmap {out} exists; pass --overwrite to replace it, or choose another name")
    return out


def _load_processor(folder):
    from transformers import AutoProcessor

    import qzoom_adapters.backbones.tiny_processor  # noqa: F401  (lets AutoProcessor load processors saved by the demo/tests)
    from qzoom_adapters.errors import QZoomError

    path = Path(folder)
    if not path.is_dir():
        raise QZoomError(f"processor folder {path} does not exist" if not path.exists() else
                         f"processor folder {path} is not a folder")
    try:
        return AutoProcessor.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QZoomError(f"cannot load a processor from {path} ({first}); pass --processor with the folder the "
                         "processor was saved to") from None


def _device_dtype(device: str, dtype: str):
    """`--device` and `--dtype` as torch objects, checked before anything loads (`qzoom_adapters.devices`)."""
    from qzoom_adapters.devices import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def infer(args) -> int:
    """`qzoom infer`: every argument and path is checked before the (slow) model load, then one answer."""
    import qzoom_adapters as qz
    from qzoom_adapters.config import as_zoom_config
    from qzoom_adapters.errors import QZoomError
    from qzoom_adapters.images import load_image
    from qzoom_adapters.model_files import check_model_folder, load_model
    from qzoom_adapters.viz import heatmap_overlay

    from .models import batch_to

    # every argument is checked before the (slow) model load
    if args.reference and (args.model or args.adapters):
        raise QZoomError("give either --reference or --model with --adapters, not both")
    if not args.reference and not (args.model and args.adapters):
        raise QZoomError("give --model and --adapters, or --reference")
    if args.max_new_tokens < 1:
        raise QZoomError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.budget is not None and args.budget < 1:
        raise QZoomError(f"--budget must be at least 1 visual token, got {args.budget}")
    device, dtype = _device_dtype(args.device, args.dtype)
    overrides = {k: v for k, v in (("gate_threshold", args.gate_threshold), ("roi_threshold", args.roi_threshold),
                                   ("roi_region", args.roi_region), ("roi_refine", args.roi_refine),
                                   ("position_mode", args.position_mode)) if v is not None}
    as_zoom_config(overrides)  # a bad threshold fails here, in one line
    image = load_image(args.image)
    heatmap = _heatmap_target(args.heatmap, Path(args.image), args.overwrite) if args.heatmap else None
    if args.reference:
        check_model_folder(args.reference, "checkpoint folder")
    else:
        check_model_folder(args.model)
        if not Path(args.adapters).is_dir():
            raise QZoomError(f"adapter folder {args.adapters} does not exist" if not Path(args.adapters).exists()
                             else f"adapter folder {args.adapters} is not a folder")
    processor = _load_processor(args.processor or args.model or args.reference)
    # weights load straight into their dtype and onto the device (device_map), never through a second host copy
    if args.reference:
        zoom = qz.QZoom.from_reference_checkpoint(args.reference, processor, torch_dtype=dtype, device=device,
                                                  **overrides)
    else:
        placement = {} if device.type == "cpu" else {"device_map": {"": str(device)}}
        zoom = qz.QZoom.from_pretrained(args.adapters, load_model(args.model, dtype=dtype, **placement), processor,
                                        **overrides)
    for module in (zoom.twig, zoom.gate):  # the adapters follow the model's device and dtype
        if module is not None:
            module.to(device, None if dtype == "auto" else dtype)
    pixels = None
    if args.budget is not None:  # the global view (and the crop) at `--budget` visual tokens: min = max pixels
        pixels = zoom.spec.budget_pixels(args.budget)
        if pixels is None:
            raise QZoomError(f"the {zoom.spec.family} family reads every image at one fixed size; --budget does "
                             "not apply to it")
        zoom.config = zoom.config.model_copy(update={"crop_min_pixels": pixels, "crop_max_pixels": pixels})
    inputs = batch_to(zoom.spec.chat_inputs(processor, [image], [args.question], pixels=pixels), device)
    out = zoom.generate_from_inputs(inputs, [image], max_new_tokens=args.max_new_tokens)[0]
    gate = "n/a" if out.gate_prob is None else f"{out.gate_prob:.3f}"
    print(f"gate={gate} zoomed={out.zoomed} box={out.bbox} visual_tokens={out.visual_tokens}")
    print(out.text)
    if heatmap is not None:
        heatmap_overlay(image, out.heatmap, out.bbox).save(heatmap)
        print(f"heatmap -> {heatmap}")
    return 0
