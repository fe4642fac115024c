"""`homeforge registry` through the real CLI: versions with lineage, gated promotion (the p-value in a
refusal), rollback, audit lines, locking, and bad references."""

from __future__ import annotations

import json
import threading

import pytest

from .test_run import hf


@pytest.mark.slow
def test_register_promote_refuse_rollback(two_models):
    tmp, m = two_models
    (weak, weak_eval), (strong, strong_eval) = m["weak"], m["strong"]
    hf(tmp, "registry", "register", weak, "--name", "docs", "--eval", weak_eval)
    first = hf(tmp, "registry", "promote", "docs").stdout
    assert "promoted docs version 1 to @champion" in first and "no current version" in first
    again = hf(tmp, "registry", "register", weak, "--name", "docs", "--eval", weak_eval).stdout
    assert "already registered: docs version 1" in again  # content-addressed: the same bytes are one version
    hf(tmp, "registry", "register", strong, "--name", "docs", "--eval", strong_eval)
    # the better model, but the bar set impossibly high: refused with the p-value, nothing changed
    strict = hf(tmp, "registry", "promote", "docs", "--min-improvement", "100", check=False)
    assert strict.returncode == 3 and "refused" in strict.stderr and "p=" in strict.stderr
    assert json.loads(hf(tmp, "registry", "show", "docs@champion", "--json").stdout)["version"] == 1
    ok = hf(tmp, "registry", "promote", "docs", "--from", "candidate", "--to", "champion").stdout
    assert "promoted docs version 2 to @champion" in ok and "p=" in ok
    # a worse candidate is refused
    hf(tmp, "registry", "alias", "docs@candidate", "1")
    worse = hf(tmp, "registry", "promote", "docs", check=False)
    assert worse.returncode == 3 and "version 1" in worse.stderr and "p=" in worse.stderr
    shown = json.loads(hf(tmp, "registry", "show", "docs@champion", "--json").stdout)
    assert shown["version"] == 2
    lin = shown["lineage"]
    assert lin["inputs"]["dataset"] and lin["code"]["homeforge"] and lin["config"]["max_steps"] == 60
    assert lin["privacy"] == {"dp": False} and shown["eval"]["metrics"]["ppl"] > 1
    d = hf(tmp, "registry", "diff", "docs@1", "docs@champion").stdout
    assert "max_steps" in d and "output_dir" in d and "ppl" in d and "seq_len" not in d  # only what differs
    assert "version 1" in hf(tmp, "registry", "rollback", "docs").stdout
    assert json.loads(hf(tmp, "registry", "show", "docs", "--json").stdout)["version"] == 1
    # every change is in the audit log
    from homeforge import paths

    log = (paths.audit_log()).read_text()
    for event in ("registry-register", "registry-promote", "registry-promote-refused", "registry-alias",
                  "registry-rollback"):
        assert f'"{event}"' in log, event
    # versions are immutable copies, verified on the way in
    vdir = tmp / "registry" / "docs" / "versions"
    assert len(list(vdir.iterdir())) == 2 and all(not (p.stat().st_mode & 0o222) for p in vdir.rglob("*.safetensors"))


@pytest.mark.slow
def test_promotion_needs_shared_evaluation_data(two_models, tmp_path):
    tmp, m = two_models
    (weak, weak_eval), (strong, _) = m["weak"], m["strong"]
    other = tmp / "strong-eval-other"  # the same dataset, but other documents (max_examples): not paired
    hf(tmp, "eval", strong, "--data", _dataset_of(weak), "-o", other, "robustness.enabled=false",
       "generation.enabled=false", "max_examples=20", "threads=1")
    from homeforge.errors import HomeforgeError
    from homeforge.pipeline.spec import PromoteGates
    from homeforge.registry.store import Registry

    r = Registry(tmp_path)
    r.register(weak, "x", eval_dir=weak_eval, alias="champion")
    r.register(strong, "x", eval_dir=other, alias="candidate")
    before = (tmp_path / "x" / "index.json").read_text()
    with pytest.raises(HomeforgeError, match="no shared evaluation data"):
        r.promote("x", "candidate", "champion", PromoteGates())
    assert (tmp_path / "x" / "index.json").read_text() == before


def _dataset_of(model):
    return json.loads((model / "homeforge.json").read_text())["input_paths"]["dataset"]["path"]


def test_bad_references(tmp_path):
    r = hf(tmp_path, "registry", "show", "nope@champion", check=False)
    assert r.returncode == 2 and "no model named 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = hf(tmp_path, "registry", "register", tmp_path, "--name", "bad/name", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert not (tmp_path / "registry").exists() or not any((tmp_path / "registry").iterdir())


def test_concurrent_writers_never_lose_a_change(tmp_path):
    """Two writers at once (threads: separate open files, so flock serialises them like processes)."""
    from homeforge.registry.store import Registry, _set_alias

    reg = Registry(tmp_path)
    with reg._changing("m", create=True) as idx:
        idx["versions"] = [{"version": 1, "content_hash": "a" * 64, "path": "versions/a"},
                           {"version": 2, "content_hash": "b" * 64, "path": "versions/b"}]
        _set_alias(idx, "champion", 1, "test")

    def flip(n):
        for i in range(25):
            reg.set_alias("m", f"w{n}", 1 + i % 2)

    threads = [threading.Thread(target=flip, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    idx = reg.index("m")
    assert len(idx["history"]) == 1 + 4 * 25  # every change kept, none overwritten by another writer
