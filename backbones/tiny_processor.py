"""Offline tiny Qwen2.5-VL processor: char-level tokenizer + PIL Qwen2-VL image processor + chat template."""

import string

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoProcessor, PretrainedConfig, ProcessorMixin

from . import _compat


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # fixed ids 0..6
UNK_TOKEN = "<unk>"  # id 7
CHARS = ["\n"] + [chr(i) for i in range(32, 127)]  # "\n" + printable ASCII (space .. "~"), ids 8..
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + 1 + len(CHARS)  # 104

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


def _backend_tokenizer():
    """Raw `tokenizers.Tokenizer`: one token per character, specials at fixed ids 0..6."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [UNK_TOKEN] + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char (incl. "\n")
    tok.decoder = decoders.Fuse()  # concatenate characters, no spaces in between
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def tiny_qwen_tokenizer():
    """Transformers tokenizer wrapping the char-level backend, accepted by Qwen2_5_VLProcessor."""
    kwargs = dict(tokenizer_object=_backend_tokenizer(), unk_token=UNK_TOKEN, eos_token="<|im_end|>",
                  pad_token="<|endoftext|>", clean_up_tokenization_spaces=False, model_max_length=32768)
    return _compat.char_tokenizer_class()(**kwargs)


class TinyQwen2_5_VLConfig(PretrainedConfig):
    """Placeholder config, only used as the AutoProcessor registry key of TinyQwen2_5_VLProcessor."""

    model_type = "tiny_qwen2_5_vl"


class TinyQwen2_5_VLProcessor(transformers.Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without the video sub-processor (every video processor class needs torchvision)."""

    attributes = ["image_processor", "tokenizer"]  # 4.x reads this list; 5.x reads the __init__ signature

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id, self.video_token_id = tokenizer.convert_tokens_to_ids([self.image_token, self.video_token])
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


# Lets AutoProcessor.from_pretrained(dir_saved_by_this_processor) resolve the class (in any process importing this).
AutoProcessor.register(TinyQwen2_5_VLConfig, TinyQwen2_5_VLProcessor, exist_ok=True)


def tiny_qwen2_5_vl_processor(min_pixels: int = 12544, max_pixels: int = 37632, patch_size: int = 14,
                              merge_size: int = 2):
    """Qwen2_5_VLProcessor built fully offline (PIL image processor, tiny tokenizer, Qwen chat template)."""
    image_processor = _compat.qwen_image_processor(min_pixels=min_pixels, max_pixels=max_pixels,
                                                   patch_size=patch_size, merge_size=merge_size)
    return TinyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tiny_qwen_tokenizer(),
                                   chat_template=QWEN_CHAT_TEMPLATE)
