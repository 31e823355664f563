"""report_to: TensorBoard, MLflow (a local ./mlruns store) and W&B (offline without an API key) get the run's rows."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import read_jsonl, run_lmtune

needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow is not installed (pip install 'lmtune[mlflow]')")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb is not installed (pip install 'lmtune[wandb]')")


@needs_mlflow
def test_mlflow_logs_to_a_local_mlruns_store_by_default(tiny_config, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert run_lmtune("train", tiny_config(max_steps=3, report_to="mlflow", run_name="sums-mlflow")) == 0
    client = mlflow.tracking.MlflowClient((tmp_path / "mlruns").as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [run.info.run_name for run in runs] == ["sums-mlflow"]
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    logged = [row for row in read_jsonl(tmp_path / "run" / "metrics.jsonl") if row["type"] == "train"]
    assert [m.step for m in history] == [row["step"] for row in logged]
    assert [m.value for m in history] == pytest.approx([row["loss"] for row in logged])
    assert runs[0].data.params["learning_rate"] == "0.005"


@needs_wandb
def test_wandb_runs_offline_without_an_api_key(tiny_config, tmp_path, monkeypatch):
    for variable in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert run_lmtune("train", tiny_config(max_steps=3, report_to=["wandb", "tensorboard"])) == 0
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert list((tmp_path / "run" / "runs").glob("events.out.tfevents.*"))


def test_a_tracker_whose_library_is_missing_is_a_clear_error(tiny_config, tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "swanlab" else
                        real_find_spec(name, *a))
    capsys.readouterr()
    assert run_lmtune("train", tiny_config(report_to="swanlab")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "swanlab needs the swanlab package" in err and "pip install 'lmtune[swanlab]'" in err
    assert not (tmp_path / "run").exists()


def test_report_to_none_writes_no_tracker_files(tiny_config, tmp_path):
    assert run_lmtune("train", tiny_config(max_steps=2, report_to="none")) == 0
    assert not (tmp_path / "run" / "runs").exists() and not (tmp_path / "run" / "wandb").exists()
