import os, subprocess, sys
from pathlib import Path
sys.path.insert(0, "/src/tests")
from conftest import write_textdir, write_small_run_config
from genesis_jax.corpus.importers import import_textdir
from genesis_jax.corpus.store import CorpusWriter
base = Path(sys.argv[1]); base.mkdir(parents=True, exist_ok=True)
w = CorpusWriter(); import_textdir(w, write_textdir(base / "src"))
corpus = w.write(base / "corpus", val_fraction=0.1, split_seed=0)
cfg = write_small_run_config(base / "run.toml", corpus, 10, 10)
env = {**os.environ, "PYTHONFAULTHANDLER": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": "/src",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=" + os.environ.get("NDEV", "2") + " " + os.environ.get("XF", "")}
sets = [a for kv in os.environ.get("SETS", "").split() for a in ("--set", kv)]
r = subprocess.run([sys.executable, "-m", "genesis_jax.train", "--config", str(cfg), "--run-dir", str(base / "run"), *sets],
                   env=env, cwd="/src", capture_output=True, text=True)
print("rc", r.returncode, r.stderr[-1500:])
