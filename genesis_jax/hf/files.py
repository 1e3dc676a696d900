"""The files of a Hugging Face model directory: safetensors weights (sharded with an index above
a size limit), config.json, generation_config.json and the byte tokenizer's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config.schema import ModelSpec
from ..core.errors import UserError
from ..core.tokenizer import BOS_ID, BYTE_OFFSET, EOS_ID, PAD_ID, UNK_ID, VOCAB_SIZE
from ..model.llama import deepnorm_alpha
from ..model.norms import LAYER_NORM_EPS, RMS_EPS

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SPECIALS = {"<pad>": PAD_ID, "<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID}
DEEPNORM_TYPE = "genesis_deepnorm"
REMOTE_CODE = "modeling_genesis_deepnorm.py"  # travels with a deepnorm export (genesis_jax/hf/remote)


def need(module: str) -> Any:
    """Import one of the libraries the Hugging Face layout needs (dependencies of genesis-jax,
    absent where it runs from a checkout with nothing installed), or say in one line how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        name = module.split(".")[0]
        raise UserError(f"the Hugging Face layout needs the `{name}` package: pip install {name}") from None


# -- weights -----------------------------------------------------------------------------------


def write_weights(tensors: dict[str, np.ndarray], out: Path, max_shard_bytes: int) -> list[str]:
    """Write the tensors as one safetensors file, or as shards in name order with an index when
    they exceed `max_shard_bytes` (a single tensor larger than the limit gets a shard of its own)."""
    numpy_io = need("safetensors.numpy")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        numpy_io.save_file(shards[0], str(out / WEIGHTS), metadata=meta)
        return [WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        numpy_io.save_file(shard, str(out / name), metadata=meta)
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": {t: name for name, shard in zip(names, shards) for t in shard},
    }
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, INDEX]


def read_weights(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory (one file or an index of shards) as float32 NumPy."""
    safetensors = need("safetensors")
    if (directory / INDEX).is_file():
        try:
            files = sorted(set(json.loads((directory / INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{directory / INDEX}: not an index of shards ({e})") from None
    elif (directory / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise UserError(f"{directory}: no {WEIGHTS} or {INDEX}")
    out: dict[str, np.ndarray] = {}
    for name in files:
        # The flax reader, since NumPy has no bfloat16 of its own.
        try:
            with safetensors.safe_open(str(directory / name), framework="flax") as f:
                for key in f.keys():
                    out[key] = np.asarray(f.get_tensor(key), np.float32)
        except safetensors.SafetensorError as e:
            raise UserError(f"{directory / name}: not a readable safetensors file ({e})") from None
    return out


# -- config --------------------------------------------------------------------------------------


def hf_config(m: ModelSpec, max_positions: int, dtype: str) -> dict[str, Any]:
    """config.json: a LlamaForCausalLM for rmsnorm models, our remote-code class for deepnorm.
    `max_positions`: the window the model was trained on (data.seq_len)."""
    c: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": m.dim,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": RMS_EPS,
        # rope_parameters for transformers >= 5, rope_theta for older releases
        "rope_theta": m.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_base},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "initializer_range": m.embed_init_std,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if m.norm_type == "deepnorm":
        module = REMOTE_CODE.removesuffix(".py")
        c.update(
            architectures=["GenesisDeepnormForCausalLM"],
            model_type=DEEPNORM_TYPE,
            deepnorm_alpha=deepnorm_alpha(m.n_layers),
            layer_norm_eps=LAYER_NORM_EPS,
            auto_map={
                "AutoConfig": f"{module}.GenesisDeepnormConfig",
                "AutoModelForCausalLM": f"{module}.GenesisDeepnormForCausalLM",
            },
        )
    return c


def generation_config() -> dict[str, Any]:
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


def check_compatible(hf: dict[str, Any], spec: ModelSpec, where: Path) -> None:
    """Every shape and the norm type of a model directory against `[model]`, one line naming
    the first mismatch."""
    norm = (
        "deepnorm" if hf.get("model_type") == DEEPNORM_TYPE else "rmsnorm" if hf.get("model_type") == "llama" else None
    )
    if norm is None:
        raise UserError(f"{where}: model_type {hf.get('model_type')!r} is not a Llama (llama or {DEEPNORM_TYPE})")
    if norm != spec.norm_type:
        raise UserError(
            f"{where}: model_type {hf['model_type']!r} is a {norm} model, model.norm_type is {spec.norm_type!r}"
        )
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta"))
    pairs = [
        ("vocab_size", hf.get("vocab_size"), "the byte vocabulary", VOCAB_SIZE),
        ("hidden_size", hf.get("hidden_size"), "model.dim", spec.dim),
        ("num_hidden_layers", hf.get("num_hidden_layers"), "model.n_layers", spec.n_layers),
        ("num_attention_heads", hf.get("num_attention_heads"), "model.n_heads", spec.n_heads),
        (
            "num_key_value_heads",
            hf.get("num_key_value_heads", hf.get("num_attention_heads")),
            "model.n_kv_heads",
            spec.n_kv_heads,
        ),
        ("intermediate_size", hf.get("intermediate_size"), "model.intermediate_size", spec.intermediate_size),
        ("head_dim", hf.get("head_dim", spec.head_dim), "model.dim / model.n_heads", spec.head_dim),
        ("rope_theta", theta, "model.rope_base", spec.rope_base),
        ("hidden_act", hf.get("hidden_act", "silu"), "our SwiGLU", "silu"),
        ("attention_bias", bool(hf.get("attention_bias", False)), "our bias-free attention", False),
        ("mlp_bias", bool(hf.get("mlp_bias", False)), "our bias-free MLP", False),
    ]
    if norm == "rmsnorm":
        pairs.append(("rms_norm_eps", hf.get("rms_norm_eps"), "our RMSNorm", RMS_EPS))
    for key, theirs, ours_name, ours in pairs:
        if theirs != ours and not (
            isinstance(theirs, float | int)
            and isinstance(ours, float | int)
            and np.isclose(float(theirs), float(ours), rtol=1e-9, atol=0)
        ):
            raise UserError(f"{where}: {key} is {theirs!r}, {ours_name} is {ours!r}")


# -- tokenizer ------------------------------------------------------------------------------------


def byte_alphabet() -> list[str]:
    """The printable character GPT-2's byte-level tokenizers use for each byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tokenizer(out: Path, seq_len: int) -> list[str]:
    """tokenizer.json (a BPE without merges over the byte alphabet: one token per byte, id
    byte + 4; no BOS/EOS added, as in training), tokenizer_config.json, special_tokens_map.json."""
    tk = need("tokenizers")
    vocab = {**SPECIALS, **{ch: b + BYTE_OFFSET for b, ch in enumerate(byte_alphabet())}}
    tokenizer = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer.save(str(out / "tokenizer.json"))
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "add_bos_token": False,
        "add_eos_token": False,
        # "<s>" typed in a text stays its bytes, as our tokenizer reads it
        "split_special_tokens": True,
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n", encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
