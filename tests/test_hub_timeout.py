"""`fastgpt validate --model gpt2` against a hub that accepts connections and never answers (a firewall that
swallows packets, a dead proxy) fails within a bound, naming the model and the local-directory way out.
Never touches the real network: HF_ENDPOINT points at a local socket and the HF cache is empty."""
import os
import socket
import subprocess
import sys
import threading
import time


def test_validate_fails_fast_on_a_silent_hub(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []  # accepted and never answered, kept open so the client waits for bytes that never come
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    env = {k: v for k, v in os.environ.items()
           if not k.upper().endswith("_PROXY") and not k.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{srv.getsockname()[1]}", HF_HOME=str(tmp_path / "hf"),
               NO_PROXY="127.0.0.1", HF_HUB_DISABLE_TELEMETRY="1")
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-m", "fastgpt", "validate", "--model", "gpt2", "--device", "cpu"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert took < 60, f"took {took:.0f} s: {out[-2000:]}"
    assert "'gpt2'" in out and "local directory" in out, out[-2000:]
