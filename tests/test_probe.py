"""The stage-1 attention probe equals the layer's own eager attention (SPEC §4.1)."""
import pytest
import torch

from qzoom_adapters.probe import average_map, probe_attention
from qzoom_adapters.spec import get_spec
from qzoom_adapters.trunk import Trunk


def _eager_model(kit):
    """The same tiny model (seed 0) with eager attention everywhere, so it can return attention weights."""
    model = kit.fresh_model(0)
    model.config._attn_implementation = "eager"
    for sub in (getattr(model.config, "text_config", None), getattr(model.config, "vision_config", None)):
        if sub is not None:
            sub._attn_implementation = "eager"
    return model


@pytest.mark.parametrize("family", ["qwen25", "qwen3", "llava"])
def test_probe_equals_eager_attention(family, request):
    kit = request.getfixturevalue(family)
    model = _eager_model(kit)
    spec = get_spec(model)
    inputs = kit.inputs(kit.images[:2], kit.questions[:2])
    # a response of different length per sample: right padding after left-padded prompts
    resp = torch.tensor([[7, 8, 9, 10], [11, 12, 0, 0]])
    ids = torch.cat([inputs["input_ids"], resp], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])], dim=1)
    S = inputs["input_ids"].shape[1]
    rows = torch.tensor([[S, S + 1, S + 2], [S, S + 1, S + 1]])
    grids = spec.image_grids(inputs)
    layers = [1, 4]
    probs = probe_attention(Trunk(spec), ids, mask, inputs["pixel_values"], grids, rows, layers)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], output_attentions=True,
              use_cache=False)
    if "image_grid_thw" in inputs:
        kw["image_grid_thw"] = inputs["image_grid_thw"]
    if "mm_token_type_ids" in inputs:
        kw["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(resp)], dim=1)
    with torch.no_grad():
        eager = model(**kw).attentions
    for layer in layers:
        for b in range(2):
            expect = eager[layer][b][:, rows[b]]  # (H, R, S)
            got = probs[layer][b]
            real = mask[b].bool()
            torch.testing.assert_close(got[..., real], expect[..., real].float(), atol=1e-5, rtol=1e-4)
    # the average over pairs and rows is the plain mean of those eager rows at the image keys
    image = ids == spec.image_token_id
    valid = torch.tensor([[True, True, True], [True, True, False]])
    maps = average_map(probs, {1: [0, 2], 4: [1]}, valid, image)
    for b in range(2):
        r = rows[b][valid[b]]
        want = torch.stack([eager[1][b][0][r], eager[1][b][2][r], eager[4][b][1][r]]).mean(dim=(0, 1))[image[b]]
        torch.testing.assert_close(maps[b], want.float(), atol=1e-6, rtol=1e-4)


def test_probe_runs_no_layer_past_the_last_probed(qwen25):
    model = qwen25.model
    spec = get_spec(model)
    inputs = qwen25.inputs(qwen25.images[:1], qwen25.questions[:1])
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(spec.layers)]
    try:
        S = inputs["input_ids"].shape[1]
        probe_attention(Trunk(spec), inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                        inputs["image_grid_thw"], torch.tensor([[S - 1]]), [2])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1, 2]
