"""The evaluation suite: masks and spans by hand, a constant-prediction oracle, the CLI's go/no-go."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_small_run_config
from flax import nnx

from genesis_jax import config as C
from genesis_jax.corpus.store import open_corpus
from genesis_jax.evaluation.metrics import go_no_go
from genesis_jax.evaluation.suite import EvalSuite

NL = ord("\n") + 4


def test_verse_mask_masks_one_whole_verse():
    ids = np.array(
        [[10, NL, 20, 21, 22, NL, 30, NL], [10, 11, NL, 20, 21, 22, 23, 24], [40, 41, 42, 43, 44, 45, 46, 47]]
    )
    m = EvalSuite.verse_mask(ids)
    assert m[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert m[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert m[2].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]


def test_spans_pair_predictions_with_references():
    pred = np.array([[4 + 97, 4 + 120, 4 + 99, 4 + 100]])
    ref = np.array([[4 + 97, 4 + 98, 4 + 99, 4 + 100]])
    mask = np.array([[False, True, True, False]])
    assert EvalSuite._spans(pred, ref, mask) == [("xc", "bc")]


@pytest.fixture(scope="module")
def suite(fixture_corpus):
    cfg = C.from_dict(
        {
            "model": {"preset": "test", "compute_dtype": "float32"},
            "data": {"seq_len": 32},
            "training": {"batch_size": 4},
            "eval": {"reconstruction_windows": 4, "val_windows": 4, "alignment_keys": 8, "embed_len": 32},
        }
    )
    from genesis_jax.training.state import init_model

    corpus = open_corpus(fixture_corpus)
    model = init_model(cfg)
    graphdef, params = nnx.split(model)
    return cfg, EvalSuite(cfg, corpus, corpus.locales, graphdef), params


def test_reconstruction_scores_a_constant_predictor_exactly(suite):
    cfg, s, params = suite
    e_id = ord("e") + 4
    s.predict = lambda p, x: jnp.full(x.shape, e_id)  # always predicts "e"
    out = s.reconstruction(params, 4)
    ids, _, _ = s._windows(4)
    mask = EvalSuite.verse_mask(ids)
    mask[:, 0] = False
    assert out["recon/verse/accuracy"] == pytest.approx(np.mean(ids[mask] == e_id))
    for kind in ("random", "span", "verse"):
        assert 0.0 <= out[f"recon/{kind}/accuracy"] <= 1.0 and out[f"recon/{kind}/cer"] >= 0.0


def test_alignment_and_cross_entropy_shapes(suite):
    cfg, s, params = suite
    s2 = EvalSuite(cfg, s.corpus, s.locales, s.graphdef)
    align = s2.alignment(params, 8)
    pairs = [k for k in align if k.startswith("align/top1/")]
    assert len(pairs) == 3 and 0.0 <= align["align/top1"] <= 1.0 and align["align/keys"] >= 2
    ce = s2.cross_entropy(params, 4)
    assert ce["val/ppl"] == pytest.approx(np.exp(ce["val/loss"])) and "gap/val_minus_train" in ce


def test_go_no_go_names_each_failed_threshold():
    cfg = C.from_dict({"eval": {"max_val_ppl": 5.0, "max_train_val_gap": 0.1, "min_alignment_acc": 0.5}})
    ok = {"val/ppl": 4.0, "gap/val_minus_train": 0.05, "align/top1": 0.6}
    assert go_no_go(ok, cfg.eval) == []
    bad = go_no_go({"val/ppl": 6.0, "gap/val_minus_train": 0.2, "align/top1": 0.1}, cfg.eval)
    assert (
        len(bad) == 3
        and "eval.max_val_ppl" in bad[0]
        and "eval.max_train_val_gap" in bad[1]
        and "eval.min_alignment_acc" in bad[2]
    )


def test_eval_cli_quick_go_and_no_go(fixture_corpus, tmp_path, capsys):
    from genesis_jax import eval as eval_cli, train

    cfg = write_small_run_config(
        tmp_path / "run.toml",
        fixture_corpus,
        max_steps=4,
        val_interval=0,
        extra="[eval]\nmax_val_ppl = 1e9\nmax_train_val_gap = 1e9\nmin_alignment_acc = 0.0\nalignment_keys = 8\n",
    )
    run = tmp_path / "run"
    assert train.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert eval_cli.main(["--run", str(run), "--suite", "quick"]) == 0
    out = capsys.readouterr().out
    assert "GO" in out and "reconstruction verse" in out and "alignment" in out
    report = json.loads((run / "reports" / "eval_4_quick.json").read_text())
    assert report["go"] and report["step"] == 4 and "val/loss/en" in report["results"]
    text = (run / "config.toml").read_text().replace("max_val_ppl = 1000000000.0", "max_val_ppl = 1.0")
    (run / "config.toml").write_text(text)
    assert eval_cli.main(["--run", str(run), "--suite", "quick"]) == 1
    assert "NO-GO: validation perplexity" in capsys.readouterr().out


def test_reconstruction_pairs_position_t_with_the_prediction_made_at_t_minus_1(suite):
    """A predictor that knows the next byte (logits at t = the byte at t + 1) must score 1.0 on
    every masked position; reading the prediction of t at t itself would score the rate of
    repeated bytes instead."""
    cfg, s, params = suite
    ids, _, _ = s._windows(4)
    cursor = [0]

    def knows_the_next_byte(p, x):
        n = x.shape[0]
        rows = ids[cursor[0] : cursor[0] + n]
        cursor[0] = (cursor[0] + n) % len(ids)
        nxt = np.concatenate([rows[:, 1:], rows[:, -1:]], axis=1)
        return jnp.asarray(nxt)

    s.predict = knows_the_next_byte
    out = s.reconstruction(params, 4)
    for kind in ("random", "span", "verse"):
        assert out[f"recon/{kind}/accuracy"] == 1.0 and out[f"recon/{kind}/cer"] == 0.0, kind
    assert np.mean(ids[:, 1:] == ids[:, :-1]) < 0.2  # so a shifted pairing could not score 1.0


def test_summary_units_against_hand_computed_values():
    from genesis_jax.data.host import ValWindows
    from genesis_jax.evaluation.suite import ce_summary

    w = ValWindows(np.zeros((3, 2)), np.zeros((3, 2)), np.array([0, 0, 1]), ["en", "fr"])
    out = ce_summary(np.array([1.0, 2.0, 3.0]), w)
    assert out["val/loss"] == 2.0 and out["val/loss/en"] == 1.5 and out["val/loss/fr"] == 3.0
    assert out["val/bpb"] == pytest.approx(2.8853900817779268)  # 2 nats / ln 2
    assert out["val/bpb/en"] == pytest.approx(2.1640425613334453)  # 1.5 / ln 2
    assert out["val/ppl"] == pytest.approx(7.38905609893065)  # e^2
    assert out["val/ppl/fr"] == pytest.approx(20.085536923187668)  # e^3


def random_text_corpus(tmp_path):
    """Every record has its own random text, so a window's bytes identify the split it came from."""
    from genesis_jax.corpus.importers import import_textdir
    from genesis_jax.corpus.store import CorpusWriter

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for loc in ("en", "fr"):
        lines = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), size=60)) for _ in range(300)]
        (src / f"{loc}.txt").write_text("\n".join(f"k{i:04d}\t{t}" for i, t in enumerate(lines)) + "\n")
    writer = CorpusWriter()
    import_textdir(writer, src)
    return writer.write(tmp_path / "corpus", val_fraction=0.2)


