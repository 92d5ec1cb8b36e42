"""Built-in backbone families; importing this package registers them."""
from . import qwen2_5_vl  # noqa: F401
