"""Built-in backbone families, one module each: `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, `llava` (and `thinking`,
helpers for thinking-with-image fine-tunes of the Qwen families).

Importing this package imports none of them: `qzoom_adapters.spec.BUILTIN_BACKBONES` names each family's class
("module:Class") and the registry imports it on the first lookup (`get_spec`, `registered_families`). The
modules here import only leaf modules of the core (`spec`, `errors`, `compat`) and each other.
"""
