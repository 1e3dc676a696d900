"""Models leave the engine: `python -m genesis_jax.export` writes a Hugging Face model directory
that transformers loads, and `train --init-from` starts a run from one.

References: a float64 NumPy forward written from transformers' Llama conventions (rotate-half
RoPE, [out, in] weights, config.json's norms), and transformers itself where it is installed
(with torch: `pip install torch==2.13.0 transformers`; with GENESIS_REQUIRE_TRANSFORMERS=1 their absence fails)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE_TEXT

from genesis_jax import export, train
from genesis_jax.core.compat import module_available
from genesis_jax.core.tokenizer import encode
from genesis_jax.model.decoding import generate
from genesis_jax.training.rundir import load_run

pytestmark = pytest.mark.slow

# Real multilingual text, with special-token spellings and control bytes typed into it.
TEXT = " ".join(v for loc in FIXTURE_TEXT.values() for v in loc[:2]) + " <s> </s>\tend"
PROMPTS = ["In the beginning", "Au commencement", "В начале"]
STEPS = 300  # enough for greedy text that is not one repeated byte


def require_transformers() -> None:
    missing = [m for m in ("torch", "transformers") if not module_available(m)]
    if missing:
        why = f"needs {' and '.join(missing)}: pip install torch==2.13.0 transformers"
        if os.environ.get("GENESIS_REQUIRE_TRANSFORMERS") == "1":
            pytest.fail(f"GENESIS_REQUIRE_TRANSFORMERS=1, but the transformers round trip {why}")
        pytest.skip(why)


def run_config(path: Path, corpus: Path, norm: str, extra: str = "") -> Path:
    path.write_text(
        f'[model]\npreset = "test"\ncompute_dtype = "float32"\nnorm_type = "{norm}"\nn_kv_heads = 2\n'
        f'[data]\ncorpus = "{corpus}"\nseq_len = 32\n'
        f"[training]\nmax_steps = {STEPS}\nbatch_size = 8\nlog_interval = 50\nval_interval = 100\n"
        f"[optim]\nlr = 0.01\nwarmup_steps = 5\n{extra}"
    )
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fixture_corpus) -> dict[str, Path]:
    """A short run of each norm type (GQA 4 query / 2 key-value heads), trained in this process."""
    base = tmp_path_factory.mktemp("hf_runs")
    out = {}
    for norm in ("rmsnorm", "deepnorm"):
        cfg = run_config(base / f"{norm}.toml", fixture_corpus, norm)
        assert train.main(["--config", str(cfg), "--run-dir", str(base / norm)]) == 0
        out[norm] = base / norm
    return out


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf_exports")
    for norm, run in runs.items():
        assert export.main(["--run", str(run), "--out", str(base / norm)]) == 0
    return {norm: base / norm for norm in runs}


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    out = {}
    for name in files:
        out.update(load_file(str(directory / name)))
    return out


def hf_numpy_logits(t: dict[str, np.ndarray], hf: dict, ids: np.ndarray) -> np.ndarray:
    """transformers' LlamaForCausalLM (and the deepnorm variant our modeling file defines) in
    float64 NumPy, from the exported tensors and config.json: rotate-half RoPE over the two
    halves of each head, grouped-query heads, causal softmax of q.k / sqrt(head_dim), SwiGLU,
    the norms config.json names, the output layer tied to the embedding."""
    w = lambda k: t[k].astype(np.float64)  # noqa: E731
    nh, nkv, hd = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    n = len(ids)
    ang = np.arange(n)[:, None] * hf["rope_parameters"]["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]

    def rope(v):  # [n, heads, hd]
        return v * cos + np.concatenate([-v[..., hd // 2 :], v[..., : hd // 2]], -1) * sin

    def rms(h, scale, eps):
        return h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * scale

    def layer_norm(h, scale, bias, eps):
        mu = h.mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias

    x = w("model.embed_tokens.weight")[ids]
    causal = np.tril(np.ones((n, n), bool))
    for i in range(hf["num_hidden_layers"]):
        lw = lambda name: w(f"model.layers.{i}.{name}")  # noqa: E731

        def attend(h):
            q = rope((h @ lw("self_attn.q_proj.weight").T).reshape(n, nh, hd))
            k = rope((h @ lw("self_attn.k_proj.weight").T).reshape(n, nkv, hd))
            v = (h @ lw("self_attn.v_proj.weight").T).reshape(n, nkv, hd)
            out = np.empty((n, nh, hd))
            for head in range(nh):
                kv = head // (nh // nkv)
                s = np.where(causal, q[:, head] @ k[:, kv].T / np.sqrt(hd), -np.inf)
                a = np.exp(s - s.max(-1, keepdims=True))
                out[:, head] = (a / a.sum(-1, keepdims=True)) @ v[:, kv]
            return out.reshape(n, nh * hd) @ lw("self_attn.o_proj.weight").T

        def mlp(h):
            g = h @ lw("mlp.gate_proj.weight").T
            return (g / (1 + np.exp(-g)) * (h @ lw("mlp.up_proj.weight").T)) @ lw("mlp.down_proj.weight").T

        if hf["model_type"] == "genesis_deepnorm":
            a, eps = hf["deepnorm_alpha"], hf["layer_norm_eps"]
            x = layer_norm(a * x + attend(x), lw("input_layernorm.weight"), lw("input_layernorm.bias"), eps)
            x = layer_norm(
                a * x + mlp(x), lw("post_attention_layernorm.weight"), lw("post_attention_layernorm.bias"), eps
            )
        else:
            eps = hf["rms_norm_eps"]
            x = x + attend(rms(x, lw("input_layernorm.weight"), eps))
            x = x + mlp(rms(x, lw("post_attention_layernorm.weight"), eps))
    return rms(x, w("model.norm.weight"), hf["rms_norm_eps"]) @ w("model.embed_tokens.weight").T


def our_logits(run: Path, ids: np.ndarray) -> np.ndarray:
    return np.asarray(load_run(run).model(ids[None]))[0]


@pytest.mark.parametrize("norm", ["rmsnorm", "deepnorm"])
def test_exported_weights_give_our_logits_under_transformers_conventions(runs, exports, norm):
    ids = encode(TEXT)
    hf = json.loads((exports[norm] / "config.json").read_text())
    want = our_logits(runs[norm], ids)
    got = hf_numpy_logits(read_tensors(exports[norm]), hf, ids)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(want).max() > 1.0  # trained: the comparison is not between near-zero logits


def test_the_export_directory(runs, exports):
    out = exports["rmsnorm"]
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
        "genesis_export.json",
    } == names
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"] and hf["vocab_size"] == 260
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_key_value_heads"]) == (
        32,
        2,
        4,
        2,
    )
    assert hf["rope_theta"] == hf["rope_parameters"]["rope_theta"] == 10000.0 and hf["tie_word_embeddings"] is True
    tensors = read_tensors(out)
    assert "lm_head.weight" not in tensors and all(t.dtype == np.float32 for t in tensors.values())
    assert len(tensors) == 2 + 2 * 9  # embedding, final norm; per layer 7 projections and 2 norms
    card = (out / "README.md").read_text()
    run = load_run(runs["rmsnorm"])
    assert f"step {STEPS}" in card and run.meta["corpus_sha256"] in card and 'norm_type = "rmsnorm"' in card
    assert "Validation loss: " in card and f"at step {STEPS}" in card
    assert "Multi-task heads" not in card
    deep = exports["deepnorm"]
    assert (deep / "modeling_genesis_deepnorm.py").is_file()
    hf = json.loads((deep / "config.json").read_text())
    assert hf["model_type"] == "genesis_deepnorm" and "AutoModelForCausalLM" in hf["auto_map"]
    assert "trust_remote_code=True" in (deep / "README.md").read_text()


def test_a_multitask_run_exports_its_language_model(fixture_corpus, tmp_path):
    cfg = run_config(
        tmp_path / "mtl.toml",
        fixture_corpus,
        "rmsnorm",
        "[mtl]\nenabled = true\nhead_dim = 16\nmax_len = 32\ncross_ref_min_distance = 20\n",
    )
    assert train.main(["--config", str(cfg), "--run-dir", str(tmp_path / "run"), "--set", "training.max_steps=2"]) == 0
    assert export.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert "Multi-task heads" in (tmp_path / "out" / "README.md").read_text()
    tensors = read_tensors(tmp_path / "out")
    assert len(tensors) == 2 + 2 * 9 and not any("head" in k for k in tensors)
    ids = encode(TEXT)
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert np.abs(hf_numpy_logits(tensors, hf, ids) - our_logits(tmp_path / "run", ids)).max() < 1e-4


def test_shards_with_an_index_and_bfloat16(runs, exports, tmp_path):
    whole = read_tensors(exports["rmsnorm"])
    out = tmp_path / "sharded"
    assert export.main(["--run", str(runs["rmsnorm"]), "--out", str(out), "--max-shard-size", "20KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    for shard in shards:  # at most the limit, or one tensor larger than it alone
        held = [whole[t].nbytes for t, s in index["weight_map"].items() if s == shard]
        assert sum(held) <= 20_000 or len(held) == 1, (shard, held)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in whole.values())
    got = read_tensors(out)
    assert got.keys() == whole.keys() and all(np.array_equal(got[k], whole[k]) for k in whole)

    from safetensors import safe_open

    bf16 = tmp_path / "bf16"
    assert export.main(["--run", str(runs["rmsnorm"]), "--out", str(bf16), "--dtype", "bfloat16"]) == 0
    with safe_open(str(bf16 / "model.safetensors"), framework="flax") as f:
        t = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    assert {str(x.dtype) for x in t.values()} == {"bfloat16"}
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for k, x in whole.items():  # round to nearest even, as bfloat16 casts do
        np.testing.assert_array_equal(t[k].astype(np.float32), x.astype(t[k].dtype).astype(np.float32))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_and_writes_nothing(runs, exports, tmp_path, capsys):
    run = str(runs["rmsnorm"])
    cases = [
        (["--run", str(tmp_path), "--out", str(tmp_path / "a")], "not a run directory"),
        (["--run", run, "--out", str(tmp_path / "a"), "--step", "7"], "--step 7: no such checkpoint"),
        (["--run", run, "--out", str(tmp_path / "a"), "--max-shard-size", "lots"], "--max-shard-size 'lots'"),
    ]
    (tmp_path / "file").write_text("x")
    cases.append((["--run", run, "--out", str(tmp_path / "file")], "exists and is not a directory"))
    for args, message in cases:
        assert export.main(args) == 2
        assert message in one_line_error(capsys)
    assert not (tmp_path / "a").exists()
    # A directory of other files is refused; with --force the export goes beside them, untouched.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert export.main(["--run", run, "--out", str(other)]) == 2
    assert "holds files this export did not write (notes.txt)" in one_line_error(capsys)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert export.main(["--run", run, "--out", str(other), "--force", "--max-shard-size", "20KB"]) == 0
    assert (other / "notes.txt").read_text() == "mine" and (other / "model.safetensors.index.json").is_file()
    # Exporting again replaces what the earlier export wrote (its shards too), and nothing else.
    assert export.main(["--run", run, "--out", str(other), "--force"]) == 0
    names = sorted(p.name for p in other.iterdir())
    assert names == sorted({p.name for p in exports["rmsnorm"].iterdir()} | {"notes.txt"})
    # A manifest naming a file elsewhere (edited, or not ours) reaches nothing outside --out.
    (tmp_path / "victim.txt").write_text("keep")
    (other / "genesis_export.json").write_text(json.dumps({"files": ["../victim.txt"]}))
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    assert export.main(["--run", run, "--out", str(other), "--force"]) == 2  # its files are no longer known as ours
    assert "would replace files this export did not write" in one_line_error(capsys)
    assert (tmp_path / "victim.txt").read_text() == "keep" and {
        p.name: p.read_bytes() for p in other.iterdir()
    } == before
    # Re-exporting into an export's own directory needs no --force.
    assert export.main(["--run", run, "--out", str(exports["rmsnorm"])]) == 0
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]


def test_a_failure_while_writing_leaves_nothing(runs, tmp_path, monkeypatch, capsys):
    from genesis_jax.hf import files

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(files, "write_tokenizer", full)
    assert export.main(["--run", str(runs["rmsnorm"]), "--out", str(tmp_path / "out")]) == 2
    assert "No space left on device" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_init_from_an_export_starts_where_it_ended(runs, exports, fixture_corpus, tmp_path, capsys):
    """A new run from the export, trained one step at a learning rate too small to move any
    weight: its checkpoint generates the bytes the exported run generates. Its config records
    the source; its optimizer starts fresh (step 1 after one update)."""
    cfg = run_config(tmp_path / "b.toml", fixture_corpus, "rmsnorm")
    run_b = tmp_path / "b"
    assert (
        train.main(
            [
                "--config",
                str(cfg),
                "--run-dir",
                str(run_b),
                "--init-from",
                str(exports["rmsnorm"]),
                "--set",
                "training.max_steps=1",
                "--set",
                "optim.lr=1e-30",
                "--set",
                "optim.weight_decay=0",
            ]
        )
        == 0
    )
    assert f"starting from the weights in {exports['rmsnorm']}" in capsys.readouterr().err
    assert f'init_from = "{exports["rmsnorm"]}"' in (run_b / "config.toml").read_text()
    a, b = load_run(runs["rmsnorm"]), load_run(run_b)
    assert b.step == 1
    for prompt in PROMPTS:
        p = prompt.encode()
        assert generate(b.model, p, max_tokens=24, temperature=0.0) == generate(
            a.model, p, max_tokens=24, temperature=0.0
        )


def test_init_from_checks_the_config_first(exports, fixture_corpus, tmp_path, capsys):
    cases = [
        ("rmsnorm", ["--set", "model.dim=64"], "hidden_size is 32, model.dim is 64"),
        ("deepnorm", [], "model_type 'genesis_deepnorm' is a deepnorm model, model.norm_type is 'rmsnorm'"),
        ("rmsnorm", ["--set", "model.rope_base=500"], "rope_theta is 10000.0, model.rope_base is 500.0"),
        ("missing", [], "not a directory"),
    ]
    for i, (source, sets, message) in enumerate(cases):
        cfg = run_config(tmp_path / f"{i}.toml", fixture_corpus, "rmsnorm")
        src = exports.get(source, tmp_path / source)
        assert (
            train.main(["--config", str(cfg), "--run-dir", str(tmp_path / f"r{i}"), "--init-from", str(src), *sets])
            == 2
        )
        assert message in one_line_error(capsys)
        ckpts = tmp_path / f"r{i}" / "checkpoints"
        assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())  # nothing trained
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({**json.loads((exports["rmsnorm"] / "config.json").read_text())}))
    cfg = run_config(tmp_path / "b.toml", fixture_corpus, "rmsnorm")
    assert train.main(["--config", str(cfg), "--run-dir", str(tmp_path / "rb"), "--init-from", str(broken)]) == 2
    assert "no model.safetensors" in one_line_error(capsys)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert train.main(["--config", str(cfg), "--run-dir", str(tmp_path / "rc"), "--init-from", str(broken)]) == 2
    assert "not a readable safetensors file" in one_line_error(capsys)


# -- transformers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_models(exports):
    require_transformers()
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    remote = {"trust_remote_code": True}  # deepnorm's own modeling file (the rmsnorm export has none to trust)
    return {
        norm: (
            AutoModelForCausalLM.from_pretrained(str(d), **remote).eval(),
            AutoTokenizer.from_pretrained(str(d), **remote),
        )
        for norm, d in exports.items()
    }


@pytest.mark.parametrize("norm", ["rmsnorm", "deepnorm"])
def test_transformers_gives_our_logits_tokens_and_greedy_bytes(runs, hf_models, norm):
    import torch

    model, tokenizer = hf_models[norm]
    assert type(model).__name__ == ("LlamaForCausalLM" if norm == "rmsnorm" else "GenesisDeepnormForCausalLM")
    ids = encode(TEXT)
    assert tokenizer(TEXT)["input_ids"] == ids.tolist()  # "<s>" typed stays its bytes; no BOS or EOS added
    assert tokenizer.decode(ids.tolist()) == TEXT
    with torch.no_grad():
        got = model(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()
    assert np.abs(got - our_logits(runs[norm], ids)).max() < 1e-4
    ours = load_run(runs[norm]).model
    for prompt in PROMPTS:
        p = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(p, max_new_tokens=24, do_sample=False)[0, p.shape[1] :].tolist()
        want = generate(ours, prompt.encode(), max_tokens=24, temperature=0.0)
        assert bytes(i - 4 for i in out) == want[0], prompt


def test_a_directory_transformers_saved_reads_back_the_same(runs, exports, hf_models, tmp_path):
    """`save_pretrained` of the loaded export is "any Llama directory": it reads back to the very
    parameters the export was made from."""
    from genesis_jax.hf.pretrained import read_pretrained

    model, _ = hf_models["rmsnorm"]
    model.save_pretrained(str(tmp_path / "saved"))
    cfg = load_run(runs["rmsnorm"]).cfg
    a, b = read_pretrained(exports["rmsnorm"], cfg.model), read_pretrained(tmp_path / "saved", cfg.model)

    def flat(t: dict, p: str = "") -> dict:
        return {
            k2: v2
            for k, v in t.items()
            for k2, v2 in (flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(p + k, v)])
        }

    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
