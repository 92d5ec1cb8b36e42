"""Offline tiny vision-language processors: char-level tokenizers + PIL image processors + chat templates.

`tiny_vl_processor` wraps any HF processor class without its video sub-processor (every video processor
class needs torchvision); each family below is a few lines on top of it and of `_char_tokenizer`.
"""

import functools
import inspect

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoProcessor, PretrainedConfig

from qzoom_adapters import compat


CHARS = ["\n"] + [chr(i) for i in range(32, 127)]  # "\n" + printable ASCII (space .. "~"), after the fixed ids

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # fixed ids 0..6
UNK_TOKEN = "<unk>"  # id 7
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + 1 + len(CHARS)  # 104

LLAVA_FIXED_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]  # ids 0..4
TINY_LLAVA_VOCAB_SIZE = len(LLAVA_FIXED_TOKENS) + len(CHARS)  # 101

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-1.5: "<s>USER: <image>\n{question} ASSISTANT:"; one "<image>\n" per image item, where it stands.
LLAVA_CHAT_TEMPLATE = (
    "<s>"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<image>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _char_tokenizer(fixed_tokens, unk_token, **special_roles):
    """Char-level tokenizer: `fixed_tokens` at ids 0.. (all special except unk), then one id per char of CHARS."""
    vocab = {tok: i for i, tok in enumerate(fixed_tokens + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char (incl. "\n")
    backend.decoder = decoders.Fuse()  # concatenate characters, no spaces in between
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fixed_tokens if t != unk_token])
    return compat.char_tokenizer_class()(tokenizer_object=backend, unk_token=unk_token, model_max_length=32768,
                                          clean_up_tokenization_spaces=False, **special_roles)


def tiny_qwen_tokenizer():
    """Qwen-style tokenizer (specials 0..6, unk 7, chars from 8), accepted by every Qwen-VL processor."""
    return _char_tokenizer(SPECIAL_TOKENS + [UNK_TOKEN], UNK_TOKEN, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_llava_tokenizer():
    """LLaVA-style tokenizer: pad 0, bos 1, eos 2, <image> 3, unk 4, chars from 5."""
    return _char_tokenizer(LLAVA_FIXED_TOKENS, "<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@functools.cache
def tiny_processor_class(processor_cls):
    """`processor_cls` minus its video processor, registered with AutoProcessor (the class itself if it has none).

    Reloading a saved processor needs this to have run in the loading process: importing this module does it
    for the classes below; call it first for any other class.
    """
    if "video_processor" not in inspect.signature(processor_cls.__init__).parameters:
        return processor_cls  # e.g. LlavaProcessor: AutoProcessor already resolves it by name

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent sets all its token attributes, then hands (image_processor, tokenizer, None) to
        # ProcessorMixin.__init__, which zips them against our two attributes and so drops the None.
        processor_cls.__init__(self, image_processor, tokenizer, video_processor=None, chat_template=chat_template,
                               **kwargs)

    family = processor_cls.__name__.removesuffix("Processor")
    attrs = {"__init__": __init__, "__module__": __name__, "attributes": ["image_processor", "tokenizer"],
             "__doc__": f"{processor_cls.__name__} without the video sub-processor."}  # 4.x reads `attributes`
    cls = type(f"Tiny{processor_cls.__name__}", (processor_cls,), attrs)  # 5.x reads the __init__ signature
    config = type(f"Tiny{family}Config", (PretrainedConfig,),  # placeholder, only an AutoProcessor registry key
                  {"__module__": __name__, "model_type": f"tiny_{family.lower()}"})
    # Lets AutoProcessor.from_pretrained(saved_dir) resolve the class (by name) in any process importing this module.
    AutoProcessor.register(config, cls, exist_ok=True)
    return cls


def tiny_vl_processor(processor_cls, image_processor, tokenizer, chat_template, **extra):
    """An instance of `processor_cls` (or its video-less subclass) built from the given parts."""
    return tiny_processor_class(processor_cls)(image_processor=image_processor, tokenizer=tokenizer,
                                               chat_template=chat_template, **extra)


TinyQwen2_5_VLProcessor = tiny_processor_class(transformers.Qwen2_5_VLProcessor)
TinyQwen2VLProcessor = tiny_processor_class(transformers.Qwen2VLProcessor)
TinyQwen3VLProcessor = tiny_processor_class(transformers.Qwen3VLProcessor)


def _qwen(processor_cls, min_pixels, max_pixels, patch_size, merge_size):
    """A tiny Qwen-VL-family processor: shared tokenizer and template, PIL image processor."""
    image_processor = compat.pil_image_processor("Qwen2VLImageProcessor", min_pixels=min_pixels,
                                                  max_pixels=max_pixels, patch_size=patch_size, merge_size=merge_size)
    return tiny_vl_processor(processor_cls, image_processor, tiny_qwen_tokenizer(), QWEN_CHAT_TEMPLATE)


def tiny_qwen2_5_vl_processor(min_pixels: int = 12544, max_pixels: int = 37632, patch_size: int = 14,
                              merge_size: int = 2):
    """Qwen2_5_VLProcessor built fully offline (14-px patches: 16..48 merged tokens per image by default)."""
    return _qwen(transformers.Qwen2_5_VLProcessor, min_pixels, max_pixels, patch_size, merge_size)


def tiny_qwen2_vl_processor(min_pixels: int = 12544, max_pixels: int = 37632):
    """Qwen2VLProcessor built fully offline (14-px patches: 16..48 merged tokens per image by default)."""
    return _qwen(transformers.Qwen2VLProcessor, min_pixels, max_pixels, patch_size=14, merge_size=2)


def tiny_qwen3_vl_processor(min_pixels: int = 32 * 32 * 16, max_pixels: int = 32 * 32 * 48):
    """Qwen3VLProcessor built fully offline (16-px patches: 16..48 merged tokens per image by default)."""
    return _qwen(transformers.Qwen3VLProcessor, min_pixels, max_pixels, patch_size=16, merge_size=2)


def tiny_llava_processor(image_size: int = 84):
    """LlavaProcessor built fully offline: CLIP-style resize+crop to image_size, (image_size/14)**2 image tokens."""
    image_processor = compat.pil_image_processor(
        "CLIPImageProcessor", size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size}, do_center_crop=True)
    return tiny_vl_processor(transformers.LlavaProcessor, image_processor, tiny_llava_tokenizer(), LLAVA_CHAT_TEMPLATE,
                             patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
