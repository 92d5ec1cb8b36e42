"""Our own greedy decoding over prepared KV caches, without a host sync per token.

All rows that need decoding (the direct rows and the zoomed rows of one batch) are decoded together as
one batch, each group right-aligned in one cache:

* `static` / `cuda_graph`: each group's cache is copied once into preallocated buffers (`StaticKV`, a duck-typed HF
  cache whose `update` writes at a device-side column index). One decode step (embed -> rotary ->
  decoder layers -> norm -> head -> argmax -> bookkeeping) then touches only fixed tensors, so on CUDA it
  is captured once in a CUDA graph and replayed per token; `static` runs the same step eagerly.
* `dynamic`: the backbone's own text model with an HF `DynamicCache` (the groups concatenated by
  `DecodeRows.merge`), one call per token: the fallback
  for anything the static step cannot run (e.g. flash-attention's unpadding, a capture error).

Tokens stay on the device; `done.all()` is read once every `CHECK_EVERY` steps (early exit on EOS) and
the tokens come back to the host once at the end.

What is kept: the static buffer sets (and their CUDA graphs) of the most recently used shapes, at most
`Decoder.max_states` of them and, where `Decoder.max_bytes` is set, at most that many bytes of buffers (least
recently used first out; the set in use always stays). `Decoder.release()` (`QZoom.release_buffers()`) drops all
of them on request.
"""
from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from qzoom_adapters import compat as _compat
from . import timing

CHECK_EVERY = 16  # steps between host reads of "every row has finished"
SEQ_BUCKET = 64  # static buffers round their length up to this, so shapes (and graphs) repeat
MAX_STATES = 4  # static buffer sets (and graphs) kept per decoder, by default
DECODE_MODES = ("auto", "cuda_graph", "static", "dynamic")


