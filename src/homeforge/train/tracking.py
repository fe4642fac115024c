"""Metrics sinks: metrics.jsonl always, TensorBoard event files and a local MLflow store on request.

Only the main process (rank 0) makes a ``Tracker``. MLflow is kept local: the default
store is ``sqlite:///RUN/mlflow.db``; a ``file:`` or ``sqlite:`` URI may be given, an
``http(s):`` one is refused (nothing leaves the machine).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from homeforge._fs import atomic_write_text
from homeforge.config import TrackingConfig
from homeforge.errors import HomeforgeError


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (written by a run that is being resumed from ``step``)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class Tracker:
    def __init__(self, run_dir: Path, cfg: TrackingConfig, config: dict, resume_step: int | None = None):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            truncate_metrics(self.jsonl_path, resume_step)
        elif self.jsonl_path.exists():
            self.jsonl_path.unlink()
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events after the resumed step, so curves do not fork
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=(resume_step + 1) if resume_step else None)
        self.mlflow = None
        if cfg.mlflow:
            self._start_mlflow(cfg, config, resume_step is not None)

    def _start_mlflow(self, cfg: TrackingConfig, config: dict, resume: bool) -> None:
        import logging

        import mlflow

        for name in ("mlflow", "alembic"):  # no database-migration chatter on the console
            logging.getLogger(name).setLevel(logging.WARNING)

        uri = cfg.mlflow_uri or f"sqlite:///{(self.run_dir / 'mlflow.db').absolute()}"
        if not uri.startswith(("file:", "sqlite:", "/")):
            raise HomeforgeError(f"tracking.mlflow_uri {uri!r} is not a local store", where="tracking.mlflow_uri",
                                 fix="use a sqlite:///PATH.db or file:///DIR URI (homeforge never sends metrics off the machine)")
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment, artifact_location=_artifact_root(uri))
        id_file = self.run_dir / "mlflow_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        if run_id is None:
            run = client.create_run(exp_id, run_name=cfg.run_name or self.run_dir.name)
            run_id = run.info.run_id
            atomic_write_text(id_file, run_id)
            params = {k: str(v)[:250] for k, v in _flatten(config).items()}
            from mlflow.entities import Param

            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        self.mlflow = (client, run_id)
        self.config, self.log_model = config, cfg.mlflow_log_model

    def log(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = int(record["step"])
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            import time

            from mlflow.entities import Metric

            client, run_id = self.mlflow
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, status: str = "FINISHED") -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            client, run_id = self.mlflow
            self._log_artifacts(client, run_id)
            client.set_terminated(run_id, status=status)

    def _log_artifacts(self, client, run_id: str) -> None:
        """The run's files as MLflow artifacts: the resolved config, metrics.jsonl, the plots, the
        model's manifest (and the model itself with ``tracking.mlflow_log_model``)."""
        import yaml

        client.log_text(run_id, yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True), "config.yaml")
        files = [self.run_dir / "metrics.jsonl", *sorted(self.run_dir.glob("*.png"))]
        for f in files:
            if f.is_file():
                client.log_artifact(run_id, str(f))
        model = self.run_dir / "model"
        if (model / "homeforge.json").is_file():
            if self.log_model:
                client.log_artifacts(run_id, str(model), "model")
            else:
                client.log_artifact(run_id, str(model / "homeforge.json"), "model")


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a local store (MLflow's default, ./mlruns in the working directory, would
    scatter them): ``DIR/mlflow-artifacts`` for ``sqlite:///DIR/x.db``; a file store keeps its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).absolute().parent / "mlflow-artifacts").as_uri()
    return None
