"""LLaMA-Factory's own example configs (train_lora/llama3_lora_pretrain, train_lora/qwen3_lora_sft,
train_full/llama3_full_sft), written as they are, comments and section headers included, on data in
LLaMA-Factory's formats: `lmtune plan` and `lmtune train` take them."""

from __future__ import annotations

import json

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
    assert "config: ignored do_train" in plan and "config: ignored ddp_timeout" in plan
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


def test_the_full_sft_example_with_its_deepspeed_line_names_the_lmtune_way(tmp_path, tiny_model_dir,
                                                                           llamafactory_data, capsys):
    config, out = write(tmp_path, FULL_SFT, tiny_model_dir, llamafactory_data, deepspeed="")
    capsys.readouterr()
    assert run_lmtune("plan", config) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "deepspeed" in err and "torchrun --nproc_per_node N -m lmtune train" in err
    assert not out.exists()
