"""Independent float64 NumPy references the tests compare the engine with, written from the
definitions (never from the code under test)."""

from __future__ import annotations

import numpy as np


def np_llama_logits(m, cfg, tokens):
    """The whole decoder in float64 NumPy from its parameters, written from the definitions:
    interleaved-pair RoPE with the configured base on queries and keys, grouped-query heads
    (query head h reads key/value head h // (n_heads / n_kv_heads)), causal softmax of q.k /
    sqrt(head_dim), SwiGLU silu(x w1) * (x w3) w2, pre-norm RMSNorm or post-norm DeepNet,
    a final RMSNorm and the tied embedding as output layer."""
    mc = cfg.model
    p = lambda a: np.asarray(a, np.float64)  # noqa: E731
    nh, nkv, hd, n = mc.n_heads, mc.n_kv_heads, mc.head_dim, mc.n_layers
    b, length = tokens.shape
    embed = p(m.embed[...])
    x = embed[tokens]
    pos = np.arange(length)[:, None] * mc.rope_base ** (-np.arange(0, hd, 2) / hd)  # [L, hd/2]

    def rotate(t):  # [b, L, heads, hd]
        even, odd = t[..., 0::2], t[..., 1::2]
        c, s = np.cos(pos)[None, :, None], np.sin(pos)[None, :, None]
        out = np.empty_like(t)
        out[..., 0::2], out[..., 1::2] = even * c - odd * s, even * s + odd * c
        return out

    def rms(h, scale):
        return h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6) * scale

    def layer_norm(h, scale, bias):
        mu = h.mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * scale + bias

    for i in range(n):
        w = {name: p(getattr(m.blocks.attn, name).kernel[...][i]) for name in ("wq", "wk", "wv", "wo")}
        f = {name: p(getattr(m.blocks.mlp, name).kernel[...][i]) for name in ("w1", "w2", "w3")}

        def attend(h):
            q = rotate((h @ w["wq"]).reshape(b, length, nh, hd))
            k = rotate((h @ w["wk"]).reshape(b, length, nkv, hd))
            v = (h @ w["wv"]).reshape(b, length, nkv, hd)
            out = np.zeros_like(q)
            for head in range(nh):
                kv = head // (nh // nkv)
                s = np.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv]) / np.sqrt(hd)
                s = np.where(np.tril(np.ones((length, length), bool)), s, -np.inf)
                a = np.exp(s - s.max(-1, keepdims=True))
                out[:, :, head] = np.einsum("bqk,bkd->bqd", a / a.sum(-1, keepdims=True), v[:, :, kv])
            return out.reshape(b, length, nh * hd) @ w["wo"]

        def ffn(h):
            g = h @ f["w1"]
            return (g / (1 + np.exp(-g)) * (h @ f["w3"])) @ f["w2"]

        s1, s2 = p(m.blocks.norm1.scale[...][i]), p(m.blocks.norm2.scale[...][i])
        if mc.norm_type == "deepnorm":
            alpha = (2 * n) ** 0.25
            b1, b2 = p(m.blocks.norm1.bias[...][i]), p(m.blocks.norm2.bias[...][i])
            x = layer_norm(alpha * x + attend(x), s1, b1)
            x = layer_norm(alpha * x + ffn(x), s2, b2)
        else:
            x = x + attend(rms(x, s1))
            x = x + ffn(rms(x, s2))
    return rms(x, p(m.final_norm.scale[...])) @ embed.T
