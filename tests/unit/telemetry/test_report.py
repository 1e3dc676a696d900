"""Run plots from a run directory's SQLite logs."""

from conftest import one_error_line, write_small_run_config

from genesis_jax import report, train
from genesis_jax.training import hooks


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


def test_report_snapshots_during_training(fixture_corpus, tmp_path, capsys, monkeypatch):
    """logging.report_interval: the plots at every multiple and at the last step; a snapshot that
    cannot be written is one warning line and training goes on; without matplotlib, refused."""
    cfg = write_small_run_config(
        tmp_path / "run.toml", fixture_corpus, max_steps=25, val_interval=10, extra="[logging]\nreport_interval = 10\n"
    )
    taken = []
    real = hooks.plot_run
    monkeypatch.setattr(hooks, "plot_run", lambda run_dir: taken.append(run_dir) or real(run_dir))
    run = tmp_path / "run"
    assert train.main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    assert taken == [run] * 3  # steps 10, 20 and the last, 25
    for name in ("training.png", "locales.png", "evaluation.png"):
        assert (run / "reports" / name).read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "reports").write_text("a file where the plots would go")
    assert train.main(["--config", str(cfg), "--run-dir", str(blocked), "--set", "training.max_steps=10"]) == 0
    err = capsys.readouterr().err
    assert "warning: report snapshot at step 10 not written" in err and "training goes on" in err
    monkeypatch.setattr(hooks, "module_available", lambda name: False)
    assert train.main(["--config", str(cfg), "--run-dir", str(tmp_path / "r3")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: logging.report_interval = 10: report snapshots need matplotlib")