def test_validation_windows_come_from_the_held_out_split(tmp_path):
    """All validation windows must be held-out text, none training text."""
    from genesis_jax.training.build import build

    corpus_dir = random_text_corpus(tmp_path)
    cfg = C.from_dict(
        {
            "model": {"preset": "test", "compute_dtype": "float32"},
            "data": {"corpus": str(corpus_dir), "seq_len": 32},
            "training": {"val_windows": 8},
        }
    )
    setup = build(cfg)
    corpus = open_corpus(corpus_dir)
    held = bytes(corpus.stream(setup.locales, heldout=True)[0])
    train = bytes(corpus.stream(setup.locales, heldout=False)[0])
    w = setup.windows
    assert len(w.locale) == 16
    for inputs, labels in zip(w.inputs, w.labels):
        window = bytes((np.concatenate([inputs, labels[-1:]]) - 4).astype(np.uint8))
        assert window in held and window not in train


def test_every_gate_is_an_eval_key_and_a_missing_metric_fails_it():
    import dataclasses

    from genesis_jax.evaluation.metrics import gated_keys

    assert gated_keys() == ["max_val_ppl", "max_train_val_gap", "min_alignment_acc"]
    assert set(gated_keys()) <= {f.name for f in dataclasses.fields(C.EvalConfig)}
    assert len(go_no_go({}, C.from_dict({}).eval)) == 3


