"""More than one machine, simulated on this one: two torchrun launchers on a loopback rendezvous act as two
nodes (gloo, one process each). A run over them trains as one node with two processes; a killed process is
restarted by torchrun and the run goes on exactly; a frozen process stops the others within ddp_timeout with
an error that names it; when its node is lost for good, the other goes on alone from the newest checkpoint
with the same global batch; nodes that do not share output_dir are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import free_port, read_jsonl, torchrun_command
from test_reshard import assert_within_float_noise, train_losses
from test_resume import final_weights

# Each process writes its pid, its launcher's and its rank, and the examples (token ids) each step trained, in
# files named by its pid. With PROBE_SLOW set, the steps of two processes are slowed down, so that a process can
# be killed, or a node lost, in the middle of the run; one process alone goes at full speed.
NODE_PROBE = """
import json, os, time

class NodeProbe:
    def on_train_begin(self, state, model):
        name = os.path.join(state.output_dir, "worker-" + str(os.getpid()))
        with open(name + ".json", "w") as out:
            json.dump({"pid": os.getpid(), "launcher": os.getppid(), "rank": int(os.environ.get("RANK", "0"))}, out)
        self.rows_file = name + "-rows.jsonl"
        self.slow = bool(os.environ.get("PROBE_SLOW")) and os.environ.get("WORLD_SIZE") == "2"
        self.examples = []
        model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        if module.training:  # padding-free rows: an example starts where its position ids restart
            for ids, positions in zip(kwargs["input_ids"].tolist(), kwargs["position_ids"].tolist()):
                starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
                self.examples += [ids[a:b] for a, b in zip(starts, starts[1:])]

    def on_step_end(self, state, metrics):
        with open(self.rows_file, "a") as out:
            out.write(json.dumps({"step": state.step, "examples": self.examples}) + "\\n")
        self.examples = []
        if self.slow:
            time.sleep(1.0)
"""


def probe_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "node_probe.py").write_text(NODE_PROBE)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def workers(run: Path, besides: set[int] = frozenset()) -> dict[int, dict]:
    """pid -> pid, launcher and rank of each process that began training in `run`, but those in `besides`."""
    found = {int(path.stem.split("-")[1]): path for path in run.glob("worker-*.json")}
    return {pid: json.loads(path.read_text()) for pid, path in found.items() if pid not in besides}


def rows_of(run: Path, pids) -> dict[int, Counter]:
    """Step -> the examples the processes `pids` trained in it."""
    steps: dict[int, Counter] = {}
    for pid in pids:
        path = run / f"worker-{pid}-rows.jsonl"
        for row in read_jsonl(path) if path.exists() else []:
            steps.setdefault(row["step"], Counter()).update(tuple(example) for example in row["examples"])
    return steps


def node(config: Path, port: int, host: bool, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """One node's launcher: `torchrun --nnodes 1:2 --max-restarts 2`, one process, c10d rendezvous on loopback
    (`host`: this node's launcher holds the rendezvous store)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               "--rdzv-conf", f"is_host={int(host)},last_call_timeout=8", "--max-restarts", "2",
               "-m", "lmtune", "train", str(config)]
    return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))


