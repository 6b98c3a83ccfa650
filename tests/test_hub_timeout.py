"""`fastgpt validate --model gpt2` against a hub that accepts connections and never answers (a firewall that
swallows packets, a dead proxy) fails within a bound, naming the model and the local-directory way out.
Never touches the real network: HF_ENDPOINT points at a local socket and the HF cache is empty."""
import os
import socket
import subprocess
import sys
import threading
import time


def hub_env(tmp_path, port: int) -> dict:
    """A process environment whose HuggingFace hub is 127.0.0.1:port, with an empty HF cache under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1",
               HF_HUB_DISABLE_TELEMETRY="1")
    return env


class SilentHub:
    """A socket that accepts connections and never answers; env: a process environment pointed at it."""

    def __init__(self, tmp_path):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(16)
        self.held, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self.accept, daemon=True)
        self.env = hub_env(tmp_path, self.srv.getsockname()[1])

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


class LocalHub:
    """An HTTP hub on 127.0.0.1 that answers GET and HEAD of the paths in `routes` (path -> (body, headers));
    any other path hangs (`stall`: a hub that stopped answering) or gets a 404. env: a process environment
    pointed at it."""

    def __init__(self, tmp_path, routes: dict, stall: bool):
        import http.server

        stop = self.stop = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self, head=False):
                if self.path not in routes:
                    return stop.wait(150) if stall else self.send_error(404)
                body, headers = routes[self.path]
                self.send_response(200)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET(head=True)

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.env = hub_env(tmp_path, self.http.server_address[1])
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.http.shutdown()
        self.thread.join()
        self.http.server_close()


def repo_info(sha: str) -> dict:
    """The hub's answer to repo_info("openai-community/gpt2"): its path and body, naming commit `sha`."""
    import json

    return {"/api/models/openai-community/gpt2": (json.dumps({"id": "openai-community/gpt2", "sha": sha}).encode(),
                                                  {"Content-Type": "application/json"})}


def test_a_hub_that_stalls_after_the_revision_fails_fast(tmp_path):
    """Every request after the first is bounded too (snapshot_download's file listing has no timeout): the hub
    answers the revision ask and then never answers again."""
    t0 = time.monotonic()
    with LocalHub(tmp_path, repo_info("b" * 40), stall=True) as hub:
        try:
            r = subprocess.run([sys.executable, "-c", "from fastgpt.hf import _resolve; _resolve('gpt2')"],
                               env=hub.env, cwd=tmp_path, capture_output=True, text=True, timeout=100)
        except subprocess.TimeoutExpired:
            raise AssertionError("the model fetch hung for 100 s on a hub that stopped answering") from None
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0 and took < 60, f"took {took:.0f} s: {out[-2000:]}"
    assert "could not fetch 'gpt2'" in out and hub.env["HF_ENDPOINT"] in out, out[-2000:]


def test_a_hub_that_answers_serves_the_files_into_the_cache(tmp_path):
    """The bounded path still downloads: a local hub that answers the revision, then each file's metadata
    (HEAD) and body (GET) by that commit, ends with both files in the HF cache's snapshot of that commit."""
    import hashlib

    sha = "c" * 40
    files = {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": b"not really weights"}
    routes = {**repo_info(sha), **{
        f"/openai-community/gpt2/resolve/{sha}/{name}": (body, {"ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                                                               "X-Repo-Commit": sha})
        for name, body in files.items()}}
    with LocalHub(tmp_path, routes, stall=False) as hub:
        r = subprocess.run([sys.executable, "-c", "from fastgpt.hf import _resolve; print(_resolve('gpt2'))"],
                           env=hub.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    snap = tmp_path / "hf" / "hub" / "models--openai-community--gpt2" / "snapshots" / sha
    assert r.stdout.strip() == str(snap)
    assert {f: (snap / f).read_bytes() for f in files} == files
