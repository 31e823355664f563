"""FSDP over 2 CPU processes (gloo): the same run as DDP, sharded checkpoints that resume exactly and
survive a kill, a final model transformers loads, and accelerate's FSDP configs."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ALPACA_ROWS, free_port, read_jsonl, run_lmtune, torchrun, torchrun_command
from safetensors.torch import load_file
from test_resume import assert_same_run, final_weights, train_losses

from lmtune.checkpoint import verify_checkpoint
from lmtune.config import build_config
from lmtune.errors import UserError
from lmtune.runlock import running_pid
from lmtune.sharding import accelerate_fsdp_settings, take_accelerate_fsdp

RUN = dict(finetuning_type="full", learning_rate=5e-3, per_device_train_batch_size=4, logging_steps=1,
           report_to="none", plot_loss=False, preview_samples=0, cutoff_len=128, lr_scheduler_type="constant",
           max_steps=6, save_steps=2)  # 32 rows: 4 steps an epoch over 2 processes, so the run crosses one


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("fsdp")
    (folder / "sums.json").write_text(json.dumps(ALPACA_ROWS))
    (folder / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    return folder


def config_file(folder, name: str, **values):
    values = {"model_name_or_path": str(folder / "model"), "dataset": str(folder / "sums.json"),
              "output_dir": str(folder / name), **RUN, **values}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def runs(module_dir):
    """One DDP run and one FSDP (full_shard) run of the same config, on 2 processes each."""
    torchrun(config_file(module_dir, "ddp"))
    torchrun(config_file(module_dir, "fsdp", fsdp="full_shard"))
    return module_dir / "ddp", module_dir / "fsdp"


def assert_close_runs(expected, got, atol=1e-5):
    """FSDP's reduce-scatter sums in another order than DDP's all-reduce: equal within float noise."""
    a, b = train_losses(expected), train_losses(got)
    assert sorted(a) == sorted(b)
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], abs=atol)
    wa, wb = final_weights(expected), final_weights(got)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=atol, rtol=1e-4)


def test_fsdp_trains_as_ddp_does(runs):
    ddp, fsdp = runs
    assert_close_runs(ddp, fsdp)
    rows = [r for r in read_jsonl(fsdp / "metrics.jsonl") if r["type"] == "train"]
    assert [r["samples_seen"] for r in rows] == [8, 16, 24, 32, 40, 48]
    assert yaml.safe_load((fsdp / "run_config.yaml").read_text())["fsdp"] == "full_shard"


def test_a_sharded_checkpoint_holds_each_process_shard_and_verifies(runs):
    _, fsdp = runs
    checkpoint = fsdp / "checkpoint-4"
    assert sorted(p.name for p in (checkpoint / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "optimizer.pt").exists()
    mark = json.loads((checkpoint / "checkpoint_complete.json").read_text())
    assert {"shards/__0_0.distcp", "shards/__1_0.distcp", "shards/.metadata", "train_state.json"} <= set(mark["files"])
    index = json.loads((fsdp / "checkpoints.json").read_text())["checkpoints"]
    assert [(e["step"], e["status"]) for e in index] == [(2, "kept"), (4, "kept"), (6, "kept")]
    assert index[0]["size_bytes"] == sum(p.stat().st_size for p in (fsdp / "checkpoint-2").rglob("*") if p.is_file())
    assert verify_checkpoint(checkpoint) == []


def test_verify_names_a_missing_shard(runs, tmp_path, capsys):
    _, fsdp = runs
    damaged = tmp_path / "run"
    shutil.copytree(fsdp, damaged)
    (damaged / "checkpoint-4" / "shards" / "__1_0.distcp").unlink()
    capsys.readouterr()
    assert run_lmtune("checkpoints", damaged, "--verify", "--json") == 1
    problems = {e["step"]: e["problems"] for e in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert problems[2] == [] and problems[6] == []
    assert [p.rsplit("/", 1)[-1] for p in problems[4]] == ["__1_0.distcp: missing"]


def test_a_crafted_shard_metadata_runs_no_code(runs, tmp_path):
    _, fsdp = runs
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(fsdp / "checkpoint-4", checkpoint)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (checkpoint / "shards" / ".metadata").write_bytes(pickle.dumps(Payload()))
    problems = verify_checkpoint(checkpoint)
    assert any("refused to load" in p and ".metadata" in p for p in problems), problems
    assert not marker.exists()


def test_the_final_model_of_an_fsdp_run_loads_with_transformers_alone(runs):
    from transformers import AutoModelForCausalLM

    _, fsdp = runs
    model = AutoModelForCausalLM.from_pretrained(fsdp)
    saved = load_file(fsdp / "model.safetensors")
    assert "lm_head.weight" not in saved  # tied to the embeddings, written once
    for name, value in model.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name


def test_one_process_loads_a_checkpoint_two_processes_sharded(runs):
    """DCP reshards: the weights and AdamW state of a 2-process sharded checkpoint, into a whole model."""
    from lmtune.checkpoint import read_state
    from lmtune.models import load_model
    from lmtune.optimizers import build_optimizer
    from lmtune.resume import ResumePoint, load_sharded_checkpoint

    _, fsdp = runs
    config = build_config({"model_name_or_path": str(fsdp.parent / "model"), "finetuning_type": "full"})
    model = load_model(config.model_name_or_path, config)
    optimizer = build_optimizer(model, config)
    checkpoint = fsdp / "checkpoint-6"  # the final step's: its weights are the final model's
    load_sharded_checkpoint(model, optimizer, ResumePoint(checkpoint, read_state(checkpoint)))
    final = load_file(fsdp / "model.safetensors")
    for name, value in model.state_dict().items():
        if name in final:
            assert torch.equal(value, final[name]), name
    state = optimizer.state_dict()["state"]
    assert len(state) == len(list(model.parameters())) and all(s["step"] == 6 for s in state.values())
    embeddings = next(i for i, p in enumerate(model.parameters()) if p.shape[0] == model.config.vocab_size)
    assert state[embeddings]["exp_avg"].shape == model.get_input_embeddings().weight.shape  # whole, not a shard


def test_a_sharded_checkpoint_of_two_processes_resumes_on_one_with_double_accumulation(runs, module_dir, tmp_path):
    """Issue's end-to-end case: 2 x 4 rows a step under FSDP, resumed on one process as 1 x 4 x 2 accumulation."""
    from test_reshard import assert_within_float_noise

    _, fsdp = runs
    resumed = tmp_path / "one"
    resumed.mkdir()
    shutil.copytree(fsdp / "checkpoint-2", resumed / "checkpoint-2")
    config = config_file(module_dir, "one", fsdp="full_shard", gradient_accumulation_steps=2)
    config.write_text(config.read_text().replace(str(module_dir / "one"), str(resumed)))
    assert run_lmtune("train", config) == 0
    loss_difference, weight_difference = assert_within_float_noise(fsdp, resumed, 2)
    event = next(r for r in read_jsonl(resumed / "metrics.jsonl") if r.get("event") == "resume")
    assert event["processes"] == {"saved": 2, "now": 1}
    print(f"FSDP 2 -> 1: largest loss difference {loss_difference:.2e}, weights {weight_difference:.2e}")


