"""Run plots from a run directory's SQLite logs."""

from conftest import write_small_run_config

from genesis_jax import report, train


def test_report_writes_pngs(fixture_corpus, tmp_path, capsys):
    cfg = write_small_run_config(
        tmp_path / "run.toml",
        fixture_corpus,
        max_steps=30,
        val_interval=10,
        extra="[curriculum]\nwwm_trigger_steps = 4\nwwm_window = 4\nwwm_threshold = 1.0\nwwm_ramp_steps = 4\n"
        "plateau_lr_patience = 5\nplateau_min_delta = 0.5\n",
    )
    run = tmp_path / "run"
    assert train.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert report.main(["--run", str(run)]) == 0
    for name in ("training.png", "locales.png", "evaluation.png"):
        data = (run / "reports" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert report.main(["--run", str(tmp_path / "missing")]) == 2
    assert "no metrics.sqlite" in capsys.readouterr().err
