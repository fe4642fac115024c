"""The training engine on a tiny Llama: golden loss, exact resume, divergence, checkpoints, tracking."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from engine_task import make_cfg, make_task  # noqa: E402

from homeforge.errors import HomeforgeError  # noqa: E402
from homeforge.train import checkpoint as ck  # noqa: E402
from homeforge.train.loop import TrainingDiverged, train_task  # noqa: E402
from homeforge.train.task import StepLoss, causal_lm_loss  # noqa: E402
from homeforge.train.tracking import read_metrics  # noqa: E402

# loss after steps 1, 6 and 12 of make_cfg's run (seed 1234, fp32, 1 thread)
GOLDEN = {1: 4.6014, 6: 4.2003, 12: 3.8575}


def run(tmp: Path, *overrides: str, resume=None, progress=None, task=None):
    cfg = make_cfg(tmp, *overrides)
    task = task or make_task(cfg)
    return train_task(task, cfg, tmp, resume=resume, progress=progress), task


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    state, task = run(tmp, "tracking.tensorboard=true")
    return tmp, state, task


def test_golden_loss_and_run_dir(full_run):
    tmp, state, _ = full_run
    losses = {r["step"]: r["loss"] for r in state.history}
    for step, want in GOLDEN.items():
        assert losses[step] == pytest.approx(want, abs=2e-4), (step, losses[step])
    assert state.step == 12 and state.samples == 12 * 4 and state.stop_reason == "max_steps"
    # metrics JSONL always, with the documented keys; a PNG plot; the final model artifact
    records = read_metrics(tmp / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_rss_mb"} <= set(records[-1])
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12]
    assert (tmp / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((tmp / "model" / "homeforge.json").read_text())
    assert manifest["metrics"]["steps"] == 12 and manifest["config"]["seq_len"] == 32
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp / "model")
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.weight, full_run[2].model.model.layers[0].mlp.up_proj.weight)


def test_checkpoints_every_n_keep_k_and_best(full_run, tmp_path):
    tmp, state, _ = full_run
    assert [p.name for p in ck.step_checkpoints(tmp)] == ["step-00000004", "step-00000008", "step-00000012"]
    best = ck.read_meta(tmp / "checkpoints" / "best")
    assert best["best_val"] == pytest.approx(state.best_val)
    assert ck.read_config(tmp / "checkpoints" / "step-00000008")["optim"]["lr"] == 3e-3  # resolved config beside it
    assert not list((tmp / "checkpoints").glob(".tmp-*"))
    run(tmp_path, "checkpoint.keep=1", "max_steps=8")
    assert [p.name for p in ck.step_checkpoints(tmp_path)] == ["step-00000008"]


class Interrupt(Exception):
    pass


def test_interrupted_and_resumed_equals_uninterrupted(full_run, tmp_path):
    tmp_full, _, full_task = full_run

    def stop_at_10(state, record):
        if state.step == 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path, "tracking.tensorboard=true", progress=stop_at_10)
    latest = ck.resolve_resume(tmp_path, "latest")
    assert latest.name == "step-00000008"
    state, task = run(tmp_path, "tracking.tensorboard=true", resume=latest)
    assert state.step == 12 and state.samples == 48
    for (name, a), (_, b) in zip(full_task.model.named_parameters(), task.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name  # bit-exact on CPU
    # the metrics log holds one record per step, the replayed steps 9-10 once
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 13))
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["loss"] == read_metrics(tmp_full / "metrics.jsonl")[-1]["loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 13))  # the replayed steps are not doubled


def test_nan_loss_stops_with_last_good_checkpoint_intact(tmp_path):
    cfg = make_cfg(tmp_path)
    task = make_task(cfg)
    calls = {"n": 0}

    def poisoned(model, batch):  # call 7 = step 5 (steps 1-4, then 2 eval batches at step 4)
        calls["n"] += 1
        out = causal_lm_loss(model, batch)
        return StepLoss(out.loss_sum * math.nan, out.n_tokens) if calls["n"] == 7 else out

    task.loss_fn = poisoned
    with pytest.raises(TrainingDiverged) as err:
        train_task(task, cfg, tmp_path)
    msg = err.value.render()
    assert "became nan at step 5" in msg and "step-00000004" in msg and "lower optim.lr" in msg
    assert [p.name for p in ck.step_checkpoints(tmp_path)] == ["step-00000004"]
    saved = load_file(str(tmp_path / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not (tmp_path / "model").exists()


def test_early_stopping(tmp_path):
    state, _ = run(tmp_path, "early_stopping_patience=1", "early_stopping_min_delta=10")
    assert state.step == 8 and state.stop_reason.startswith("early stopping")
    assert ck.latest_checkpoint(tmp_path).name == "step-00000008"
    # the final model is the best checkpoint's (step 4), not the last weights
    assert ck.read_meta(tmp_path / "checkpoints" / "best")["step"] == 4
    manifest = json.loads((tmp_path / "model" / "homeforge.json").read_text())
    assert manifest["metrics"]["final_weights"] == "best"
    best = load_file(str(tmp_path / "checkpoints" / "best" / "model.safetensors"))
    final = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert torch.equal(final["model.layers.0.mlp.up_proj.weight"], best["model.layers.0.mlp.up_proj.weight"])


def test_resume_with_other_config_is_refused_and_nothing_overwritten(full_run, tmp_path):
    tmp, _, _ = full_run
    before = tree_bytes(tmp / "checkpoints")
    cfg = make_cfg(tmp, "optim.lr=1e-2")
    with pytest.raises(HomeforgeError) as err:
        train_task(make_task(cfg), cfg, tmp, resume=ck.resolve_resume(tmp, "latest"))
    assert "optim.lr" in err.value.render() and "different training config" in err.value.render()
    assert tree_bytes(tmp / "checkpoints") == before
    with pytest.raises(HomeforgeError, match="not a complete homeforge checkpoint"):
        ck.resolve_resume(tmp, str(tmp / "model"))


def test_failed_checkpoint_write_leaves_no_partial_dir(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_write_manifest", broken)  # the last step: every data file is already written
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, "max_steps=4", "eval_every=100")
    assert ck.step_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_out_of_memory_names_the_knob(tmp_path):
    cfg = make_cfg(tmp_path)
    task = make_task(cfg)

    def oom(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    task.loss_fn = oom
    with pytest.raises(HomeforgeError) as err:
        train_task(task, cfg, tmp_path)
    assert "does not fit in memory" in err.value.render() and "micro_batch_size=2 grad_accum=2" in err.value.render()


def test_precision_auto_is_fp32_on_cpu():
    from homeforge.train.precision import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_tensorboard_events_read_back(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, state, _ = full_run
    acc = EventAccumulator(str(tmp / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [e.step for e in events] == list(range(1, 13))
    assert events[-1].value == pytest.approx(state.history[-1]["loss"], rel=1e-6)
    assert {"lr", "val_loss", "mfu", "tokens_per_s"} <= set(acc.Tags()["scalars"])


def test_mlflow_sqlite_store_read_back(tmp_path):
    from mlflow import MlflowClient

    state, _ = run(tmp_path, "max_steps=4", "tracking.mlflow=true", "tracking.experiment=engine-test")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("engine-test")
    (run_info,) = client.search_runs([exp.experiment_id])
    assert run_info.info.status == "FINISHED"
    assert run_info.data.params["optim.lr"] == "0.003"
    history = client.get_metric_history(run_info.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert history[-1].value == pytest.approx(state.history[-1]["loss"], rel=1e-6)
    # artifacts: under the run's own directory, read back through MLflow's own client
    run_id = run_info.info.run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.jsonl"} <= names, names
    assert run_info.info.artifact_uri.startswith((tmp_path / "mlflow-artifacts").as_uri())
    local = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl")))
    assert yaml.safe_load(local.read_text())["optim"]["lr"] == 0.003
    metrics = Path(client.download_artifacts(run_id, "metrics.jsonl", str(tmp_path / "dl")))
    assert metrics.read_bytes() == (tmp_path / "metrics.jsonl").read_bytes()
    assert not (Path.cwd() / "mlruns").exists()


def test_mlflow_remote_uri_refused(tmp_path):
    with pytest.raises(HomeforgeError, match="not a local store"):
        run(tmp_path, "max_steps=1", "tracking.mlflow=true", "tracking.mlflow_uri=http://10.0.0.1:5000")


def test_activation_checkpointing_gives_the_same_run(full_run, tmp_path):
    _, state, _ = full_run
    ck_state, task = run(tmp_path, "activation_checkpointing=true")
    assert task.model.is_activation_checkpointing
    assert [r["loss"] for r in ck_state.history] == pytest.approx([r["loss"] for r in state.history], abs=1e-5)


def test_flops_per_token_and_cached_peak(tmp_path, monkeypatch):
    from homeforge.models.presets import count_params
    from homeforge.train import flops

    cfg = make_cfg(tmp_path)
    model = make_task(cfg).model
    n = count_params(model)  # tied embeddings: the one matrix is the (counted) output head
    assert flops.flops_per_token(model, 32) == 6 * n + 12 * 2 * 64 * 32
    for p in model.model.layers.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.model.layers.parameters())
    assert flops.flops_per_token(model, 32) == 6 * (n - frozen) + 4 * frozen + 12 * 2 * 64 * 32

    monkeypatch.setenv("HOMEFORGE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = flops.probe_peak_flops
    monkeypatch.setattr(flops, "probe_peak_flops", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = flops.peak_flops(torch.device("cpu"))
    assert first > 1e8 and calls == [1]  # measured once (a real matmul probe) ...
    assert flops.peak_flops(torch.device("cpu")) == first and calls == [1]  # ... then read from the cache
    assert (tmp_path / "cache" / "peak_flops.json").is_file()
    assert flops.peak_flops(torch.device("cpu"), given_tflops=2.5) == 2.5e12


def test_resume_config_check_tolerates_new_default_settings(tmp_path):
    from homeforge.config import TrainConfig

    defaults = TrainConfig().model_dump(mode="json")
    current = make_cfg(tmp_path).model_dump(mode="json")
    older = {k: v for k, v in current.items() if k != "early_stopping_min_delta"}  # a setting added later
    ck.check_resume_config(tmp_path, older, current, defaults=defaults)
    with pytest.raises(HomeforgeError, match="early_stopping_min_delta"):
        ck.check_resume_config(tmp_path, older, {**current, "early_stopping_min_delta": 0.5}, defaults=defaults)
    ck.check_resume_config(tmp_path, older, {**current, "max_minutes": 3.0, "log_every": 7}, defaults=defaults)


def test_latest_is_the_newest_written_after_resuming_from_an_earlier_checkpoint(tmp_path):
    run(tmp_path)  # step-4, step-8, step-12
    early = tmp_path / "checkpoints" / "step-00000004"

    def stop_at_6(state, record):
        if state.step == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path, "checkpoint.every=1", "checkpoint.keep=10", resume=early, progress=stop_at_6)
    assert ck.latest_checkpoint(tmp_path).name == "step-00000005"  # not the step-12 of the first timeline


@pytest.mark.parametrize("kind", ["causal-lm", "classifier, base trained", "classifier, base frozen"])
def test_flops_model_matches_torchs_flop_counter(kind):
    """The FLOPs behind MFU against torch's own count of one forward + backward (an independent oracle)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from homeforge.train.flops import flops_per_token

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    model = LlamaForCausalLM(cfg) if kind == "causal-lm" else LlamaForSequenceClassification(cfg)
    frozen_base = kind.endswith("frozen")
    if frozen_base:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("score"))
    ids = torch.randint(1, 500, (4, 32))
    with FlopCounterMode(display=False) as counter:
        labels = ids if kind == "causal-lm" else torch.zeros(4, dtype=torch.long)
        model(input_ids=ids, labels=labels).loss.backward()
    real = counter.get_total_flops() / ids.numel()
    assert 0.85 < flops_per_token(model, 32, frozen_backward=not frozen_base) / real < 1.2
    if frozen_base:  # counting a frozen base as if gradients flowed through it: MFU was ~2x too high
        assert flops_per_token(model, 32) / real > 1.8


