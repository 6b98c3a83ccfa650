"""`fastgpt validate --model gpt2` against a hub that accepts connections and never answers (a firewall that
swallows packets, a dead proxy) fails within a bound, naming the model and the local-directory way out.
Never touches the real network: HF_ENDPOINT points at a local socket and the HF cache is empty."""
import os
import socket
import subprocess
import sys
import threading
import time


class SilentHub:
    """A socket that accepts connections and never answers; env: a process environment pointed at it."""

    def __init__(self, tmp_path):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(16)
        self.held, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self.accept, daemon=True)
        self.env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("HF_")}
        self.env.update(HF_ENDPOINT=f"http://127.0.0.1:{self.srv.getsockname()[1]}", HF_HOME=str(tmp_path / "hf"),
                        NO_PROXY="127.0.0.1", HF_HUB_DISABLE_TELEMETRY="1")

    def accept(self):
        self.srv.settimeout(0.2)
        while not self.stop.is_set():
            try:
                self.held.append(self.srv.accept()[0])
            except OSError:
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        for c in self.held:
            c.close()
        self.srv.close()


def test_a_cached_model_is_used_when_the_hub_is_silent(tmp_path):
    """The bounded revision ask gives up, and the copy in the HF cache (refs/main -> snapshot) is used, as
    snapshot_download itself does offline."""
    snap = tmp_path / "hf" / "hub" / "models--openai-community--gpt2"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("a" * 40)
    (snap / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (snap / "snapshots" / ("a" * 40) / "config.json").write_text("{}")
    with SilentHub(tmp_path) as hub:
        r = subprocess.run([sys.executable, "-c", "from fastgpt.hf import _resolve; print(_resolve('gpt2'))"],
                           env=hub.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str(snap / "snapshots" / ("a" * 40)), r.stderr[-2000:]


def test_validate_fails_fast_on_a_silent_hub(tmp_path):
    t0 = time.monotonic()
    with SilentHub(tmp_path) as hub:
        r = subprocess.run([sys.executable, "-m", "fastgpt", "validate", "--model", "gpt2", "--device", "cpu"],
                           env=hub.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert took < 60, f"took {took:.0f} s: {out[-2000:]}"
    assert "'gpt2'" in out and hub.env["HF_ENDPOINT"] in out and "local directory" in out, out[-2000:]
