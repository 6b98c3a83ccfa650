"""bench.cpu on a very small preset: every system holds the same weights (first-step losses agree, the
benchmark checks that itself) and greedy generation gives the same ids in fastgpt and transformers."""
from _train_util import add_nano
from bench import cpu


def test_systems_share_weights_and_greedy_ids(monkeypatch):
    add_nano(monkeypatch)
    thr = cpu.throughput("nano", 2, 16, reps=1)
    assert set(thr) == set(cpu.SYSTEMS)
    losses = [r["first_loss"] for r in thr.values()]
    assert max(losses) - min(losses) < 1e-4 and all(len(r["tok_per_cpu_s"]) == 1 for r in thr.values())
    gen = cpu.generation("nano", 6, reps=1)
    assert all(g["same_ids"] for g in gen.values())
    table = cpu.render("nano", 2, 16, {"throughput": thr, "generation": gen})
    assert "| fastgpt |" in table and "1.00x" in table  # nanoGPT is the reference row