def wait_for(predicate, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def restarts_of(run: Path) -> list[dict]:
    metrics = run / "metrics.jsonl"
    return [row for row in read_jsonl(metrics) if row.get("event") == "restart"] if metrics.exists() else []


def test_two_nodes_train_as_one_node_a_killed_process_restarts_exactly_a_lost_node_is_named_and_left(
        tiny_config, tmp_path):
    """Node b's process is killed (SIGKILL) and both nodes' launchers start their process again; later node b's
    process freezes (SIGSTOP) in the middle of the run, then node b is lost for good (SIGKILL, launcher too)."""
    # 32 rows, 4 x 1 x 2 = 8 rows a step: 4 steps an epoch, 8 steps, a checkpoint every 2
    settings = dict(num_train_epochs=2, save_steps=2, ddp_timeout=15, callbacks=["node_probe:NodeProbe"])
    env = probe_env(tmp_path)
    straight = tmp_path / "straight"  # one node, two processes: trained meanwhile, while the nodes wait
    straight_config = tiny_config(output_dir=str(straight), **settings).rename(tmp_path / "straight.yaml")
    straight_run = subprocess.Popen(torchrun_command(straight_config), env=env, stdout=subprocess.DEVNULL,
                                    stderr=(tmp_path / "straight.log").open("w"))

    run, log_a = tmp_path / "nodes", tmp_path / "node-a.log"
    config = tiny_config(output_dir=str(run), **settings)
    port, env["PROBE_SLOW"] = free_port(), "1"
    node_a = node(config, port, True, log_a, env)
    node_b = node(config, port, False, tmp_path / "node-b.log", env)
    wait_for(lambda: 3 in rows_of(run, workers(run)) and (run / "checkpoint-2").exists(), "step 3 on two nodes")
    first = workers(run)
    os.kill(next(pid for pid, w in first.items() if w["launcher"] == node_b.pid), signal.SIGKILL)
    wait_for(lambda: restarts_of(run) and len(workers(run, first)) == 2, "both nodes' processes started again")
    second = workers(run, first)
    killed_at = restarts_of(run)[0]["step"]
    saved = killed_at + 2  # a checkpoint written after the restart, and a step trained after it
    wait_for(lambda: (run / f"checkpoint-{saved}").exists() and saved + 1 in rows_of(run, second), f"step {saved + 1}")
    frozen = next(w for w in second.values() if w["launcher"] == node_b.pid)
    os.kill(frozen["pid"], signal.SIGSTOP)
    waiting = 1 - frozen["rank"]
    wait_for(lambda: f"failed: process {waiting} waited" in " ".join(log_a.read_text().split()),
             "node a's process to give up", timeout=120)
    os.kill(frozen["pid"], signal.SIGKILL)  # node b is gone for good: its process and its launcher
    os.killpg(node_b.pid, signal.SIGKILL)
    node_b.wait()
    assert node_a.wait(timeout=300) == 0, log_a.read_text()[-3000:]
    assert straight_run.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    third = workers(run, set(first) | set(second))

    # the kill: both nodes' processes started again from the newest checkpoint and trained on as if never stopped
    log = " ".join(log_a.read_text().split())
    killed, lost = restarts_of(run)
    assert killed["processes"] == {"saved": 2, "now": 2} and killed["global_batch"] == {"saved": 8, "now": 8}
    assert killed["steps_lost"] == killed["reached_step"] - killed_at
    assert "(torchrun): 2 processes -> 2, gradient_accumulation_steps 1 -> 1, global batch kept 8" in log
    for name, tensor in final_weights(straight / f"checkpoint-{saved}").items():
        assert torch.equal(final_weights(run / f"checkpoint-{saved}")[name], tensor), name  # bit for bit

    # the freeze: node a's process waited ddp_timeout (not torch's default of 30 minutes) and named node b's
    assert "(ddp_timeout 15 s) in optimizer step" in log
    assert float(log.split(f"failed: process {waiting} waited ")[1].split(" s")[0]) >= 15
    assert f"process {frozen['rank']} gave no sign of life in the last" in log
    # the loss: node a went on alone from the newest checkpoint, with twice the accumulation
    resumed = lost["step"]
    assert resumed == saved and lost["processes"] == {"saved": 2, "now": 1}
    assert lost["gradient_accumulation_steps"] == {"saved": 1, "config": 1, "now": 2}
    assert lost["global_batch"] == {"saved": 8, "now": 8}
    assert lost["steps_lost"] == lost["reached_step"] - resumed >= 1
    assert "(torchrun): 2 processes -> 1, gradient_accumulation_steps 1 -> 2" in log

    # until the loss, two nodes trained as one node with two processes, the restart after the kill included:
    # the same losses, bit for bit
    expected, got = train_losses(straight), train_losses(run)
    assert [got[s] for s in range(1, resumed + 1)] == [expected[s] for s in range(1, resumed + 1)]
    # after it, one process with twice the accumulation trains each step's very rows, once each
    straight_rows, starts = rows_of(straight, workers(straight)), [rows_of(run, w) for w in (first, second, third)]
    trained = {step: starts[0][step] for step in range(1, killed_at + 1)}
    trained |= {step: starts[1][step] for step in range(killed_at + 1, resumed + 1)} | starts[2]
    assert sorted(trained) == list(range(1, 9)) and min(starts[2]) == resumed + 1
    for step in trained:
        assert trained[step] == straight_rows[step], step
    for epoch in (range(1, 5), range(5, 9)):
        seen = sum((trained[s] for s in epoch), Counter())
        assert len(seen) == 32 and set(seen.values()) == {1}
    loss_difference, weight_difference = assert_within_float_noise(straight, run, 0)
    print("lost node: largest loss and final weight differences", f"{loss_difference:.2e} {weight_difference:.2e}")


def test_processes_that_do_not_see_the_same_output_dir_are_refused_before_training(tiny_config, tmp_path):
    """Two nodes with a disk each, simulated by a working folder each and a relative output_dir."""
    config = tiny_config(output_dir="run", max_steps=1)
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    script = f"cd {tmp_path}/node$LOCAL_RANK && exec {sys.executable} -m lmtune train {config}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "--no-python", "sh", "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert "error: output_dir run is not one folder for all processes" in message
    assert "process 0 on" in message and "does not see those of processes [1]" in message
    assert "exitcode: 2" in message
    assert [list((tmp_path / f"node{rank}").iterdir()) for rank in (0, 1)] == [[], []]  # nothing written


@pytest.mark.parametrize(("saved", "processes", "configured", "expected"), [
    ((4, 1, 2), 1, 1, 2),  # a node of two lost: twice the accumulation
    ((4, 2, 1), 2, 1, 1),  # it joined again: the accumulation goes back
    ((4, 2, 1), 1, 1, 2),  # restarted again on one node: the checkpoint's global batch, not the config's
    ((4, 1, 3), 2, 1, 1),  # 12 rows do not split into steps of 4 x 2: the config's accumulation
    ((2, 2, 2), 1, 1, 1),  # per_device_train_batch_size changed (2 -> 4): the config as written
])
def test_an_elastic_restart_keeps_the_checkpoint_global_batch_where_it_divides(saved, processes, configured,
                                                                               expected, tmp_path):
    from lmtune.config import TrainConfig
    from lmtune.resume import ResumePoint, elastic_batch
    from lmtune.state import TrainState

    per_device, accumulation, written_by = saved
    state = TrainState(step=2, rng=[{}] * written_by, run_config={"per_device_train_batch_size": per_device,
                                                                  "gradient_accumulation_steps": accumulation})
    config = TrainConfig(model_name_or_path=str(tmp_path), dataset="d", output_dir=str(tmp_path / "run"),
                         per_device_train_batch_size=4, gradient_accumulation_steps=configured)
    chosen = elastic_batch(ResumePoint(tmp_path / "checkpoint-2", state), config, processes)
    assert chosen.gradient_accumulation_steps == expected


def test_the_data_is_prepared_once_while_the_other_processes_wait_on_its_lock(tiny_config, tokenizer, monkeypatch,
                                                                              caplog):
    """Four processes of a node (threads here: each takes the file lock on a file of its own) start at once."""
    import threading

    import lmtune.data.processing as processing
    from lmtune.config import load_config

    config = load_config(tiny_config(), [])
    process, calls = processing._process, []

    def slow_process(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(1.0)  # long enough for every other process to find the lock taken
        return process(*args, **kwargs)

    monkeypatch.setattr(processing, "_process", slow_process)
    results: list = []
    workers = [threading.Thread(target=lambda: results.append(processing.prepare_data(config, tokenizer)))
               for _ in range(4)]
    with caplog.at_level("INFO", logger="lmtune"):
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert len(calls) == 1 and len(results) == 4
    assert [len(data.train) for data in results] == [32] * 4
    assert sum("another process is preparing the processed data" in r.getMessage() for r in caplog.records) == 3


def test_each_start_names_itself_in_the_store_whatever_an_earlier_start_left_there():
    """torchrun's agent store outlives a restart: the name and the answers of the start before it are still
    there when process 1 of the next start (here first to arrive) looks."""
    import threading

    import torch.distributed as dist

    from lmtune.peers import name_this_start

    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False)
    store.set("lmtune/start", "earlier")
    store.set("lmtune/answer/1", json.dumps(["earlier", "its-nonce"]))
    store.set("lmtune/started", json.dumps({"name": "earlier", "nonces": {"1": "its-nonce"}}))
    names: dict[int, str] = {}
    deadline = time.monotonic() + 60
    late = threading.Thread(target=lambda: (time.sleep(0.5), names.update({0: name_this_start(store, 0, 2, deadline)})))
    early = threading.Thread(target=lambda: names.update({1: name_this_start(store, 1, 2, deadline)}))
    early.start()
    late.start()
    early.join()
    late.join()
    assert names[0] == names[1] != "earlier"
