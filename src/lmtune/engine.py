"""The training loop, top to bottom.

    set up (devices, data, model, optimizer, schedule)  ->  for each optimizer step:
        take `gradient_accumulation_steps` micro-batches, count their trained tokens (their pairs or
        examples, for dpo, kto and rm) on all processes, forward + backward each with the loss divided
        by that count (every token or pair weighs the same), clip, step, schedule the LR, log, evaluate and save
        as the plan says
    ->  the final model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import resource
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch.utils.data import DataLoader

from lmtune.batching import Collator, Counts, EpochRows, batching_of, epoch_batches
from lmtune.callbacks import (
    CallbackList,
    LossPlot,
    MetricsFile,
    ProgressBar,
    RunState,
    TerminalLog,
    load_user_callbacks,
)
from lmtune.checkpoint import (
    FINAL_MARK,
    FINAL_TMP,
    PREFIX,
    CheckpointStore,
    DamagedCheckpoint,
    Snapshot,
    final_model_problems,
    has_content_hashes,
    is_complete_checkpoint,
    is_sharded,
    read_optimizer_state,
    read_state,
    write_final_model,
)
from lmtune.config import TrainConfig, field_meta, write_run_config
from lmtune.data import DataStats, ProcessedData, prepare_data
from lmtune.data.processing import rows_of_examples
from lmtune.data.registry import data_files
from lmtune.data.streaming import prepare_stream, stream_size, with_planned_steps
from lmtune.errors import RunFailed, Stopped, UserError
from lmtune.lr_schedule import build_scheduler, config_schedule, lr_at, resume_lr_lines, resumed_schedule
from lmtune.models import (
    count_parameters,
    inference_config,
    load_model,
    load_tokenizer,
    resolve_model_path,
    save_final_weights,
)
from lmtune.optimizers import build_optimizer
from lmtune.peers import Peers, init_method, named_failures, process_group_timeout, restarts
from lmtune.phases import PhaseClock, log_moment, resume_garbage_collection
from lmtune.planning import check_disk, checkpoint_bytes, final_model_bytes, plan_summary_lines
from lmtune.preference import precompute_reference, reference_for
from lmtune.resume import (
    ResumePoint,
    batch_lines,
    check_compatible,
    data_fingerprint,
    describe_changes,
    elastic_batch,
    epoch_origin,
    find_resume_point,
    last_trained_step,
    load_optimizer_state,
    load_sharded_checkpoint,
    load_weights,
    restart_details,
    restore_rng_of_process,
    rng_state,
    seed_everything,
    settle_data_position,
    truncate_metrics,
)
from lmtune.rewards import RewardFailed, check_reward_functions, load_reward_functions
from lmtune.runlock import RunLock, check_not_running
from lmtune.schedule import Plan, global_batch, make_plan
from lmtune.sharding import DataParallel, FullySharded, sharded_state, strategy_for, take_accelerate_fsdp
from lmtune.stages import stage_for
from lmtune.state import Schedule
from lmtune.trackers import tracker_callbacks

log = logging.getLogger("lmtune")

RUN_FILES = ("run_config.yaml", "metrics.jsonl", "checkpoints.json", "loss.png", "adapter_model.safetensors",
             "adapter_config.json", "model.safetensors", "config.json", FINAL_MARK)


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
    schedule: Schedule
    plan: Plan
    collator: Collator
    user_callbacks: list[Any]
    fingerprint: dict[str, str]
    to_clear: list[Path]  # an earlier run's files, removed (overwrite_output_dir) once the run holds the folder
    sharding: DataParallel | FullySharded
    resume: ResumePoint | None = None
    reference: Any = None  # dpo, kto, grpo: the model the loss compares with (None: none, or precomputed)
    rewards: list[Any] | None = None  # grpo: the reward functions, loaded and checked
    peers: Peers | None = None  # the other processes (None: one process)
    configured: TrainConfig | None = None  # the config as written, before an elastic restart changed it


def train(config: TrainConfig) -> Path:
    """Run `config` to the end; returns the output folder."""
    config = take_accelerate_fsdp(config)  # first: accelerate must not build an FSDP plugin of its own
    accelerator = accelerator_for(config)  # the process group, with ddp_timeout
    peers = Peers.start(config.ddp_timeout)
    with named_failures(peers):
        setup = set_up(config, accelerator, peers)
        config = setup.config
        state = RunState(config=config, output_dir=setup.output_dir,
                         is_main_process=setup.accelerator.is_main_process,
                         total_steps=setup.plan.total_steps, steps_per_epoch=setup.plan.steps_per_epoch)
        if setup.resume is not None:
            setup.resume.state.restore_into(state)
        state.schedule, state.data_fingerprint = setup.schedule, setup.fingerprint
        state.run_config = config.to_yaml_dict()
        return TrainingLoop(setup, state).run()


def accelerator_for(config: TrainConfig) -> Accelerator:
    timeout = InitProcessGroupKwargs(init_method=init_method(), timeout=process_group_timeout(config.ddp_timeout))
    return Accelerator(mixed_precision=_mixed_precision(config), step_scheduler_with_optimizer=False,
                       cpu=not torch.cuda.is_available(), kwargs_handlers=[timeout])


def set_up(config: TrainConfig, accelerator: Accelerator | None = None, peers: Peers | None = None) -> Setup:
    """Everything a run needs, every check made: config, data, model, callbacks, the checkpoint to resume
    and the disk. Nothing in output_dir is written or deleted here, so a refused run changes nothing."""
    clock = PhaseClock("set-up")
    config = configured = take_accelerate_fsdp(config)
    accelerator = accelerator or accelerator_for(config)
    sharding = strategy_for(config, accelerator.num_processes, bf16=_mixed_precision(config) == "bf16")
    output_dir = Path(config.output_dir)
    if peers is not None:
        peers.check_shared_folder(output_dir)
    check_not_running(output_dir)
    point = find_resume_point(config, output_dir)
    if point is not None and restarts(peers):
        config = elastic_batch(point, config, accelerator.num_processes)
    starts_fresh_here = point is None or point.path.parent.resolve() != output_dir.resolve()
    to_clear = _earlier_run_files(config, output_dir) if starts_fresh_here else []
    seed_everything(config.seed)
    clock.lap("accelerator, resume point")
    # each process on its own: a cache entry is built by one process while the others wait on its file lock
    model_path = resolve_model_path(config.model_name_or_path)
    tokenizer = load_tokenizer(model_path, config.trust_remote_code)
    clock.lap("tokenizer")
    data = _prepare_training_data(config, tokenizer, accelerator)
    if peers is not None:
        peers.wait_for_all("preparing the data")
    clock.lap("data")
    fingerprint = data_fingerprint(data_files(config), tokenizer)
    user_callbacks = load_user_callbacks(config.callbacks)
    rewards = _checked_rewards(config, data)
    if accelerator.is_main_process:
        from lmtune.data.preview import log_sample

        log_sample(config, data, tokenizer)  # preview_samples rows, rendered as `lmtune preview` does
    clock.lap("data fingerprint, callbacks, preview")
    model = load_model(model_path, config)
    if peers is not None:  # the set-up's collectives begin together: a slow load is no timeout
        peers.wait_for_all("loading the model")
        peers.doing("set-up (reference model, checkpoint, optimizer)")
    clock.lap("model")
    # before a checkpoint's weights are loaded into the model
    reference = _preference_reference(config, model, data, tokenizer, accelerator, peers)
    if point is not None:
        check_compatible(point, config, accelerator.num_processes)
        settle_data_position(point, None if config.streaming else len(data.train))
        if not is_sharded(point.path):
            load_weights(model, point)
    clock.lap("reference model, checkpoint weights")
    trainable, total = count_parameters(model)
    log.info("model %s: %s trainable of %s parameters (%s)", config.model_name_or_path, f"{trainable:,}",
             f"{total:,}", config.finetuning_type)
    plan_config = config if data.stream_info is None else with_planned_steps(config, data.stream_info,
                                                                              accelerator.num_processes)
    train_rows = None if config.streaming else len(data.train)
    plan = make_plan(plan_config, train_rows, accelerator.num_processes,
                     data.eval is not None, checkpoint_bytes=checkpoint_bytes(trainable, config, model_path),
                     final_model_bytes=final_model_bytes(trainable, total, config, model_path),
                     epoch_origin=epoch_origin(point, config, train_rows, accelerator.num_processes))
    if data.stream_info is not None:
        plan.stream = stream_size(config, data.stream_info, accelerator.num_processes)
    plan.batching = batching_of(config, data.stats.train_row_lengths, model)
    if accelerator.is_main_process:
        for line in plan_summary_lines(plan, config):
            log.info("%s", line)
    check_disk(plan, config, freed_bytes=sum(_size_of(path) for path in to_clear))
    clock.lap("plan")
    model, optimizer = sharding.prepare(accelerator, model, lambda wrapped: build_optimizer(wrapped, config))
    schedule = config_schedule(config, plan.total_steps)
    if point is not None:
        _load_trained_state(point, accelerator.unwrap_model(model), optimizer, sharding)
        schedule = resumed_schedule(point.state.schedule, config, plan.total_steps)
    scheduler = build_scheduler(optimizer, schedule, point.step if point is not None else 0)
    if point is not None:
        _log_resume_point(point, config, fingerprint, plan, accelerator)
        # last: nothing may draw from the RNG after it
        restore_rng_of_process(point, accelerator.process_index, config.seed)
    collator = Collator(tokenizer.pad_token_id, packed=config.use_packing,
                        padding_free=plan.batching["padding_free"])
    if config.stage == "grpo":
        from lmtune.grpo import PromptCollator

        collator = PromptCollator()  # the loader's micro-batches are prompts; the stage collates what it generates
    clock.lap("optimizer, schedule, checkpoint state")
    return Setup(accelerator, config, output_dir, tokenizer, data, model, optimizer, scheduler, schedule, plan,
                 collator, user_callbacks, fingerprint, to_clear, sharding, point, reference, rewards, peers,
                 configured)


def _checked_rewards(config: TrainConfig, data: ProcessedData) -> list[Any] | None:
    """grpo: the reward functions, each called on a dry run of the first rows (exit 2 naming a broken one)."""
    if config.stage != "grpo":
        return None
    import json

    rewards = load_reward_functions(config)
    first = [json.loads(text) for text in data.train.select(range(min(2, len(data.train))))["reward_inputs"]]
    check_reward_functions(rewards, [row["prompt"] for row in first], [row["columns"] for row in first])
    return rewards


def _preference_reference(config: TrainConfig, model: torch.nn.Module, data: ProcessedData, tokenizer: Any,
                          accelerator: Accelerator, peers: Peers | None) -> Any:
    """dpo, kto, grpo: the reference model, taken from the model as loaded; or the reference log-probabilities,
    computed with it once and added to the data (precompute_ref_log_probs)."""
    if not config.uses_reference:
        return None
    if config.precompute_ref_log_probs:
        if config.quantization_bit is None:
            model.to(accelerator.device)
        collator = Collator(tokenizer.pad_token_id, packed=False,
                            padding_free=batching_of(config, [], model)["padding_free"])
        precompute_reference(config, model, data, collator, accelerator)
        if peers is not None:
            peers.wait_for_all("computing the reference log-probabilities")
            peers.doing("set-up (checkpoint, optimizer)")
    return reference_for(model, config, accelerator.device)


def _load_trained_state(point: ResumePoint, model: torch.nn.Module, optimizer: Any,
                        sharding: DataParallel | FullySharded) -> None:
    """The optimizer state (and, from a sharded checkpoint, the weights: resharded to this run's processes)."""
    try:
        if is_sharded(point.path):
            load_sharded_checkpoint(model, optimizer, point)
        else:
            load_optimizer_state(optimizer, point, read_optimizer_state(point.path),
                                 sharding.optimizer_loader(model, optimizer))
    except DamagedCheckpoint as error:
        raise UserError(str(error)) from None


def _log_resume_point(point: ResumePoint, config: TrainConfig, fingerprint: dict[str, str], plan: Plan,
                      accelerator: Accelerator) -> None:
    if not accelerator.is_main_process:
        return
    log.info("resuming from %s at step %d", point.path, point.step)
    for line in describe_changes(point, config, fingerprint):
        log.info("changed since the checkpoint: %s", line)
    for line in batch_lines(point, config, accelerator.num_processes, plan.steps_per_epoch):
        log.info("%s", line)
    for line in resume_lr_lines(point.state.schedule, config, point.step, plan.total_steps):
        log.info("%s", line)


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


def _earlier_run_files(config: TrainConfig, output_dir: Path) -> list[Path]:
    """The files of an earlier run in output_dir: a fresh start there needs overwrite_output_dir, unless
    they are this run's own start (_stopped_before_its_first_checkpoint)."""
    existing = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    existing += sorted(output_dir.glob(f"{PREFIX}*")) + [p for p in [output_dir / "runs"] if p.exists()]
    if existing and not config.overwrite_output_dir and not _stopped_before_its_first_checkpoint(config, output_dir):
        names = ", ".join(sorted(p.name for p in existing)[:3])
        raise UserError(f"output_dir {output_dir} holds another run ({names}); choose another output_dir, or set "
                        "overwrite_output_dir: true to replace it")
    return existing


def _stopped_before_its_first_checkpoint(config: TrainConfig, output_dir: Path) -> bool:
    """The folder holds a run with this config (all but the keys that change nothing computed) that was
    stopped before it completed a checkpoint: the same command starts it again from step 0."""
    import yaml

    try:
        saved = yaml.safe_load((output_dir / "run_config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    if not isinstance(saved, dict) or (output_dir / FINAL_MARK).exists():
        return False
    if any(is_complete_checkpoint(folder) for folder in output_dir.glob(f"{PREFIX}*")):
        return False
    now = config.to_yaml_dict()
    return all(saved.get(key) == now[key] for key in now if field_meta(key).get("on_resume") != "neutral")


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class TrainingLoop:
    def __init__(self, setup: Setup, state: RunState):
        self.s = setup
        self.state = state
        self.accelerator = setup.accelerator
        self.config = setup.config
        self.metrics = MetricsFile(setup.output_dir / "metrics.jsonl")
        unwrapped = self.accelerator.unwrap_model(setup.model)
        training_collator = Collator(setup.tokenizer.pad_token_id, packed=False,
                                     padding_free=setup.plan.batching["padding_free"])
        self.stage = stage_for(setup.config, setup.model, unwrapped, setup.reference, setup.tokenizer, setup.rewards,
                               training_collator, self.accelerator, setup.output_dir)
        # of a batch: a sum over its trained tokens (sft, pt), its pairs (dpo), or its completions' tokens (grpo)
        self.loss = self.stage.loss
        self._restore_stage(setup.resume)
        self._finished_position = (state.data_epoch, state.data_rows)
        self._saved_step = state.step if setup.resume is not None else None  # the newest checkpoint's step
        self._interval = _Interval(state.samples_seen, state.tokens_seen)
        self._signals = _SignalStop()
        self._last_save_time = self._last_eval_time = time.monotonic()

    def _restore_stage(self, point: ResumePoint | None) -> None:
        """The stage's state of this process as the checkpoint saved it (grpo: the sampling RNG, the kept batch)."""
        saved = point.state.stage if point is not None else None
        if not saved or saved[0] is None:
            return
        if len(saved) != self.accelerator.num_processes:
            log.warning("the checkpoint's stage state is of %d processes, this run has %d: %s starts afresh",
                        len(saved), self.accelerator.num_processes, "the sampling RNG")
            return
        self.stage.load_state_dict(saved[self.accelerator.process_index])

    def _callbacks(self) -> list[Any]:
        if not self.accelerator.is_main_process:
            return self.s.user_callbacks
        built_in: list[Any] = [self.metrics, TerminalLog(), ProgressBar()]
        built_in += tracker_callbacks(self.config, self.s.output_dir)
        if self.config.plot_loss:
            built_in.append(LossPlot())
        return built_in + self.s.user_callbacks

    # --- the run ----------------------------------------------------------------------------------

    def run(self) -> Path:
        """The run, with `train.pid` in its folder while the main process writes there. Only once the
        folder is held is an earlier run cleared (overwrite_output_dir), and only by the main process."""
        if not self.accelerator.is_main_process:
            return self._run()
        with RunLock(self.s.output_dir):
            self._clear_earlier_files()
            return self._run()

    def _clear_earlier_files(self) -> None:
        """An earlier run's files (overwrite_output_dir), and what a crashed or failed save left behind."""
        leftovers = list(self.s.output_dir.glob(f".{PREFIX}*.tmp")) + list(self.s.output_dir.glob(f".{PREFIX}*.old"))
        leftovers += [p for p in [self.s.output_dir / FINAL_TMP] if p.exists()]
        for path in self.s.to_clear + leftovers:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if self.s.to_clear and self.config.overwrite_output_dir:
            log.info("overwrite_output_dir: removed the earlier run in %s", self.s.output_dir)
        elif self.s.to_clear:
            log.info("the run in %s was stopped before its first checkpoint: started again from step 0",
                     self.s.output_dir)

    def _run(self) -> Path:
        config, plan = self.config, self.s.plan
        self.store = CheckpointStore(self.s.output_dir, config.save_total_limit, config.metric_for_best_model,
                                     config.best_is_greater)
        finished = self.state.step >= self.state.total_steps or self._trained_all_passes(self.state.epoch)
        if self.s.resume is not None and finished:
            return self._already_complete()
        self.callbacks = CallbackList(self._callbacks())
        if self.accelerator.is_main_process:
            self.s.output_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(config, self.s.output_dir / "run_config.yaml")
            if self.s.resume is not None:
                self._log_resume(self.s.resume)
            log.info(
                "%s training %s, %s steps per epoch, %d steps; batch %d x %d accumulation x %d processes",
                "streamed" if config.streaming else len(self.s.data.train), config.sample_name,
                plan.steps_per_epoch or "unknown",
                plan.total_steps, config.per_device_train_batch_size,
                config.gradient_accumulation_steps, self.accelerator.num_processes,
            )
        self._doing("the start of training")
        self.accelerator.wait_for_everyone()
        self.callbacks.fire("on_train_begin", self.state, self.s.model)
        resume_garbage_collection()
        log_moment("the first optimizer step begins")
        self._start = time.monotonic() - self.state.elapsed_s
        with self._signals:
            for group in self.stage.groups(self._step_groups()):
                try:
                    self._optimizer_step(group)
                except RewardFailed:
                    self._stop_after_failure()
                    raise
                self._after_step()
                if self.state.should_stop:
                    break
            self.store.wait()
            if self._signals.requested and self.state.step < self.state.total_steps:
                self.callbacks.fire("on_train_end", self.state)
                raise Stopped(f"a resumable checkpoint of step {self.state.step} is in {self.s.output_dir}; "
                              "run the same command again to continue")
            if self._signals.requested:
                log.warning("the stop came during the last step: the run is finished, with its final model")
            self._signals.final_save = True
            self._save_final_model()
        self.callbacks.fire("on_train_end", self.state)
        return self.s.output_dir

    def _stop_after_failure(self) -> None:
        """A reward function failed before the step changed anything: a resumable checkpoint of the last
        finished step (the data position put back to where that step left it), as a signal's stop writes."""
        self.state.data_epoch, self.state.data_rows = self._finished_position
        if self.state.step > 0 and self.state.step != self._saved_step:
            self._save_checkpoint(["error"])
        self.store.wait()
        self.callbacks.fire("on_train_end", self.state)
        log.error("a resumable checkpoint of step %d is in %s; fix the reward function and run the same command "
                  "again to continue", self.state.step, self.s.output_dir)

    def _already_complete(self) -> Path:
        """A finished run is finished only if its final model is whole; if not, it is written again."""
        problems = final_model_problems(self.s.output_dir, marked=has_content_hashes(self.s.resume.path))
        if not problems:
            log.info("the run is already complete at step %d; nothing to do (raise max_steps or num_train_epochs "
                     "to go on, or set overwrite_output_dir: true to start over)", self.state.step)
            return self.s.output_dir
        log.warning("the run is complete at step %d but its final model is not whole (%s): writing it again from %s",
                    self.state.step, "; ".join(problems), self.s.resume.path.name)
        self._write_final_model()
        return self.s.output_dir

    def _log_resume(self, point: ResumePoint) -> None:
        reached = last_trained_step(self.metrics.path)  # before the rows past the checkpoint go
        truncate_metrics(self.metrics.path, point.step)
        if restarts(self.s.peers):
            details = restart_details(point, self.s.configured, self.config, self.accelerator.num_processes,
                                      restarts(self.s.peers), reached)
            log.warning("%s", details["line"])
            self.metrics.event(self.state, "restart", **details)
        for folder, problems in point.skipped:
            self.metrics.event(self.state, "checkpoint_skipped", path=folder, problems=problems)
        details: dict[str, Any] = {"from": str(point.path),
                                   "changes": describe_changes(point, self.config, self.s.fingerprint),
                                   "schedule": resume_lr_lines(point.state.schedule, self.config, point.step,
                                                               self.state.total_steps)}
        processes = self.accelerator.num_processes
        details["processes"] = {"saved": len(point.state.rng), "now": processes}
        details["batch"] = batch_lines(point, self.config, processes, self.s.plan.steps_per_epoch)
        lr_saved, lr_now = lr_at(point.state.schedule, point.step), self.s.scheduler.get_last_lr()[0]
        if lr_saved != lr_now:
            details["lr_old"], details["lr_new"] = lr_saved, lr_now
        self.metrics.event(self.state, "resume", **details)

    def _step_groups(self) -> Iterator[list[tuple[dict, Counts]]]:
        """Micro-batches, `gradient_accumulation_steps` at a time, from the data position of the state (the
        rows of the epoch's order trained so far, on any number of processes); a step never spans two epochs.
        The position after each step is in the state once its micro-batches are handed out."""
        if self.config.streaming:
            yield from self._stream_groups()
            return
        accumulation, rows = self.config.gradient_accumulation_steps, len(self.s.data.train)
        step_rows = global_batch(self.config, self.accelerator.num_processes)
        epoch, start = self.state.data_epoch, min(self.state.data_rows, rows)
        while self.state.step < self.state.total_steps:
            group: list = []
            trained = start
            for batch in self._epoch_loader(epoch, start):
                group.append(batch)
                if len(group) == accumulation:
                    trained = min(trained + step_rows, rows)
                    self.state.data_epoch, self.state.data_rows = (epoch, trained) if trained < rows else (epoch + 1, 0)
                    yield group
                    group = []
                    if self.state.step >= self.state.total_steps:
                        return
            if group:
                self.state.data_epoch, self.state.data_rows = epoch + 1, 0
                yield group
            epoch, start = epoch + 1, 0

    def _stream_groups(self) -> Iterator[list[tuple[dict, Counts]]]:
        """A stream has no epochs: micro-batches in a row, from the position the checkpoint saved, until
        max_steps, or (a stream with num_samples hints and no max_steps) num_train_epochs passes trained."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        from lmtune.data.streaming import StreamBatches, StreamProgress

        workers = self.config.dataloader_num_workers
        self._stream_loader = StatefulDataLoader(
            self.s.data.train, batch_size=self.config.per_device_train_batch_size,
            collate_fn=StreamBatches(self.s.collator), num_workers=workers, pin_memory=torch.cuda.is_available(),
        )
        self._stream_progress = StreamProgress(max(1, workers), self.state.epoch or 0.0)
        if self.s.resume is not None:
            saved = self.s.resume.state.data_loader[self.accelerator.process_index]
            self._stream_loader.load_state_dict(saved)
            self._stream_progress.update(self.s.data.train.progress_in(saved, workers))
        self.state.stream_pass = self._stream_progress.passes_begun - 1  # follows from the epoch restored
        self._stream_size_told = False
        by_passes = self.config.max_steps is None
        batches = iter(self._stream_loader)
        while self.state.step < self.state.total_steps:
            try:
                group = [next(batches) for _ in range(self.config.gradient_accumulation_steps)]
            except StopIteration:
                raise UserError("the streamed data yields no example to train on: every row was dropped "
                                f"(is cutoff_len {self.config.cutoff_len} shorter than the prompts?)") from None
            self._stream_progress.update([progress for _, _, progress in group])
            self._note_stream_progress()
            if by_passes and self._passes_done():
                self.state.total_steps = self.state.step + 1  # this step ends the last pass: the run's last step
            yield [(batch, counts) for batch, counts, _ in group]
        if by_passes and not self._trained_all_passes(self._stream_progress.epoch):
            log.warning("the %d steps estimated from num_samples ended at epoch %.3f, before num_train_epochs %g: "
                        "the hint is smaller than the data (see the stream_size event for its measured size)",
                        self.state.step, self._stream_progress.epoch, self.config.num_train_epochs)

    def _trained_all_passes(self, epoch: float | None) -> bool:
        """A stream that num_train_epochs stops (it has no max_steps) has trained that many passes at `epoch`."""
        return (self.config.streaming and self.config.max_steps is None
                and (epoch or 0.0) >= self.config.num_train_epochs - 1e-9)

    def _passes_done(self) -> bool:
        """_trained_all_passes once the step ahead is trained, on any process (they all stop together)."""
        done = self._trained_all_passes(self._stream_progress.epoch)
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([int(done)], device=self.accelerator.device)
            done = bool(self.accelerator.reduce(flag, reduction="sum").item())
        return done

    def _note_stream_progress(self) -> None:
        """Say once that a pass's size is now exact, and say when a new pass begins to be trained."""
        progress = self._stream_progress
        if progress.exact and not self._stream_size_told:
            self._stream_size_told = True
            rows, examples = progress.size()
            share = "" if self.accelerator.num_processes == 1 else " in this process's share"
            log.info("the stream was read to its end: a pass holds exactly %s rows (%s examples)%s; the epoch "
                     "shown is exact from here on", f"{rows:,}", f"{examples:,}", share)
            if self.accelerator.is_main_process:
                self.metrics.event(self.state, "stream_size", rows=rows, examples=examples,
                                   processes=self.accelerator.num_processes)
        stream_pass = progress.passes_begun - 1
        if stream_pass > self.state.stream_pass:
            self.state.stream_pass = stream_pass
            log.info("every row of the stream was trained once: pass %d begins", stream_pass + 1)
            if self.accelerator.is_main_process:
                self.metrics.event(self.state, "stream_pass", stream_pass=stream_pass + 1)

    def _epoch_loader(self, epoch: int, start: int = 0) -> DataLoader:
        """This process's micro-batches of `epoch`, from row `start` of its order."""
        batches = epoch_batches(len(self.s.data.train), self.config.per_device_train_batch_size, self.config.seed,
                                epoch, self.accelerator.process_index, self.accelerator.num_processes, start=start)
        return self._loader(EpochRows(self.s.data.train), batches, epoch)

    def _loader(self, dataset: Any, batches: list[list[int]], epoch: int = 0) -> DataLoader:
        # Its own generator, so that creating the loader does not draw from the global RNG.
        return DataLoader(
            dataset, batch_sampler=batches, collate_fn=self.s.collator,
            num_workers=self.config.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.config.seed + epoch),
        )

    def _optimizer_step(self, group: list[tuple[dict, Counts]] | None) -> None:
        accelerator, model = self.accelerator, self.s.model
        self._doing(f"optimizer step {self.state.step + 1} (forward, backward, the gradient all-reduce)")
        model.train()
        group = self.stage.prepare(group, self.state.step)  # grpo: generated and scored here
        local = [sum(getattr(c, k) for _, c in group) for k in (self.loss.divided_by, "tokens", "samples")]
        counts = _to_device(torch.tensor(local, dtype=torch.float64), accelerator.device)
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")
            local = [int(n) for n in counts.tolist()]  # the global counts: one read, only with several processes
        divisor = counts[0].clamp(min=1)  # the loss's units (trained tokens, or pairs) in the whole step
        step_loss = torch.zeros(1 + len(self.loss.metric_names), device=accelerator.device)
        for index, (batch, _) in enumerate(group):
            batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
            last = index == len(group) - 1
            hold_back = self.s.sharding.no_sync(accelerator, model) if not last else contextlib.nullcontext()
            with hold_back, accelerator.autocast():
                loss = self.loss(model, batch) / divisor
                # The gradient is averaged over processes; the count above is already global.
                accelerator.backward(loss * accelerator.num_processes)
            step_loss[0] += loss.detach().float()
            if self.loss.metric_names:  # means over the step's units, as the loss
                step_loss[1:] += self.loss.metric_sums() / divisor
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = self.s.sharding.clip_grad_norm(accelerator, model, max_norm)
        lr = self.s.scheduler.get_last_lr()[0]
        self.s.optimizer.step()
        self.s.scheduler.step()
        self.s.optimizer.zero_grad(set_to_none=True)
        if accelerator.num_processes > 1:
            step_loss = accelerator.reduce(step_loss, reduction="sum")
        self._interval.add(step_loss, grad_norm, lr, samples=local[2], tokens=local[1])  # loss, then the metrics

    def _after_step(self) -> None:
        state, plan = self.state, self.s.plan
        state.step += 1
        self._finished_position = (state.data_epoch, state.data_rows)
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
        """Real epochs for data of known size; for a stream, the passes trained over this process's share
        (exact once it was read to its end, estimated before: see StreamProgress)."""
        if self.s.plan.steps_per_epoch:
            return (self.state.step - self.s.plan.epoch_origin) / self.s.plan.steps_per_epoch
        return self._stream_progress.epoch if self.config.streaming else None

    def _doing(self, operation: str) -> None:
        """Named for the error a frozen or lost process causes (see peers.py)."""
        if self.s.peers is not None:
            self.s.peers.doing(operation)

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
        losses, grad_norm, lr, tokens_per_s, seconds_per_step = interval.flush()
        loss = losses[0]
        row = {
            "type": "train", "step": state.step, "epoch": _round(state.epoch), "samples_seen": state.samples_seen,
            "tokens_seen": state.tokens_seen, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(state.elapsed_s, 2),
            "eta_s": round(seconds_per_step * (state.total_steps - state.step), 1),
            "mem_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        metrics = self.loss.reported_metrics(losses[1:])
        row.update(metrics)
        stage_metrics = self.stage.row_metrics(state.step, loss)
        row.update(stage_metrics)
        if torch.cuda.is_available():
            row["gpu_mem_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
            row["gpu_mem_reserved_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
            row["gpu_mem_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if self.config.streaming:
            row["stream_pass"] = state.stream_pass + 1
            row["epoch_estimated"] = not self._stream_progress.exact
        state.last_metrics.update(loss=loss, **metrics, **{k: v for k, v in stage_metrics.items() if v is not None})
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
        self._doing(f"the evaluation at step {self.state.step}")
        model.eval()
        names = self.loss.metric_names
        sums = torch.zeros(2 + len(names), device=accelerator.device, dtype=torch.float64)
        batches = epoch_batches(len(data), self.config.per_device_eval_batch_size, 0, 0,
                                accelerator.process_index, accelerator.num_processes, shuffle=False)
        with torch.no_grad():
            for batch, counts in self._loader(data, batches):
                batch = {key: value.to(accelerator.device) for key, value in batch.items()}
                with accelerator.autocast():
                    loss_sum = self.loss(model, batch)
                count = torch.tensor([getattr(counts, self.loss.divided_by)], dtype=torch.float64,
                                     device=accelerator.device)
                sums += torch.cat([loss_sum.double().view(1), count, self.loss.metric_sums().to(sums)])
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        means = (sums / sums[1].clamp(min=1)).tolist()
        eval_loss = means[0]
        self._last_eval_time = time.monotonic()
        row = {"type": "eval", "step": self.state.step, "epoch": _round(self.state.epoch), "eval_loss": eval_loss}
        row.update((f"eval_{name}", value) for name, value in self.loss.reported_metrics(means[2:]).items())
        self.state.last_metrics.update((key, value) for key, value in row.items() if key.startswith("eval_"))
        self.callbacks.fire("on_evaluate", self.state, row)
        self._save_if_best(eval_loss)

    def _save_if_best(self, eval_loss: float) -> None:
        self._evaluated_step = self.state.step  # only a checkpoint of this step carries these eval metrics
        metric = self.config.metric_for_best_model
        if metric is None:
            return
        value = self.state.last_metrics.get(metric, eval_loss)
        best = self.state.best_metric
        if best is None or (value > best if self.config.best_is_greater else value < best):
            self.state.best_metric = value
            self.state.save_reasons.add("best")

    # --- saving -----------------------------------------------------------------------------------

    def _save_checkpoint(self, reasons: list[str]) -> None:
        self._doing(f"saving {PREFIX}{self.state.step}")
        self._last_save_time = time.monotonic()
        self._saved_step = self.state.step
        positions = self._all_positions()  # every process takes part
        shards = self._start_shards() if self.s.sharding.sharded else None
        if self.accelerator.is_main_process:
            snapshot = self._snapshot(reasons, positions, shards)
            state_at_save = copy.copy(self.state)  # the writer reports when training has moved on

            def saved(path: Path, deleted_steps: list[int]) -> None:
                self._saved(state_at_save, reasons, path, deleted_steps)

            # the weights and optimizer state are copied on the writer thread; the next optimizer step waits for it
            self.store.save(snapshot, on_saved=saved, guard=self.s.optimizer if shards is None else None)
        elif shards is not None:
            self.store.hold(shards)
        self.accelerator.wait_for_everyone()

    def _start_shards(self) -> Any:
        """Every process's shard of the weights and optimizer state, copied and written in the background."""
        self.store.wait()  # one save in flight: every process waits for its part of the one before
        optimizer = None if self.config.save_only_model else self.s.optimizer
        state = sharded_state(self.accelerator.unwrap_model(self.s.model), optimizer)
        return self.store.start_shards(self.state.step, state, self.s.sharding.checkpoint_group,
                                       self.accelerator.is_main_process, guard=self.s.optimizer)

    def _saved(self, state: RunState, reasons: list[str], path: Path, deleted_steps: list[int]) -> None:
        """On the writer thread, once a checkpoint is complete (and rotation has run)."""
        self.metrics.event(state, "save", path=path.name, reasons=reasons)
        if deleted_steps:
            self.metrics.event(state, "rotation", deleted=[f"{PREFIX}{step}" for step in deleted_steps])
        self.callbacks.fire("on_save", state, path)

    def _snapshot(self, reasons: list[str], positions: tuple[list[dict], list[dict] | None, list | None],
                  shards: Any) -> Snapshot:
        state, model = self.state, self.accelerator.unwrap_model(self.s.model)
        weights, weights_name = checkpoint_tensors(model) if shards is None else (None, "")
        saved = state.saved_fields()
        saved.rng, saved.data_loader, saved.stage = positions
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
            optimizer=None if self.config.save_only_model or shards is not None else self.s.optimizer.state_dict(),
            state=saved, entry=entry, shards=shards,
        )

    def _all_positions(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, list[Any] | None]:
        """The RNG state of every process, in process order (each continues its own on resume), the
        position of each process's stream when the data is streamed, and each process's stage state (grpo)."""
        mine = {"rng": rng_state(), "data_loader": self._stream_loader.state_dict() if self.config.streaming else None,
                "stage": self.stage.state_dict()}
        every = [mine]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            every = gather_object([mine])
        loaders = [p["data_loader"] for p in every] if self.config.streaming else None
        stages = [p["stage"] for p in every] if every[0]["stage"] is not None else None
        return [p["rng"] for p in every], loaders, stages

    def _save_final_model(self) -> None:
        self._save_checkpoint(sorted(self.state.save_reasons | {"final"}))
        self.store.wait()
        self.accelerator.wait_for_everyone()
        self._write_final_model()

    def _write_final_model(self) -> None:
        """On the main process; a sharded model is gathered from every process first (all take part)."""
        self._doing("writing the final model")
        sharded = self.s.sharding.sharded
        if not (sharded or self.accelerator.is_main_process):
            return
        model = self.accelerator.unwrap_model(self.s.model)
        best = self.store.best_step() if self.config.load_best_model_at_end else None
        if sharded:
            from accelerate.utils import broadcast_object_list

            best = broadcast_object_list([best])[0]  # the main process's index knows it
        if best is not None and best != self.state.step:
            folder = self.s.output_dir / f"{PREFIX}{best}"
            point = ResumePoint(folder, read_state(folder))
            load_sharded_checkpoint(model, None, point) if is_sharded(folder) else load_weights(model, point)
            log.info("load_best_model_at_end: the final model is %s%d's (best %s); the last step's is %s%d",
                     PREFIX, best, self.config.metric_for_best_model, PREFIX, self.state.step)
        weights = self.s.sharding.full_state(model)
        if not self.accelerator.is_main_process:
            return
        model.config.use_cache = True  # training is over: the saved model generates with its KV cache

        def write_files(folder: Path) -> None:
            save_final_weights(model, folder, weights)
            self.s.tokenizer.save_pretrained(str(folder))

        try:
            write_final_model(self.s.output_dir, self.state.step, write_files)
        except Exception as error:  # a full disk, whichever library's error it comes as
            newest = self.store.index.newest_complete()
            raise RunFailed(f"writing the final model failed: {type(error).__name__}: {error}; the checkpoints "
                            f"written before are intact (newest: {newest.name if newest else 'none'}); run the "
                            "same command again to write it") from error
        log.info("final model written to %s", self.s.output_dir)


class _Interval:
    """Sums between two logging steps, kept on the device so the step does not wait for the host."""

    def __init__(self, samples_total: int = 0, tokens_total: int = 0) -> None:
        self.samples_total = samples_total
        self.tokens_total = tokens_total
        self._reset()

    def _reset(self) -> None:
        self.loss_sum: Any = 0.0  # the loss, then the loss's metrics
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

    def flush(self) -> tuple[list[float], float, float, float, float]:
        seconds = max(time.monotonic() - self.started, 1e-9)
        result = ((torch.as_tensor(self.loss_sum, dtype=torch.float64) / max(self.steps, 1)).view(-1).tolist(),
                  float(self.grad_norm), self.lr,
                  self.tokens / seconds, seconds / max(self.steps, 1))
        self._reset()
        return result


class _SignalStop:
    """SIGINT / SIGTERM: the first asks for a stop after the current step (with a checkpoint); a second
    stops at once, leaving the checkpoints already written as they are."""

    def __init__(self) -> None:
        self.requested = False
        self.final_save = False  # the last step is trained: a signal no longer stops before the final save
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
        name = signal.Signals(signum).name
        if self.requested:
            os.write(2, f"stopped: a second {name}: stopped at once; the checkpoints already written are intact, "
                        "run the same command again to continue\n".encode())
            os._exit(130)
        self.requested = True
        if self.final_save:
            log.warning("%s during the final save: it is finished first (send it again to stop at once; the same "
                        "command then writes it again)", name)
        else:
            log.warning("%s: stopping after this step with a checkpoint (send it again to stop at once)", name)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto the device without waiting for the device: a plain copy to a GPU first waits
    for every kernel already queued, which would stop the host from running ahead by a step."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def checkpoint_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The live tensors a checkpoint holds (the writer thread copies them), and the file they go to."""
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        # from the trained parameters, not model.state_dict(): taking the state dict of a bitsandbytes 4-bit
        # layer lays its weights out anew, and the following steps would compute differently
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        state = get_peft_model_state_dict(model, state_dict=trained)
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