def eos_ids(model) -> set[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


@dataclass
class DecodeRows:
    """Rows ready to decode: logits after the prompt, the cached sequence and where it stands.

    first: (R, V) logits; mask: (R, S) attention mask of the cached columns; last_pos: (axes, R)
    position of the last prompt token (decode step n gets last_pos + n); kvs: per layer (keys, values),
    each (R, KV, S, D).
    """

    first: torch.Tensor
    mask: torch.Tensor
    last_pos: torch.Tensor
    kvs: list

    @classmethod
    def from_cache(cls, first, mask, last_pos, cache, n_layers: int) -> "DecodeRows":
        return cls(first, mask, last_pos, [_compat.cache_kv(cache, i) for i in range(n_layers)])

    @staticmethod
    def merge(groups: list["DecodeRows"], with_kv: bool = True) -> "DecodeRows":
        """One batch of all groups' rows, each right-aligned in a common cache length (left padding).

        `with_kv=False` leaves `kvs` None (the static path copies each group's cache into its buffers itself).
        """
        if len(groups) == 1:
            return groups[0] if with_kv else DecodeRows(groups[0].first, groups[0].mask, groups[0].last_pos, None)
        S = max(g.mask.shape[1] for g in groups)

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            pad = S - t.shape[dim]
            if pad == 0:
                return t
            shape = list(t.shape)
            shape[dim] = pad
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        dtype = functools.reduce(torch.promote_types, [g.last_pos.dtype for g in groups])
        return DecodeRows(
            first=torch.cat([g.first for g in groups]),
            mask=torch.cat([left_pad(g.mask, 1) for g in groups]),
            last_pos=torch.cat([g.last_pos.to(dtype) for g in groups], dim=1),
            kvs=[tuple(torch.cat([left_pad(g.kvs[i][j], 2) for g in groups]) for j in (0, 1))
                 for i in range(len(groups[0].kvs))] if with_kv else None,
        )


class StaticKV:
    """Preallocated per-layer keys/values; `update` writes the step's K/V at column `cpos` (a device tensor).

    Duck-types the one method of an HF cache that decoder layers call, so the backbone's own layers run on it.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], cpos: torch.Tensor):
        self.keys, self.values, self.cpos = keys, values, cpos

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.cpos, key_states)
        self.values[layer_idx].index_copy_(2, self.cpos, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class _StaticState:
    """Fixed tensors of one (batch, length, steps) shape: cache buffers, mask, token, positions, outputs."""

    def __init__(self, rows: DecodeRows, kvs: list, n_steps: int, s_max: int, mask_dtype, eos: tuple[int, ...],
                 device):
        B = rows.first.shape[0]
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.cpos = torch.zeros(1, dtype=torch.long, device=device)

        def buffers(i: int) -> list[torch.Tensor]:
            return [torch.zeros(B, kv[i].shape[1], s_max, kv[i].shape[3], dtype=kv[i].dtype, device=device) for kv in kvs]

        self.kv = StaticKV(buffers(0), buffers(1), self.cpos)
        boolean = mask_dtype == torch.bool  # sdpa takes a boolean mask, eager an additive one
        self.allow = True if boolean else 0.0
        self.block = False if boolean else torch.finfo(mask_dtype).min
        self.mask = torch.full((B, 1, 1, s_max), self.block, dtype=mask_dtype, device=device)
        self.tok = torch.zeros(B, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows.last_pos.shape[0], B, 1, dtype=rows.last_pos.dtype, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros(B, n_steps, dtype=torch.long, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.graph = None

    def nbytes(self) -> int:
        """Bytes of this state's tensors (the cache buffers dominate)."""
        tensors = [*self.kv.keys, *self.kv.values, self.mask, self.tok, self.pos, self.out, self.done, self.cpos,
                   self.step] + ([self.eos] if self.eos is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def free(self) -> None:
        """Drop the graph (and its memory pool) and the buffers; the state is unusable afterwards."""
        graph, self.graph = self.graph, None
        if graph:
            graph.reset()
        self.kv.keys, self.kv.values = [], []
        self.mask = self.tok = self.pos = self.out = self.done = self.eos = None

    def load(self, rows: DecodeRows, groups: list[DecodeRows], tok: torch.Tensor) -> None:
        """Copy each group's cache into its rows, right-aligned at column S (= `rows`' merged length), and reset
        the step state to "first token emitted"."""
        S, r = rows.mask.shape[1], 0
        for g in groups:
            n, s_g = g.mask.shape
            for layer, (k, v) in enumerate(g.kvs):
                self.kv.keys[layer][r : r + n, :, S - s_g : S].copy_(k)
                self.kv.values[layer][r : r + n, :, S - s_g : S].copy_(v)
            r += n
        allowed = rows.mask.bool()[:, None, None, :]
        self.mask.fill_(self.block)
        self.mask[..., :S].masked_fill_(allowed, self.allow)
        self.tok.copy_(tok)
        self.pos.copy_((rows.last_pos + 1)[:, :, None])
        self.cpos.fill_(S)
        self.step.fill_(1)
        self.out[:, 0] = tok
        self.done.copy_(torch.isin(tok, self.eos) if self.eos is not None else torch.zeros_like(self.done))


class Decoder:
    """Greedy decoding for one backbone; keeps static buffers and CUDA graphs between calls."""

    def __init__(self, spec, trunk, max_states: int = MAX_STATES, max_bytes: int | None = None):
        self.spec, self.trunk = spec, trunk
        self._states: OrderedDict = OrderedDict()
        self.max_states = max_states  # buffer sets (shapes) kept, least recently used out first
        self.max_bytes = max_bytes  # None: no byte bound beyond max_states
        self.last_mode: str | None = None  # what the last call actually ran (after fallbacks)

    # --- what is kept ------------------------------------------------------------------------------
    def buffer_bytes(self) -> int:
        """Bytes held in static buffers by the kept states."""
        return sum(state.nbytes() for state in self._states.values())

    @property
    def kept_shapes(self) -> list[tuple]:
        """Keys (batch, buffer length, steps, ...) of the kept states, least recently used first."""
        return list(self._states)

    def release(self, empty_cache: bool = True) -> int:
        """Drop every kept buffer set and CUDA graph; returns the bytes of buffers dropped."""
        freed = self.buffer_bytes()
        cuda = any(state.cpos.device.type == "cuda" for state in self._states.values())
        while self._states:
            self._states.popitem(last=False)[1].free()
        if cuda and empty_cache:
            torch.cuda.empty_cache()
        return freed

    def _evict(self, keep) -> None:
        """Drop least recently used states beyond `max_states` and `max_bytes`, never `keep` (the one in use)."""
        def over() -> bool:
            return len(self._states) > max(1, self.max_states) or (
                self.max_bytes is not None and self.buffer_bytes() > self.max_bytes)

        while len(self._states) > 1 and over():
            key = next(k for k, state in self._states.items() if state is not keep)
            self._states.pop(key).free()

    # --- which path -------------------------------------------------------------------------------
    def _choose(self, mode: str, device: torch.device) -> str:
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
        if mode != "auto":
            return mode
        attn = _compat.attn_implementation(self.spec.text_model)
        if device.type == "cuda" and attn in ("sdpa", "eager"):
            return "cuda_graph"
        return "dynamic"

    # --- entry point ----------------------------------------------------------------------------------
    def greedy(self, groups: list[DecodeRows], max_new_tokens: int, eos: set[int], template: dict,
               mode: str = "auto") -> list[list[int]]:
        """Greedy tokens for the rows of all `groups` in order, each cut after its first EOS.

        `template`: layer kwargs of a prefill (their form for this backbone and version); `mode`: see `DECODE_MODES`.
        """
        rows = DecodeRows.merge(groups, with_kv=False)
        tok = rows.first.argmax(-1)
        eos_t = torch.tensor(sorted(eos), device=tok.device, dtype=tok.dtype) if eos else None
        mode = self._choose(mode, tok.device)
        unknown = _compat.unsupported_decode_kwargs(template) if mode in ("static", "cuda_graph") else []
        if unknown:
            warnings.warn(f"the static decode step cannot rebuild layer inputs {unknown}; decoding dynamically",
                          stacklevel=2)
            mode = "dynamic"
        with timing.stage("decode"):
            if max_new_tokens <= 1:
                seq, mode = tok[:, None], "none"
            elif mode == "dynamic":
                seq = self._dynamic(DecodeRows.merge(groups), tok, eos_t, max_new_tokens)
            else:
                seq, mode = self._static(rows, groups, tok, tuple(sorted(eos)), max_new_tokens, template,
                                         mode == "cuda_graph")
            seq = seq.tolist()  # the one host transfer
        timing.count("decode_steps", len(seq[0]) if seq else 0)
        self.last_mode = mode
        out = []
        for row in seq:
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
        return out

    # --- dynamic: the text model's own forward per token ---------------------------------------------
    def _dynamic(self, rows: DecodeRows, tok, eos_t, n_steps: int) -> torch.Tensor:
        cache = _compat.cache_from_kv(list(rows.kvs))
        B = tok.shape[0]
        mask, steps = rows.mask, [tok]
        done = torch.isin(tok, eos_t) if eos_t is not None else None
        for n in range(1, n_steps):
            if done is not None and n % CHECK_EVERY == 0 and bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            tok = self.trunk.step(tok, mask, (rows.last_pos + n)[:, :, None], cache).argmax(-1)
            steps.append(tok)
            if done is not None:
                done |= torch.isin(tok, eos_t)
        return torch.stack(steps, dim=1)

    # --- static buffers (+ CUDA graph) ----------------------------------------------------------------
    def _state(self, rows: DecodeRows, kvs: list, n_steps: int, mask_dtype, eos: tuple[int, ...],
               graph: bool) -> _StaticState:
        S = rows.mask.shape[1]
        s_max = -(-(S + n_steps) // SEQ_BUCKET) * SEQ_BUCKET
        k0 = kvs[0][0]
        key = (rows.first.shape[0], s_max, n_steps, mask_dtype, rows.last_pos.dtype, rows.last_pos.shape[0],
               k0.dtype, k0.device, eos, graph)
        state = self._states.pop(key, None)
        if state is None:
            while len(self._states) >= max(1, self.max_states):  # room first: old buffers go before new ones come
                self._states.popitem(last=False)[1].free()
            state = _StaticState(rows, kvs, n_steps, s_max, mask_dtype, eos, k0.device)
        self._states[key] = state
        self._evict(state)
        return state

    def _static(self, rows: DecodeRows, groups: list[DecodeRows], tok, eos: tuple[int, ...], n_steps: int,
                template: dict, graph: bool):
        mask_t = template.get("attention_mask")
        mask_dtype = mask_t.dtype if isinstance(mask_t, torch.Tensor) and mask_t.is_floating_point() else torch.bool
        state = self._state(rows, groups[0].kvs, n_steps, mask_dtype, eos, graph)
        if graph and state.graph is None:
            try:
                state.graph = self._capture(state, template)
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager static step
                warnings.warn(f"CUDA graph capture of the decode step failed ({type(err).__name__}: {err}); "
                              "decoding without a graph", stacklevel=3)
                state.graph = False
        state.load(rows, groups, tok)
        use_graph = bool(state.graph)
        mode = "cuda_graph" if use_graph else "static"
        for n in range(1, n_steps):
            if eos and n % CHECK_EVERY == 0 and bool(state.done.all()):
                return state.out[:, :n].clone(), mode
            if use_graph:
                state.graph.replay()
            else:
                self._step(state, template)
        return state.out.clone(), mode

    def _step(self, st: _StaticState, template: dict) -> None:
        """One greedy step for every row, entirely on fixed tensors (capturable)."""
        spec = self.spec
        st.mask.index_fill_(-1, st.cpos, st.allow)
        h = spec.embed_tokens(st.tok[:, None])
        rotary = spec.rotary_embeddings(h, self.trunk.model_positions(st.pos))
        kwargs = _compat.decode_layer_kwargs(template, st.kv, st.mask, rotary, st.pos, st.cpos)
        for layer in spec.layers:
            h = spec.call_layer(layer, h, kwargs)
        nxt = spec.lm_head(spec.norm(h[:, -1])).argmax(-1)
        if st.eos is not None:
            st.done |= torch.isin(nxt, st.eos)
        st.out.index_copy_(1, st.step, nxt[:, None])
        st.tok.copy_(nxt)
        st.pos.add_(1)
        st.cpos.add_(1)
        st.step.add_(1)

    def _capture(self, st: _StaticState, template: dict):
        """Warm the step up on a side stream, then capture it; the state is reloaded before use."""
        st.cpos.fill_(0)
        st.step.fill_(0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                st.cpos.fill_(0)
                st.step.fill_(0)
                self._step(st, template)
        torch.cuda.current_stream().wait_stream(side)
        st.cpos.fill_(0)
        st.step.fill_(0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(st, template)
        return graph