def test_max_minutes_is_a_wall_clock_cap(tmp_path):
    """Training stops within one step of the budget, whatever the pace (a slowed-down step here)."""
    import time

    cfg = make_cfg(tmp_path, "max_steps=1000", "max_minutes=0.05", "checkpoint.every=0", "log_every=3")
    task = make_task(cfg)
    task.val = None
    fast = task.loss_fn

    def slow_loss(model, batch):
        time.sleep(0.2)
        return fast(model, batch)

    task.loss_fn = slow_loss
    t0 = time.monotonic()
    state = train_task(task, cfg, tmp_path)
    wall = time.monotonic() - t0
    step = sorted(r["step_s"] for r in state.history)[len(state.history) // 2]
    assert state.stop_reason == "time budget" and 5 <= state.step < 1000
    # the pace is refitted before every step: the last step starts only if it should end in time, so
    # the run ends at most one step's jitter past the budget (3.087 s measured once with refits only at
    # log steps)
    assert 3.0 - 2 * step <= state.elapsed_s <= 3.0 + step / 2, (state.elapsed_s, step)
    assert wall < 3.0 + 10  # + building the run, saving the final model


def test_quickstart_results_line_says_worse_than():
    from homeforge.quickstart import results_line

    good = results_line({"val_ppl": 200.0, "unigram_ppl": 800.0, "steps": 10, "samples": 10}, 256)
    bad = results_line({"val_ppl": 1642.8, "unigram_ppl": 771.9, "steps": 14, "samples": 20,
                        "stop_reason": "time budget"}, 256)
    assert "4.0x lower" in good and "worse" not in good
    assert "worse than" in bad and "lower" not in bad and "time budget" in bad


def test_training_leaves_the_callers_process_state_alone(tmp_path):
    """Threads, random states and matplotlib's backend are as the caller left them (a notebook, a test)."""
    import random

    import numpy as np

    torch.set_num_threads(2)
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    before = (torch.get_num_threads(), torch.random.get_rng_state().clone(), random.getstate(),
              np.random.get_state()[1].copy(), "matplotlib.pyplot" in sys.modules)
    cfg = make_cfg(tmp_path, "max_steps=3", "threads=1")
    train_task(make_task(cfg), cfg, tmp_path)  # seeds, sets threads, plots loss.png
    assert torch.get_num_threads() == before[0]
    assert torch.equal(torch.random.get_rng_state(), before[1])
    assert random.getstate() == before[2] and (np.random.get_state()[1] == before[3]).all()
    assert ("matplotlib.pyplot" in sys.modules) == before[4]  # plots without pyplot's global state
    assert (tmp_path / "loss.png").stat().st_size > 1000
