"""qzoom-adapters: Q-Zoom (query-aware adaptive perception) as adapters for unmodified HF models."""
from .config import AdapterConfig, ZoomConfig
from .errors import QZoomError
from .gate import DynamicGate
from .hooks import capture_layer_input
from .io import load_adapters, save_adapters
from .outputs import ZoomOutput
from .pipeline import QZoom
from .spec import BackboneSpec, get_spec, register_backbone, registered_families
from .twig import TwigRPN
from .version import __version__
from .vision_attention import fast_vision_attention

__all__ = [
    "AdapterConfig", "BackboneSpec", "DynamicGate", "QZoom", "QZoomError", "TwigRPN", "ZoomConfig", "ZoomOutput",
    "__version__", "capture_layer_input", "fast_vision_attention", "get_spec", "load_adapters", "register_backbone", "registered_families",
    "save_adapters",
]
