import os, subprocess, sys, socket, time, signal
from pathlib import Path
sys.path.insert(0, "/src/tests")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from conftest import write_textdir, write_small_run_config
from genesis_jax.corpus.importers import import_textdir
from genesis_jax.corpus.store import CorpusWriter
base = Path(sys.argv[1]); base.mkdir(parents=True, exist_ok=True)
steps = int(sys.argv[2]); mode = sys.argv[3] if len(sys.argv) > 3 else "plain"
w = CorpusWriter(); import_textdir(w, write_textdir(base / "src"))
corpus = base / "corpus" if (base / "corpus").exists() else w.write(base / "corpus", val_fraction=0.1, split_seed=0)
cfg = write_small_run_config(base / "run.toml", corpus, steps, 10)
def port():
    with socket.socket() as s:
        s.bind(("localhost", 0)); return s.getsockname()[1]
env = {**os.environ, "PYTHONFAULTHANDLER": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": "/src", "XLA_FLAGS": "--xla_force_host_platform_device_count=" + os.environ.get("NDEV", "2")}
def launch(p):
    return [subprocess.Popen([sys.executable, "-m", "genesis_jax.train", "--config", str(cfg), "--run-dir", str(base / "run"),
            "--set", "checkpoint.save_interval=20", "--set", "logging.tensorboard=false", *[a for kv in os.environ.get("SETS", "").split() for a in ("--set", kv)], "--coordinator", f"localhost:{p}",
            "--num-processes", "2", "--heartbeat-timeout", "10", "--process-id", str(i)], env=env, cwd="/src",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 0)]
procs = launch(port())
if mode == "kill":
    import sqlite3
    while procs[1].poll() is None:
        try:
            rows = sqlite3.connect(base / "run" / "metrics.sqlite").execute("SELECT max(step) FROM training_logs").fetchall()
        except Exception:
            rows = [(None,)]
        if rows[0][0] is not None and rows[0][0] >= 25:
            break
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGKILL)
    t = time.time(); procs[1].wait(timeout=120); print("peer exit", procs[1].returncode, round(time.time() - t, 1))
    procs[0].wait()
    print(procs[1].stderr.read()[-1500:])
    procs = launch(port())
if mode == "term":
    time.sleep(float(sys.argv[4])); procs[0].send_signal(signal.SIGTERM)
deadline = time.time() + 120
while time.time() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.5)
for p in procs:
    if p.poll() is None:
        p.send_signal(signal.SIGABRT)
for i, p in enumerate(procs):
    out, err = p.communicate(timeout=300)
    print(f"== process {1 - i}: rc {p.returncode}\n{err[-6000:]}")