def test_export_of_a_sharded_checkpoint_is_a_whole_model(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    _, fsdp = runs
    assert run_lmtune("export", fsdp / "checkpoint-6", "--out", tmp_path / "exported") == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    final = AutoModelForCausalLM.from_pretrained(fsdp)
    for (name, a), b in zip(exported.state_dict().items(), final.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


SLOW_SHARD = '''
import os, time, pathlib
import torch.distributed.checkpoint.filesystem as filesystem


class SlowShard:
    """Every process writes its pid to a file; on process 1 the write of its shard of checkpoint-4 hangs,
    after saying so in a file."""

    def on_train_begin(self, state, model):
        folder = pathlib.Path(os.environ["SHARD_WRITE_STARTED"]).parent
        (folder / f"pid-{os.environ['RANK']}").write_text(str(os.getpid()))
        if os.environ.get("RANK") != "1":
            return
        write = filesystem.FileSystemWriter.write_data

        def slow(self, plan, planner):
            if "checkpoint-4" in str(self.path):
                pathlib.Path(os.environ["SHARD_WRITE_STARTED"]).write_text("1")
                time.sleep(300)
            return write(self, plan, planner)

        filesystem.FileSystemWriter.write_data = slow
'''


def test_a_kill_during_a_sharded_save_leaves_the_previous_checkpoint(runs, module_dir, tmp_path):
    """Process 1 is still writing its shard of checkpoint-4 when every process is killed (-9): checkpoint-2
    is the newest, and the run continues from it to the same end as one never stopped."""
    _, straight = runs
    (tmp_path / "slow_shard.py").write_text(SLOW_SHARD)
    started = tmp_path / "started"
    config = config_file(module_dir, "killed", fsdp="full_shard", callbacks=["slow_shard:SlowShard"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARD_WRITE_STARTED": str(started),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(torchrun_command(config), env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started.exists(), "process 1 never began its shard of checkpoint-4"
    time.sleep(1.0)  # the main process has written its own shard and waits for process 1's
    for rank in (0, 1):  # torchrun starts each worker in a session of its own
        os.kill(int((tmp_path / f"pid-{rank}").read_text()), signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run = module_dir / "killed"
    while running_pid(run) is not None:  # the workers die a moment after torchrun
        time.sleep(0.1)
    assert not (run / "checkpoint-4").exists()
    unfinished = run / ".checkpoint-4.tmp"
    assert unfinished.exists() and not (unfinished / "checkpoint_complete.json").exists()
    assert verify_checkpoint(run / "checkpoint-2") == []
    torchrun(config_file(module_dir, "killed", fsdp="full_shard"), env={"PYTHONPATH": str(tmp_path)})
    event = next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "resume")
    assert event["from"].endswith("checkpoint-2")
    assert_same_run(straight, run, 0)
    assert not (run / ".checkpoint-4.tmp").exists()


def test_lora_with_fsdp_saves_a_sharded_adapter_and_a_whole_one_at_the_end(module_dir, runs):
    """shard_grad_op, LoRA, gradient checkpointing, accumulation, evaluation and load_best_model_at_end:
    the final adapter is the best checkpoint's, read back from its shards."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmtune.chat import load_model_for_inference
    from lmtune.checkpoint import read_shard_metadata

    config = config_file(module_dir, "lora", fsdp="shard_grad_op", finetuning_type="lora", max_steps=6,
                         gradient_checkpointing=True, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                         val_size=8, eval_steps=2, load_best_model_at_end=True, learning_rate=5e-2)
    torchrun(config)
    run = module_dir / "lora"
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(loss == loss for loss in losses.values())
    evals = {r["step"]: r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "eval"}
    assert sorted(evals) == [2, 4, 6]
    keys = list(read_shard_metadata(run / "checkpoint-2").state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys)  # the adapter only, not the frozen base
    best = min(evals, key=evals.get)
    from_shards, _ = load_model_for_inference(str(run / f"checkpoint-{best}"), device="cpu")
    final = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(module_dir / "model"), run)
    shards = {n: p for n, p in from_shards.named_parameters() if "lora_" in n}
    assert shards and any(p.abs().sum() > 0 for n, p in shards.items() if "lora_B" in n)
    for name, parameter in final.named_parameters():
        if "lora_" in name:
            assert torch.equal(parameter, shards[name]), name


def test_freeze_with_fsdp_trains_only_the_last_layer(module_dir):
    config = config_file(module_dir, "freeze", fsdp="full_shard", finetuning_type="freeze",
                         freeze_trainable_layers=1, max_steps=2, save_steps=1)
    torchrun(config)
    run, base = module_dir / "freeze", load_file(module_dir / "model" / "model.safetensors")
    final = load_file(run / "model.safetensors")
    changed = {key for key in base if not torch.equal(base[key], final[key])}
    assert changed and all(key.startswith("model.layers.1.") for key in changed)
    assert verify_checkpoint(run / "checkpoint-1") == []


def test_accelerate_launch_with_an_fsdp_config_continues_a_ddp_checkpoint(module_dir, runs, tmp_path):
    """A LLaMA-Factory style accelerate FSDP config (SHARD_GRAD_OP is fsdp: shard_grad_op) resumes the DDP
    run's checkpoint-2: its whole weights and AdamW state are sharded, and the run goes on as DDP's did."""
    ddp, _ = runs
    accelerate_config = tmp_path / "fsdp_config.yaml"
    accelerate_config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "mixed_precision": "no",
        "num_machines": 1, "num_processes": 2, "machine_rank": 0, "main_training_function": "main",
        "rdzv_backend": "static", "same_network": True, "use_cpu": False,
        "fsdp_config": {"fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_backward_prefetch": "BACKWARD_PRE",
                        "fsdp_offload_params": False, "fsdp_sharding_strategy": "SHARD_GRAD_OP",
                        "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_use_orig_params": True},
    }))
    run = module_dir / "accelerate"
    run.mkdir()
    shutil.copytree(ddp / "checkpoint-2", run / "checkpoint-2")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
               "--main_process_port", str(free_port()), "-m", "lmtune", "train",
               str(config_file(module_dir, "accelerate"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load((run / "run_config.yaml").read_text())["fsdp"] == "shard_grad_op"
    assert (run / "checkpoint-4" / "shards" / ".metadata").is_file()
    expected, got = train_losses(ddp), train_losses(run)
    assert sorted(got) == [3, 4, 5, 6]
    assert [got[s] for s in sorted(got)] == pytest.approx([expected[s] for s in sorted(got)], abs=1e-5)
    for key, value in final_weights(ddp).items():
        torch.testing.assert_close(final_weights(run)[key], value, atol=1e-5, rtol=1e-4)


# --- without a launch ------------------------------------------------------------------------


@pytest.mark.parametrize("environ, expected", [
    ({}, {}),
    ({"ACCELERATE_USE_FSDP": "true"}, {"fsdp": "full_shard", "fsdp_offload": False}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP", "FSDP_OFFLOAD_PARAMS": "true"},
     {"fsdp": "shard_grad_op", "fsdp_offload": True}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "2"}, {"fsdp": "shard_grad_op", "fsdp_offload": False}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, {"fsdp": False}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"},
     {"fsdp": "shard_grad_op", "fsdp_offload": False}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
     {"fsdp": "full_shard", "fsdp_offload": False, "gradient_checkpointing": True}),
])
def test_the_settings_accelerate_launch_passes_are_read(environ, expected):
    assert accelerate_fsdp_settings(environ) == expected


def test_accelerate_and_the_config_disagreeing_is_an_error_naming_both():
    environ = {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}
    with pytest.raises(UserError) as error:
        take_accelerate_fsdp(build_config({"fsdp": "shard_grad_op"}), dict(environ))
    assert "fsdp" in str(error.value) and "shard_grad_op" in str(error.value) and "full_shard" in str(error.value)
    environ = {**environ, "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}
    with pytest.raises(UserError, match="HYBRID_SHARD"):
        take_accelerate_fsdp(build_config({}), environ)
    agreeing = dict(environ, FSDP_SHARDING_STRATEGY="FULL_SHARD")
    config = take_accelerate_fsdp(build_config({"fsdp": "full_shard"}), agreeing)
    assert config.fsdp == "full_shard" and agreeing["ACCELERATE_USE_FSDP"] == "false"  # lmtune shards itself


@pytest.mark.parametrize("given, fsdp, offload", [
    ({"fsdp": "full_shard auto_wrap"}, "full_shard", False),
    ({"fsdp": "full_shard offload auto_wrap"}, "full_shard", True),
    ({"fsdp": "shard_grad_op"}, "shard_grad_op", False),
    ({"fsdp": True}, "full_shard", False),
    ({"fsdp": "no_shard"}, False, False),
    ({"fsdp": False}, False, False),
    ({"fsdp": "full_shard", "fsdp_config": {"fsdp_offload_params": True}}, "full_shard", True),
    ({"fsdp": "full_shard", "fsdp_config": {"reshard_after_forward": False, "fsdp_version": 2}}, "shard_grad_op",
     False),
])
def test_the_hugging_face_forms_of_fsdp(given, fsdp, offload):
    config = build_config(given)
    assert (config.fsdp, config.fsdp_offload) == (fsdp, offload)


@pytest.mark.parametrize("given, words", [
    ({"fsdp": "hybrid_shard"}, ["fsdp", "hybrid_shard", "full_shard, shard_grad_op"]),
    ({"fsdp_offload": True}, ["fsdp_offload", "fsdp: full_shard"]),
    ({"fsdp": "full_shard", "quantization_bit": 4}, ["fsdp", "quantization_bit"]),
    ({"fsdp_config": "fsdp.json"}, ["fsdp_config", "fsdp: full_shard"]),
])
def test_fsdp_settings_lmtune_cannot_take_are_refused(given, words):
    with pytest.raises(UserError) as error:
        build_config(given)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_fsdp_on_one_process_trains_the_whole_model(tiny_config, tmp_path, capsys):
    """Nothing to shard over: the same config runs on one process, with unsharded checkpoints."""
    assert run_lmtune("train", tiny_config(fsdp="full_shard", max_steps=2, save_steps=1)) == 0
    assert "this run has one process, nothing to shard over" in " ".join(capsys.readouterr().err.split())
    assert (tmp_path / "run" / "checkpoint-1" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "checkpoint-1" / "shards").exists()


def test_the_plan_divides_what_fsdp_shards_over_the_processes(tiny_model_dir, tiny_config, capsys):
    from transformers import AutoModelForCausalLM

    from lmtune.planning import memory_estimate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for name, p in model.named_parameters() if ".layers.0." in name)
    gathered = 4 * (params - layer)  # embeddings (tied output layer), norms and one of the 2 layers, in fp32

    def estimate(**keys):
        return memory_estimate(model, build_config({"finetuning_type": "full", **keys}), 4)

    assert estimate() | {"activations_per_token": None} == {
        "weights": 4 * params, "gradients": 4 * params, "optimizer": 8 * params, "cpu": 0, "processes": 1,
        "activations_per_token": None}  # no fsdp: every process holds it all
    full = estimate(fsdp="full_shard")
    assert (full["weights"], full["gradients"], full["optimizer"]) == (params + gathered, params, 2 * params)
    grad_op = estimate(fsdp="shard_grad_op")
    assert (grad_op["weights"], grad_op["gradients"], grad_op["optimizer"]) == (4 * params, params, 2 * params)
    offload = estimate(fsdp="full_shard", fsdp_offload=True)
    assert (offload["weights"], offload["gradients"], offload["optimizer"]) == (gathered, 0, 0)
    assert offload["cpu"] == params + params + 2 * params  # the shards of weights, gradients and AdamW state
    capsys.readouterr()
    assert run_lmtune("plan", tiny_config(fsdp="full_shard"), "--processes", "4") == 0
    assert "memory per process (fsdp over 4) (estimate)" in " ".join(capsys.readouterr().out.split())


def test_an_accelerate_fsdp_config_is_checked_with_the_yaml_keys():
    environ = {"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}
    with pytest.raises(UserError, match="quantization_bit"):
        take_accelerate_fsdp(build_config({"finetuning_type": "lora", "quantization_bit": 4}), environ)


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_dpo_with_fsdp_trains_as_one_process_with_both_processes_pairs(module_dir, tmp_path, finetuning_type):
    """The reference under FSDP: the sharded model with its adapter off (LoRA), or a frozen whole copy (full)."""
    from test_dpo import pair_rows

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(row) for row in pair_rows(16)))
    dpo = dict(stage="dpo", dataset=str(pairs), finetuning_type=finetuning_type, max_steps=3, save_steps=3,
               per_device_train_batch_size=2, learning_rate=1e-2 if finetuning_type == "lora" else 1e-3)
    torchrun(config_file(module_dir, f"dpo-{finetuning_type}", fsdp="full_shard", **dpo))
    one = config_file(module_dir, f"dpo-one-{finetuning_type}", **{**dpo, "per_device_train_batch_size": 4})
    assert run_lmtune("train", one) == 0
    sharded, whole = module_dir / f"dpo-{finetuning_type}", module_dir / f"dpo-one-{finetuning_type}"
    assert train_losses(sharded)[1] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert_close_runs(whole, sharded)
    margins = [r["rewards/margins"] for r in read_jsonl(sharded / "metrics.jsonl") if r["type"] == "train"]
    assert margins[-1] > 0
