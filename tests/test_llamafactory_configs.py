"""LLaMA-Factory's own example configs (train_lora/llama3_lora_pretrain, train_lora/qwen3_lora_sft,
train_full/llama3_full_sft), written as they are, comments and section headers included, on data in
LLaMA-Factory's formats: `lmtune plan` and `lmtune train` take them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import read_jsonl, run_lmtune

# What differs from the examples: the model path, dataset_dir and output_dir (this machine's), and
# preprocessing_num_workers and dataloader_num_workers (16 and 4 processes for a few rows on a 2-core
# test machine would only be slow).
PRETRAIN = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: pt
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: c4_demo
dataset_dir: {data}
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 2

### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""

LORA_SFT = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
dataset_dir: {data}
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 2
dataloader_num_workers: 0
placeholders: {{name: Lumi, author: the lmtune team}}

### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
eval_dataset: alpaca_en_demo
# val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

FULL_SFT = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: full
{deepspeed}deepspeed: {ds}  # choices: [ds_z0_config.json, ds_z2_config.json, ds_z3_config.json]

### dataset
dataset: identity,alpaca_en_demo
dataset_dir: {data}
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 2

### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


@pytest.fixture
def llamafactory_data(tmp_path):
    """A data/ folder as LLaMA-Factory ships it: identity (with placeholders), alpaca_en_demo, c4_demo."""
    data = tmp_path / "data"
    data.mkdir()
    identity = [{"instruction": "hi", "input": "", "output": "Hello! I am {{name}}, an AI assistant developed by "
                 "{{author}}. How can I assist you today?"},
                {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, an AI assistant developed "
                 "by {{author}}."}] * 4
    alpaca = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
              for a in range(1, 5) for b in range(1, 3)]
    (data / "identity.json").write_text(json.dumps(identity, indent=2))
    (data / "alpaca_en_demo.json").write_text(json.dumps(alpaca, indent=2))
    (data / "c4_demo.jsonl").write_text("\n".join(json.dumps({"text": f"Document {i} says something."})
                                                  for i in range(8)))
    (data / "dataset_info.json").write_text(json.dumps({
        "identity": {"file_name": "identity.json"},
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
    }, indent=2))
    return data


def write(tmp_path, text: str, model, data, **extra) -> tuple:
    out = tmp_path / "saves"
    path = tmp_path / "llamafactory.yaml"
    path.write_text(text.format(model=model, data=data, out=out, ds="examples/deepspeed/ds_z3_config.json", **extra))
    return path, out


@pytest.mark.parametrize("name, text, final_file", [
    ("pt-lora", PRETRAIN, "adapter_model.safetensors"),
    ("sft-lora", LORA_SFT, "adapter_model.safetensors"),
    ("sft-full", FULL_SFT, "model.safetensors"),
])
def test_llamafactory_example_configs_plan_and_train(name, text, final_file, tmp_path, tiny_model_dir,
                                                     llamafactory_data, capsys):
    config, out = write(tmp_path, text, tiny_model_dir, llamafactory_data, deepspeed="# ")
    assert "### method" in config.read_text() and "\n# " in config.read_text()  # headers and comments kept
    capsys.readouterr()
    assert run_lmtune("plan", config) == 0
    plan = capsys.readouterr().out
    assert "config: ignored do_train" in plan and "config: ignored ddp_timeout" not in plan  # an lmtune key
    assert "config: mapped warmup_ratio: 0.1 -> warmup_steps: 0.1" in plan
    # A few steps of the same run. bf16=false: accelerate keeps one mixed-precision setting per process,
    # and the other tests of this process train in float32 (`lmtune train` is one process per run).
    assert run_lmtune("train", config, "max_steps=3", "bf16=false") == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows if row["type"] == "train"] == [3]
    assert (out / final_file).is_file() and (out / "loss.png").is_file()
    written = yaml.safe_load((out / "run_config.yaml").read_text())
    assert written["warmup_steps"] == 0.1 and "do_train" not in written


def test_the_sft_lora_config_trains_the_identity_data_with_its_placeholders_filled(tmp_path, tiny_model_dir,
                                                                                    llamafactory_data, capsys):
    config, _ = write(tmp_path, LORA_SFT, tiny_model_dir, llamafactory_data)
    capsys.readouterr()
    assert run_lmtune("preview", config, "-n", "16", "--json") == 0
    preview = capsys.readouterr().out
    assert "I am Lumi, an AI assistant developed by the lmtune team." in preview and "{{name}}" not in preview


def test_the_full_sft_example_with_its_deepspeed_line_runs_as_fsdp(tmp_path, tiny_model_dir, llamafactory_data,
                                                                   capsys):
    """ZeRO-3 is fsdp: full_shard; the file is LLaMA-Factory's path, not on this machine: its name says the stage.
    On one process there is nothing to shard, and the run trains."""
    config, out = write(tmp_path, FULL_SFT, tiny_model_dir, llamafactory_data, deepspeed="")
    capsys.readouterr()
    assert run_lmtune("plan", config) == 0
    plan = " ".join(capsys.readouterr().out.split())
    assert "fsdp: 'full_shard' (mapped from DeepSpeed ZeRO-3)" in plan
    assert run_lmtune("train", config, "max_steps=2", "bf16=false") == 0
    assert (out / "model.safetensors").is_file()
    assert yaml.safe_load((out / "run_config.yaml").read_text())["fsdp"] == "full_shard"


def test_a_deepspeed_file_gives_its_zero_stage_and_offload(tmp_path):
    from lmtune.config import build_config

    ds = tmp_path / "my_zero.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    config = build_config({"deepspeed": str(ds)})
    assert (config.fsdp, config.fsdp_offload) == ("shard_grad_op", True)
    assert build_config({"deepspeed": "ds_z0_config.json"}).fsdp is False


# --- every training config of LLaMA-Factory 0.9.5's examples/ ----------------------------------

EXAMPLES = Path(__file__).parent / "fixtures" / "llamafactory_examples"
EXAMPLE_CONFIGS = sorted(str(path.relative_to(EXAMPLES)) for path in EXAMPLES.rglob("*.yaml"))
# What each refused example is refused for: the key, and the lmtune way the message names
REFUSED = {
    "image_max_pixels": "text models",
    "use_adam_mini": "finetuning_type: lora", "use_apollo": "finetuning_type: lora", "use_badam": "fsdp: full_shard",
    "use_galore": "finetuning_type: lora", "use_dft_loss": "cross-entropy", "use_eaft_loss": "cross-entropy",
    "use_asft_loss": "cross-entropy",
    "fp8": "bf16: true", "freeze_trainable_modules": "freeze_trainable_layers",
    "mixture_of_depths": "remove", "predict_with_generate": "lmtune eval",
    "oft_block_size": "finetuning_type: lora", "use_kt": "quantization_bit: 4",
    "tensor_model_parallel_size": "torchrun", "stage": "not available in lmtune yet", "ray_num_workers": "torchrun",
    "tokenized_path": "$LMTUNE_HOME/data",
}


def test_the_examples_are_llama_factorys_fifty_training_configs():
    assert len(EXAMPLE_CONFIGS) == 50 and (EXAMPLES / "LICENSE").is_file()
    assert all("stage" in yaml.safe_load((EXAMPLES / name).read_text()) for name in EXAMPLE_CONFIGS)


@pytest.mark.parametrize("name", EXAMPLE_CONFIGS)
def test_each_llamafactory_example_config_is_taken_or_refused_naming_the_lmtune_way(name, tmp_path):
    from lmtune.config import build_config
    from lmtune.errors import UserError

    values = yaml.safe_load((EXAMPLES / name).read_text())
    values.update(model_name_or_path=str(tmp_path / "model"), dataset_dir=str(tmp_path / "data"),
                  output_dir=str(tmp_path / "out"))
    try:
        build_config(values, name)
    except UserError as error:
        message = " ".join(str(error).split())
        assert "unknown key" not in message
        key = message.removeprefix(f"{name}: ").split(":")[0]
        assert key in REFUSED, message
        assert REFUSED[key] in message


@pytest.mark.parametrize("key, config, suggestion", [
    ("freeze_trainable_layer", {}, "freeze_trainable_layers"),  # a near miss of a key lmtune takes
    ("freeze_trainable_layer", {"freeze_trainable_layers": 2}, None),  # not a key the config already sets
    ("tokenized_pth", {}, None),  # not a key lmtune refuses (tokenized_path)
    ("learnig_rate", {}, "learning_rate"),
])
def test_did_you_mean_names_only_a_key_lmtune_takes_that_the_config_does_not_set(key, config, suggestion):
    from lmtune.config import build_config
    from lmtune.errors import UserError

    with pytest.raises(UserError) as raised:
        build_config({**config, key: 1})
    message = str(raised.value)
    assert f"unknown key '{key}'" in message
    assert (f"did you mean '{suggestion}'" in message) if suggestion else "did you mean" not in message


def test_disable_gradient_checkpointing_is_mapped():
    from lmtune.config import build_config

    assert build_config({"disable_gradient_checkpointing": True}).gradient_checkpointing is False
    assert build_config({"disable_gradient_checkpointing": False}).gradient_checkpointing is True


@pytest.mark.parametrize("key", ["use_dora", "use_rslora"])
def test_use_dora_and_use_rslora_train_the_peft_adapter_they_name(key, tmp_path, tiny_model_dir):
    from lmtune.config import build_config
    from lmtune.errors import UserError
    from lmtune.models import load_model, prepare_for_training

    config = build_config({"model_name_or_path": str(tiny_model_dir), key: True, "output_dir": str(tmp_path)})
    model = prepare_for_training(load_model(str(tiny_model_dir), config), config)
    lora = model.peft_config["default"]
    assert getattr(lora, key) is True
    other = "use_rslora" if key == "use_dora" else "use_dora"
    assert getattr(lora, other) is False
    if key == "use_dora":
        assert any("lora_magnitude_vector" in name for name, _ in model.named_parameters())
    with pytest.raises(UserError, match=f"{key} change LoRA adapters"):
        build_config({"finetuning_type": "full", key: True})


def test_a_dora_run_saves_a_dora_adapter(tiny_config, tmp_path):
    assert run_lmtune("train", tiny_config(finetuning_type="lora", use_dora=True, max_steps=2)) == 0
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True


@pytest.mark.parametrize("name", ["extras/loraplus/llama3_lora_sft.yaml", "extras/pissa/llama3_lora_sft.yaml",
                                  "extras/muon/qwen2_full_sft.yaml"])
def test_the_loraplus_pissa_and_muon_examples_train(name, tmp_path, tiny_model_dir, llamafactory_data):
    values = yaml.safe_load((EXAMPLES / name).read_text())
    values.update(model_name_or_path=str(tiny_model_dir), dataset_dir=str(llamafactory_data),
                  output_dir=str(tmp_path / "out"), preprocessing_num_workers=None, dataloader_num_workers=0,
                  placeholders={"name": "Lumi", "author": "us"}, max_samples=8)
    config = tmp_path / "example.yaml"
    config.write_text(yaml.safe_dump(values))
    assert run_lmtune("train", config, "max_steps=2", "bf16=false", "gradient_accumulation_steps=1") == 0
    assert [row["step"] for row in read_jsonl(tmp_path / "out" / "metrics.jsonl") if row["type"] == "train"][-1] == 2
