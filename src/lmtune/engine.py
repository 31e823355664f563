"""The training loop, top to bottom.

    set up (devices, data, model, optimizer, schedule)  ->  for each optimizer step:
        take `gradient_accumulation_steps` micro-batches, count their trained tokens on all
        processes, forward + backward each with the loss divided by that count (every token
        weighs the same), clip, step, schedule the LR, log, evaluate and save as the plan says
    ->  the final model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import resource
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from lmtune.batching import Collator, Counts, epoch_batches
from lmtune.callbacks import (
    CallbackList,
    LossPlot,
    MetricsFile,
    ProgressBar,
    RunState,
    TerminalLog,
    load_user_callbacks,
)
from lmtune.checkpoint import PREFIX, CheckpointStore, Snapshot, cpu_copy
from lmtune.config import TrainConfig, write_run_config
from lmtune.data import DataStats, ProcessedData, prepare_data
from lmtune.data.processing import rows_of_examples
from lmtune.data.streaming import prepare_stream, stream_size
from lmtune.errors import Stopped, UserError
from lmtune.models import count_parameters, inference_config, load_model, load_tokenizer, resolve_model_path
from lmtune.planning import check_disk, checkpoint_bytes, plan_summary_lines
from lmtune.resume import (
    ResumePoint,
    describe_changes,
    find_resume_point,
    load_weights,
    restore_rng,
    rng_state,
    set_learning_rate_from,
    truncate_metrics,
)
from lmtune.runlock import RunLock
from lmtune.schedule import Plan, make_plan
from lmtune.trackers import tracker_callbacks

log = logging.getLogger("lmtune")

RUN_FILES = ("run_config.yaml", "metrics.jsonl", "checkpoints.json", "loss.png", "adapter_model.safetensors",
             "adapter_config.json", "model.safetensors", "config.json")


@dataclass
class Setup:
    accelerator: Accelerator
    config: TrainConfig
    output_dir: Path
    tokenizer: Any
    data: ProcessedData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: Plan
    collator: Collator
    resume: ResumePoint | None = None


def train(config: TrainConfig) -> Path:
    """Run `config` to the end; returns the output folder."""
    setup = set_up(config)
    state = RunState(config, setup.output_dir, setup.accelerator.is_main_process, setup.plan.total_steps,
                     setup.plan.steps_per_epoch)
    if setup.resume is not None:
        _restore_counters(state, setup.resume)
    return TrainingLoop(setup, state).run()


def _restore_counters(state: RunState, point: ResumePoint) -> None:
    saved = point.train_state
    state.step, state.epoch = point.step, saved.get("epoch")
    state.samples_seen, state.tokens_seen = saved["samples_seen"], saved["tokens_seen"]
    state.elapsed_s, state.best_metric = saved.get("elapsed_s", 0.0), saved.get("best_metric")
    state.last_metrics = dict(saved.get("last_metrics", {}))


def set_up(config: TrainConfig) -> Setup:
    accelerator = Accelerator(mixed_precision=_mixed_precision(config), step_scheduler_with_optimizer=False,
                              cpu=not torch.cuda.is_available())
    output_dir = Path(config.output_dir)
    point = find_resume_point(config, output_dir)
    if point is None or point.path.parent.resolve() != output_dir.resolve():
        _check_output_dir(config, output_dir)
    _seed_everything(config.seed)
    with accelerator.main_process_first():
        model_path = resolve_model_path(config.model_name_or_path)
        tokenizer = load_tokenizer(model_path, config.trust_remote_code)
        data = _prepare_training_data(config, tokenizer, accelerator)
    if accelerator.is_main_process:
        from lmtune.data.preview import log_sample

        log_sample(config, data, tokenizer)  # preview_samples rows, rendered as `lmtune preview` does
    model = load_model(model_path, config)
    if point is not None:
        load_weights(model, point.path)
    trainable, total = count_parameters(model)
    log.info("model %s: %s trainable of %s parameters (%s)", config.model_name_or_path, f"{trainable:,}",
             f"{total:,}", config.finetuning_type)
    plan = make_plan(config, None if config.streaming else len(data.train), accelerator.num_processes,
                     data.eval is not None,
                     checkpoint_bytes=checkpoint_bytes(trainable, config))
    if data.stream_info is not None:
        plan.stream = stream_size(config, data.stream_info, accelerator.num_processes)
    if accelerator.is_main_process:
        for line in plan_summary_lines(plan, config):
            log.info("%s", line)
    check_disk(plan, config)
    optimizer = _optimizer(model, config)
    scheduler = _scheduler(optimizer, config, plan.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if point is not None:
        scheduler = _restore_training_state(point, config, optimizer, scheduler, plan, accelerator)
    collator = Collator(tokenizer.pad_token_id, packed=config.use_packing)
    return Setup(accelerator, config, output_dir, tokenizer, data, model, optimizer, scheduler, plan, collator,
                 point)


def _restore_training_state(point: ResumePoint, config: TrainConfig, optimizer: Any, scheduler: Any, plan: Plan,
                            accelerator: Accelerator) -> Any:
    """Optimizer, scheduler (or the config's new schedule) and, last of all, every RNG."""
    if accelerator.is_main_process:
        log.info("resuming from %s at step %d", point.path, point.step)
        for line in describe_changes(point, config):
            log.info("changed since the checkpoint: %s", line)
    optimizer.load_state_dict(torch.load(point.path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(point.path / "scheduler.pt", weights_only=False))
    if config.resume_lr == "config":
        old, scheduler = set_learning_rate_from(lambda: _scheduler(optimizer, config, plan.total_steps),
                                                optimizer, config, point.step)
        point.train_state["lr_change"] = [old, scheduler.get_last_lr()[0]]
        if accelerator.is_main_process:
            log.info("learning rate: %.3g -> %.3g (resume_lr: config)", old, scheduler.get_last_lr()[0])
    elif accelerator.is_main_process and point.saved_config.get("learning_rate") != config.learning_rate:
        log.info("learning_rate in the config differs from the checkpoint's; resume_lr: keep continues the saved "
                 "schedule (lr now %.3g); set resume_lr: config to apply the new one", scheduler.get_last_lr()[0])
    restore_rng(point.path, accelerator.process_index)
    return scheduler


def _prepare_training_data(config: TrainConfig, tokenizer: Any, accelerator: Accelerator) -> ProcessedData:
    if not config.streaming:
        return prepare_data(config, tokenizer)
    stream, info = prepare_stream(config, tokenizer, accelerator.process_index, accelerator.num_processes)
    evaluation = rows_of_examples(info.held_out, config) if info.held_out else None
    return ProcessedData(stream, evaluation, DataStats(), stream_info=info)


def _mixed_precision(config: TrainConfig) -> str:
    if not config.bf16:
        return "no"
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        log.warning("bf16: this GPU has no bfloat16; training in float32")
        return "no"
    return "bf16"


def _check_output_dir(config: TrainConfig, output_dir: Path) -> None:
    existing = [name for name in RUN_FILES if (output_dir / name).exists()] + [
        p.name for p in output_dir.glob(f"{PREFIX}*")
    ]
    if not existing:
        return
    if not config.overwrite_output_dir:
        raise UserError(
            f"output_dir {output_dir} holds another run ({', '.join(sorted(existing)[:3])}); choose another "
            "output_dir, or set overwrite_output_dir: true to replace it"
        )
    for name in existing:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(output_dir / "runs", ignore_errors=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_for(total_steps),
                         num_training_steps=total_steps)


class TrainingLoop:
    def __init__(self, setup: Setup, state: RunState):
        self.s = setup
        self.state = state
        self.accelerator = setup.accelerator
        self.config = setup.config
        self.metrics = MetricsFile(setup.output_dir / "metrics.jsonl")
        self.store = CheckpointStore(setup.output_dir, self.config.save_total_limit,
                                     self.config.metric_for_best_model)
        self.callbacks = CallbackList(self._callbacks())
        self._interval = _Interval(state.samples_seen, state.tokens_seen)
        self._signals = _SignalStop()
        self._last_save_time = self._last_eval_time = time.monotonic()

    def _callbacks(self) -> list[Any]:
        user = load_user_callbacks(self.config.callbacks)
        if not self.accelerator.is_main_process:
            return user
        built_in: list[Any] = [self.metrics, TerminalLog(), ProgressBar()]
        built_in += tracker_callbacks(self.config, self.s.output_dir)
        if self.config.plot_loss:
            built_in.append(LossPlot())
        return built_in + user

    # --- the run ----------------------------------------------------------------------------------

    def run(self) -> Path:
        """The run, with `train.pid` in its folder while the main process writes there."""
        if not self.accelerator.is_main_process:
            return self._run()
        with RunLock(self.s.output_dir):
            return self._run()

    def _run(self) -> Path:
        config, plan = self.config, self.s.plan
        if self.s.resume is not None and self.state.step >= self.state.total_steps:
            log.info("the run is already complete at step %d; nothing to do (raise max_steps or num_train_epochs "
                     "to go on, or set overwrite_output_dir: true to start over)", self.state.step)
            return self.s.output_dir
        if self.accelerator.is_main_process:
            self.s.output_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(config, self.s.output_dir / "run_config.yaml")
            if self.s.resume is not None:
                self._log_resume(self.s.resume)
            log.info(
                "%s training rows, %s steps per epoch, %d steps; batch %d x %d accumulation x %d processes",
                "streamed" if config.streaming else len(self.s.data.train), plan.steps_per_epoch or "unknown",
                plan.total_steps, config.per_device_train_batch_size,
                config.gradient_accumulation_steps, self.accelerator.num_processes,
            )
        self.accelerator.wait_for_everyone()
        self.callbacks.fire("on_train_begin", self.state, self.s.model)
        self._start = time.monotonic() - self.state.elapsed_s
        with self._signals:
            for group in self._step_groups():
                self._optimizer_step(group)
                self._after_step()
                if self.state.should_stop:
                    break
            self.store.wait()
            if self._signals.requested:
                self.callbacks.fire("on_train_end", self.state)
                raise Stopped(f"a resumable checkpoint of step {self.state.step} is in {self.s.output_dir}; "
                              "run the same command again to continue")
            self._save_final_model()
        self.callbacks.fire("on_train_end", self.state)
        return self.s.output_dir

    def _log_resume(self, point: ResumePoint) -> None:
        truncate_metrics(self.metrics.path, point.step)
        details = {"from": str(point.path), "changes": describe_changes(point, self.config)}
        if "lr_change" in point.train_state:
            details["lr_old"], details["lr_new"] = point.train_state["lr_change"]
        self.metrics.event(self.state, "resume", **details)

    def _step_groups(self) -> Iterator[list[tuple[dict, Counts]]]:
        """Micro-batches, `gradient_accumulation_steps` at a time; a step never spans two epochs."""
        if self.config.streaming:
            yield from self._stream_groups()
            return
        accumulation = self.config.gradient_accumulation_steps
        per_epoch = self.state.steps_per_epoch
        epoch, skip = (self.state.step // per_epoch, self.state.step % per_epoch) if per_epoch else (0, 0)
        while self.state.step < self.state.total_steps:
            group: list = []
            for batch in self._epoch_loader(epoch, skip_micro_batches=skip * accumulation):
                group.append(batch)
                if len(group) == accumulation:
                    yield group
                    group = []
                    if self.state.step >= self.state.total_steps:
                        return
            if group:
                yield group
            epoch, skip = epoch + 1, 0

    def _stream_groups(self) -> Iterator[list[tuple[dict, Counts]]]:
        """A stream has no epochs: micro-batches in a row, from the position the checkpoint saved."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        self._stream_loader = StatefulDataLoader(
            self.s.data.train, batch_size=self.config.per_device_train_batch_size, collate_fn=self.s.collator,
            num_workers=self.config.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
        )
        if self.s.resume is not None:
            states = torch.load(self.s.resume.path / "rng_state.pth", weights_only=False)
            self._stream_loader.load_state_dict(states[self.accelerator.process_index]["data_loader"])
        batches = iter(self._stream_loader)
        while self.state.step < self.state.total_steps:
            try:
                group = [next(batches) for _ in range(self.config.gradient_accumulation_steps)]
            except StopIteration:
                raise UserError("the streamed data yields no example to train on: every row was dropped "
                                f"(is cutoff_len {self.config.cutoff_len} shorter than the prompts?)") from None
            self.state.stream_position = max(counts.stream_position for _, counts in group)
            self._note_stream_pass(int(self.state.stream_position))
            yield group

    def _note_stream_pass(self, stream_pass: int) -> None:
        if stream_pass > self.state.stream_pass:
            self.state.stream_pass = stream_pass
            log.info("the stream ended and starts over: pass %d", stream_pass + 1)
            if self.accelerator.is_main_process:
                self.metrics.event(self.state, "stream_pass", stream_pass=stream_pass + 1)

    def _epoch_loader(self, epoch: int, skip_micro_batches: int = 0) -> DataLoader:
        batches = epoch_batches(len(self.s.data.train), self.config.per_device_train_batch_size, self.config.seed,
                                epoch, self.accelerator.process_index, self.accelerator.num_processes)
        return self._loader(self.s.data.train, batches[skip_micro_batches:], epoch)

    def _loader(self, dataset: Any, batches: list[list[int]], epoch: int = 0) -> DataLoader:
        # Its own generator, so that creating the loader does not draw from the global RNG.
        return DataLoader(
            dataset, batch_sampler=batches, collate_fn=self.s.collator,
            num_workers=self.config.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.config.seed + epoch),
        )

    def _optimizer_step(self, group: list[tuple[dict, Counts]]) -> None:
        accelerator, model = self.accelerator, self.s.model
        model.train()
        local = [sum(getattr(c, k) for _, c in group) for k in ("trained_tokens", "tokens", "samples")]
        counts = _to_device(torch.tensor(local, dtype=torch.float64), accelerator.device)
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")
            local = [int(n) for n in counts.tolist()]  # the global counts: one read, only with several processes
        trained_tokens = counts[0].clamp(min=1)
        step_loss = torch.zeros((), device=accelerator.device)
        for index, (batch, _) in enumerate(group):
            batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
            last = index == len(group) - 1
            with _maybe_no_sync(accelerator, model, skip=last), accelerator.autocast():
                loss = model(**batch, num_items_in_batch=trained_tokens).loss
                # The gradient is averaged over processes; the count above is already global.
                accelerator.backward(loss * accelerator.num_processes)
            step_loss += loss.detach().float()
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        lr = self.s.scheduler.get_last_lr()[0]
        self.s.optimizer.step()
        self.s.scheduler.step()
        self.s.optimizer.zero_grad(set_to_none=True)
        if accelerator.num_processes > 1:
            step_loss = accelerator.reduce(step_loss, reduction="sum")
        self._interval.add(step_loss, grad_norm, lr, samples=local[2], tokens=local[1])

    def _after_step(self) -> None:
        state, plan = self.state, self.s.plan
        state.step += 1
        state.samples_seen, state.tokens_seen = self._interval.samples_total, self._interval.tokens_total
        state.epoch = self._epoch_now()
        state.elapsed_s = time.monotonic() - self._start
        row = None
        if state.step % self.config.logging_steps == 0 or state.step == state.total_steps:
            row = self._train_row()
        state.save_reasons = set(plan.save_steps.get(state.step, []))
        self.callbacks.fire("on_step_end", state, row)
        if self._stop_requested():
            state.save_reasons.add("signal")
            state.should_stop = True
        if self._evaluation_due():
            self._evaluate()
        if self.config.save_minutes and time.monotonic() - self._last_save_time >= self.config.save_minutes * 60:
            state.save_reasons.add("minutes")
        if state.save_reasons and state.step != state.total_steps:
            self._save_checkpoint(sorted(state.save_reasons))

    def _epoch_now(self) -> float | None:
        """Real epochs for data of known size; for a stream, an estimate: samples against the num_samples
        hint of dataset_info.json, or else the bytes read so far against the size of the files."""
        if self.s.plan.steps_per_epoch:
            return self.state.step / self.s.plan.steps_per_epoch
        info = self.s.data.stream_info
        if info is not None and info.num_samples:
            return self.state.samples_seen / info.num_samples
        return self.state.stream_position if self.config.streaming else None

    def _stop_requested(self) -> bool:
        """Every process stops at the same step, when any of them was signalled."""
        flag = self._signals.requested
        if self.accelerator.num_processes > 1:
            flag = bool(self.accelerator.reduce(torch.tensor([int(flag)], device=self.accelerator.device),
                                                reduction="sum").item())
            self._signals.requested = flag
        return flag

    def _train_row(self) -> dict[str, Any]:
        state, interval = self.state, self._interval
        loss, grad_norm, lr, tokens_per_s, seconds_per_step = interval.flush()
        row = {
            "type": "train", "step": state.step, "epoch": _round(state.epoch), "samples_seen": state.samples_seen,
            "tokens_seen": state.tokens_seen, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(state.elapsed_s, 2),
            "eta_s": round(seconds_per_step * (state.total_steps - state.step), 1),
            "mem_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if torch.cuda.is_available():
            row["gpu_mem_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
            row["gpu_mem_reserved_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
            row["gpu_mem_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if self.config.streaming:
            row["stream_pass"] = state.stream_pass + 1
            if state.epoch is not None:
                row["epoch_estimated"] = True  # a stream's size is only ever estimated
        state.last_metrics["loss"] = loss
        return row

    # --- evaluation -------------------------------------------------------------------------------

    def _evaluation_due(self) -> bool:
        if self.s.data.eval is None:
            return False
        if self.state.step in self.s.plan.eval_steps:
            return True
        minutes = self.config.eval_minutes
        return bool(minutes) and time.monotonic() - self._last_eval_time >= minutes * 60

    def _evaluate(self) -> None:
        accelerator, model, data = self.accelerator, self.s.model, self.s.data.eval
        model.eval()
        sums = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
        batches = epoch_batches(len(data), self.config.per_device_eval_batch_size, 0, 0,
                                accelerator.process_index, accelerator.num_processes, shuffle=False)
        with torch.no_grad():
            for batch, counts in self._loader(data, batches):
                batch = {key: value.to(accelerator.device) for key, value in batch.items()}
                with accelerator.autocast():
                    loss_sum = model(**batch, num_items_in_batch=1).loss
                sums += torch.stack([loss_sum.double(), torch.tensor(counts.trained_tokens, dtype=torch.float64,
                                                                     device=accelerator.device)])
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        eval_loss = float(sums[0] / sums[1].clamp(min=1))
        self._last_eval_time = time.monotonic()
        row = {"type": "eval", "step": self.state.step, "epoch": _round(self.state.epoch), "eval_loss": eval_loss}
        self.state.last_metrics["eval_loss"] = eval_loss
        self.callbacks.fire("on_evaluate", self.state, row)
        self._save_if_best(eval_loss)

    def _save_if_best(self, eval_loss: float) -> None:
        self._evaluated_step = self.state.step  # only a checkpoint of this step carries these eval metrics
        metric = self.config.metric_for_best_model
        if metric is None:
            return
        value = self.state.last_metrics.get(metric, eval_loss)
        if self.state.best_metric is None or value < self.state.best_metric:
            self.state.best_metric = value
            self.state.save_reasons.add("best")

    # --- saving -----------------------------------------------------------------------------------

    def _save_checkpoint(self, reasons: list[str]) -> None:
        self._last_save_time = time.monotonic()
        rng = self._all_rng_states()  # every process takes part
        if self.accelerator.is_main_process:
            snapshot = self._snapshot(reasons, rng)
            state_at_save = copy.copy(self.state)  # the writer reports when training has moved on

            def saved(path: Path, deleted_steps: list[int]) -> None:
                self._saved(state_at_save, reasons, path, deleted_steps)

            # the weights and optimizer state are copied on the writer thread; the next optimizer step waits for it
            self.store.save(snapshot, on_saved=saved, guard=self.s.optimizer)
        self.accelerator.wait_for_everyone()

    def _saved(self, state: RunState, reasons: list[str], path: Path, deleted_steps: list[int]) -> None:
        """On the writer thread, once a checkpoint is complete (and rotation has run)."""
        self.metrics.event(state, "save", path=path.name, reasons=reasons)
        if deleted_steps:
            self.metrics.event(state, "rotation", deleted=[f"{PREFIX}{step}" for step in deleted_steps])
        self.callbacks.fire("on_save", state, path)

    def _snapshot(self, reasons: list[str], rng: list[dict[str, Any]]) -> Snapshot:
        state, model = self.state, self.accelerator.unwrap_model(self.s.model)
        weights, weights_name = _checkpoint_tensors(model)
        keep_optimizer = not self.config.save_only_model
        per_epoch = state.steps_per_epoch
        train_state = {
            "step": state.step, "epoch": state.epoch, "samples_seen": state.samples_seen,
            "tokens_seen": state.tokens_seen, "elapsed_s": state.elapsed_s, "best_metric": state.best_metric,
            "data_epoch": state.step // per_epoch if per_epoch else None,
            "data_steps_in_epoch": state.step % per_epoch if per_epoch else None,
            "last_metrics": dict(state.last_metrics), "config": self.config.to_yaml_dict(),
        }
        # eval metrics of an earlier step would make this checkpoint look as good as that one
        evaluated = getattr(self, "_evaluated_step", None) == state.step
        entry = {"step": state.step, "epoch": _round(state.epoch), "samples_seen": state.samples_seen,
                 "tokens_seen": state.tokens_seen, "reasons": reasons,
                 "metrics": {k: v for k, v in state.last_metrics.items()
                             if v is not None and (evaluated or not k.startswith("eval"))}}
        tokenizer = self.s.tokenizer
        return Snapshot(
            step=state.step, weights=weights, weights_name=weights_name,
            write_model_files=lambda folder: _write_model_files(model, tokenizer, folder),
            optimizer=self.s.optimizer.state_dict() if keep_optimizer else None,
            scheduler=cpu_copy(self.s.scheduler.state_dict()) if keep_optimizer else None,
            rng=rng, train_state=train_state, entry=entry,
        )

    def _all_rng_states(self) -> list[dict[str, Any]]:
        """The RNG state of every process, in process order (each continues its own on resume), with the
        position of its stream when the data is streamed."""
        mine = rng_state()
        if self.config.streaming:
            mine["data_loader"] = self._stream_loader.state_dict()
        if self.accelerator.num_processes == 1:
            return [mine]
        from accelerate.utils import gather_object

        return gather_object([mine])

    def _save_final_model(self) -> None:
        self._save_checkpoint(sorted(self.state.save_reasons | {"final"}))
        self.store.wait()
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        model = self.accelerator.unwrap_model(self.s.model)
        model.config.use_cache = True  # training is over: the saved model generates with its KV cache
        model.save_pretrained(str(self.s.output_dir), safe_serialization=True)
        self.s.tokenizer.save_pretrained(str(self.s.output_dir))
        log.info("final model written to %s", self.s.output_dir)


class _Interval:
    """Sums between two logging steps, kept on the device so the step does not wait for the host."""

    def __init__(self, samples_total: int = 0, tokens_total: int = 0) -> None:
        self.samples_total = samples_total
        self.tokens_total = tokens_total
        self._reset()

    def _reset(self) -> None:
        self.loss_sum: Any = 0.0
        self.steps = 0
        self.tokens = 0
        self.started = time.monotonic()
        self.grad_norm: Any = 0.0
        self.lr = 0.0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, samples: int, tokens: int) -> None:
        self.loss_sum = self.loss_sum + loss
        self.grad_norm, self.lr = grad_norm, lr
        self.steps += 1
        self.samples_total += samples
        self.tokens_total += tokens
        self.tokens += tokens

    def flush(self) -> tuple[float, float, float, float, float]:
        seconds = max(time.monotonic() - self.started, 1e-9)
        result = (float(self.loss_sum) / max(self.steps, 1), float(self.grad_norm), self.lr,
                  self.tokens / seconds, seconds / max(self.steps, 1))
        self._reset()
        return result


class _SignalStop:
    """SIGINT / SIGTERM: the first asks for a stop after the current step (with a checkpoint); a second
    stops at once, leaving the checkpoints already written as they are."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalStop:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            os._exit(130)
        self.requested = True
        log.warning("%s: stopping after this step with a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto the device without waiting for the device: a plain copy to a GPU first waits
    for every kernel already queued, which would stop the host from running ahead by a step."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _maybe_no_sync(accelerator: Accelerator, model: torch.nn.Module, skip: bool):
    from contextlib import nullcontext

    if skip or accelerator.num_processes == 1:
        return nullcontext()
    return accelerator.no_sync(model)


def _checkpoint_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The live tensors a checkpoint holds (the writer thread copies them), and the file they go to."""
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        state = get_peft_model_state_dict(model)
        return {k: v.detach() for k, v in state.items()}, "adapter_model.safetensors"
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen:  # tied weights are written once
            continue
        seen.add(value.data_ptr())
        state[key] = value.detach()
    return state, "model.safetensors"


def _write_model_files(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.peft_config["default"].save_pretrained(str(folder))
    else:
        inference_config(model.config).save_pretrained(str(folder))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

