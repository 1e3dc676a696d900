"""Our parameter tree <-> Hugging Face tensor names, as plain float32 NumPy arrays.

nnx kernels are [in, out], torch weights [out, in]. RoPE is the one convention that differs:
we rotate interleaved pairs (x[2i], x[2i+1]), transformers rotates the halves (x[i], x[i + d/2]);
reordering each head's query and key rows to [0, 2, 4, ..., 1, 3, 5, ...] makes the second
compute the first (attention scores are invariant to one permutation applied to both)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config.schema import ModelSpec
from ..core.tokenizer import VOCAB_SIZE

Tree = dict[str, Any]

# Ours (under `blocks`) -> transformers' names inside `model.layers.{i}.`, transposed.
LINEAR = {
    ("attn", "wq"): "self_attn.q_proj",
    ("attn", "wk"): "self_attn.k_proj",
    ("attn", "wv"): "self_attn.v_proj",
    ("attn", "wo"): "self_attn.o_proj",
    ("mlp", "w1"): "mlp.gate_proj",
    ("mlp", "w3"): "mlp.up_proj",
    ("mlp", "w2"): "mlp.down_proj",
}
NORMS = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm"}
ROTATED = {"wq": "n_heads", "wk": "n_kv_heads"}


def rotary_order(head_dim: int) -> np.ndarray:
    """Row order that turns interleaved RoPE pairs into halves, per head."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _rows(w: np.ndarray, heads: int, order: np.ndarray) -> np.ndarray:
    """Reorder the rows of a [heads * head_dim, in] weight within each head."""
    return w.reshape(heads, -1, w.shape[-1])[:, order, :].reshape(w.shape)


def to_hf(params: Tree, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The decoder's parameters (task heads left out) under transformers' Llama names."""
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    out = {"model.embed_tokens.weight": f32(params["embed"]), "model.norm.weight": f32(params["final_norm"]["scale"])}
    order = rotary_order(spec.head_dim)
    blocks = params["blocks"]
    for i in range(spec.n_layers):
        for (part, name), hf in LINEAR.items():
            w = f32(blocks[part][name]["kernel"][i]).T
            if name in ROTATED:
                w = _rows(w, getattr(spec, ROTATED[name]), order)
            out[f"model.layers.{i}.{hf}.weight"] = f32(w)
        for name, hf in NORMS.items():
            out[f"model.layers.{i}.{hf}.weight"] = f32(blocks[name]["scale"][i])
            if "bias" in blocks[name]:
                out[f"model.layers.{i}.{hf}.bias"] = f32(blocks[name]["bias"][i])
    return out


def hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the export of a `spec` model, with its shape (torch's [out, in])."""
    d, ff, q, kv = spec.dim, spec.intermediate_size, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    linear = {
        "self_attn.q_proj": (q, d),
        "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, q),
        "mlp.gate_proj": (ff, d),
        "mlp.up_proj": (ff, d),
        "mlp.down_proj": (d, ff),
    }
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB_SIZE, d), "model.norm.weight": (d,)}
    for i in range(spec.n_layers):
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in linear.items()})
        for hf in NORMS.values():
            shapes[f"model.layers.{i}.{hf}.weight"] = (d,)
            if spec.norm_type == "deepnorm":
                shapes[f"model.layers.{i}.{hf}.bias"] = (d,)
    return shapes


def from_hf(tensors: dict[str, np.ndarray], spec: ModelSpec) -> Tree:
    """`to_hf` inverted: our decoder's parameter tree (float32) for `spec`. A tensor missing,
    of another shape, or one our model does not have raises ValueError naming it."""
    shapes = hf_shapes(spec)
    extra = sorted(k for k in tensors if k not in shapes and k != "lm_head.weight" and not k.endswith("inv_freq"))
    if extra:
        raise ValueError(f"tensors our model does not have: {', '.join(extra[:3])}")

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"no tensor {name}")
        t = np.asarray(tensors[name], np.float32)
        if t.shape != shapes[name]:
            raise ValueError(f"{name} has shape {list(t.shape)}, the config's model needs {list(shapes[name])}")
        return t

    inverse = np.argsort(rotary_order(spec.head_dim))
    blocks: Tree = {"attn": {}, "mlp": {}}
    layers = range(spec.n_layers)
    for (part, name), hf in LINEAR.items():
        ws = []
        for i in layers:
            w = take(f"model.layers.{i}.{hf}.weight")
            if name in ROTATED:
                w = _rows(w, getattr(spec, ROTATED[name]), inverse)
            ws.append(w.T)
        blocks[part][name] = {"kernel": np.stack(ws)}
    for name, hf in NORMS.items():
        blocks[name] = {"scale": np.stack([take(f"model.layers.{i}.{hf}.weight") for i in layers])}
        if spec.norm_type == "deepnorm":
            blocks[name]["bias"] = np.stack([take(f"model.layers.{i}.{hf}.bias") for i in layers])
    embed = take("model.embed_tokens.weight")
    head = tensors.get("lm_head.weight")
    if head is not None and not np.array_equal(np.asarray(head, np.float32), embed):
        raise ValueError("lm_head.weight differs from model.embed_tokens.weight: our models tie them")
    return {"embed": embed, "blocks": blocks, "final_norm": {"scale": take("model.norm.weight")}}