def test_eval_table_against_a_hand_written_one():
    from genesis_jax.evaluation.metrics import format_table

    results = {
        "val/loss": 1.5,
        "val/ppl": 4.4817,
        "val/bpb": 2.1640,
        "train/loss": 1.25,
        "gap/val_minus_train": 0.25,
        "val/loss/en": 1.4,
        "val/loss/fr": 1.6,
        "recon/random/accuracy": 0.5,
        "recon/random/cer": 0.75,
        "recon/random/masked_fraction": 0.15,
        "align/top1": 0.125,
        "align/chance": 0.125,
        "align/keys": 8.0,
    }
    assert format_table(results, ["en", "fr"]).splitlines() == [
        "validation             loss 1.5000  perplexity 4.482  bits/byte 2.164  train loss 1.2500",
        "  validation loss by locale: en 1.400  fr 1.600",
        "train/validation       gap +0.2500",
        "reconstruction random  accuracy 0.500  CER 0.750  masked 15.0%",
        "alignment              top-1 0.125  chance 0.125  keys 8",
    ]


def test_the_evaluation_suite_reads_each_split_where_it_should(tmp_path):
    """Held-out cross-entropy on held-out windows and the training figure on training windows
    (each equal to the mean loss of windows cut by hand from its split), reconstruction windows
    from held-out text only, and alignment on held-out verses only."""
    from genesis_jax.data.host import val_windows
    from genesis_jax.model.loss import make_eval_step
    from genesis_jax.training.build import build

    corpus_dir = random_text_corpus(tmp_path)
    cfg = C.from_dict(
        {
            "model": {"preset": "test", "compute_dtype": "float32"},
            "data": {"corpus": str(corpus_dir), "seq_len": 32},
            "training": {"batch_size": 4},
            "eval": {"alignment_keys": 6},
        }
    )
    setup = build(cfg)
    corpus = open_corpus(corpus_dir)
    suite = EvalSuite(cfg, corpus, setup.locales, setup.graphdef)
    params = setup.state.params
    ce = make_eval_step(setup.graphdef)
    out = suite.cross_entropy(params, 4)
    for split, name in ((True, "val/loss"), (False, "train/loss")):
        tokens, _, starts = corpus.stream(setup.locales, heldout=split)
        w = val_windows(tokens, starts, setup.locales, 32, 4)
        assert out[name] == pytest.approx(
            float(np.mean(ce(params, jnp.asarray(w.inputs), jnp.asarray(w.labels)))), rel=1e-5
        )
    held = bytes(corpus.stream(setup.locales, heldout=True)[0])
    train = bytes(corpus.stream(setup.locales, heldout=False)[0])
    ids, _, _ = suite._windows(4)
    assert len(ids) == 8
    for window in ids:
        text = bytes((window - 4).astype(np.uint8))
        assert text in held and text not in train
    held_texts = {corpus.record_text(i) for i in np.flatnonzero(corpus.records["heldout"] == 1)}
    seen = []
    suite.embed = lambda p, texts: (seen.extend(texts), np.random.default_rng(len(seen)).normal(size=(len(texts), 4)))[
        1
    ]
    assert suite.alignment(params, 6)["align/keys"] == 6.0
    assert len(seen) == 12 and all(t.decode() in held_texts for t in seen)
