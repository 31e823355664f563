"""More than one machine, simulated on this one: two torchrun launchers on a loopback rendezvous act as two
nodes (gloo, one process each). A run over them trains as one node with two processes; when one node is
lost for good, the other goes on alone from the newest checkpoint with the same global batch; a frozen
process stops the others with an error that names it; nodes that do not share output_dir are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from conftest import free_port, read_jsonl, torchrun, torchrun_command
from test_reshard import assert_within_float_noise, train_losses

from lmtune.checkpoint import verify_checkpoint

# Each worker writes its pid (and its launcher's) and the examples (token ids) each step trained, in a file
# of its own start (torchrun's restart count) and rank; the first start's steps are slowed down, so that a
# node can be lost in the middle of the run.
NODE_PROBE = '''
import json, os, time

class NodeProbe:
    def on_train_begin(self, state, model):
        self.start = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        tag = self.start + "-" + os.environ.get("RANK", "0")
        with open(os.path.join(state.output_dir, "pid-" + tag), "w") as out:
            json.dump({"pid": os.getpid(), "launcher": os.getppid()}, out)
        self.rows_file = os.path.join(state.output_dir, "trained-rows-" + tag + ".jsonl")
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
        if self.start == "0":
            time.sleep(float(os.environ.get("PROBE_STEP_SLEEP", "0")))
'''


def probe_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "node_probe.py").write_text(NODE_PROBE)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def rows_of(run: Path, start: int) -> dict[int, Counter]:
    """Step -> the examples all processes of torchrun's start `start` trained in it."""
    steps: dict[int, Counter] = {}
    for path in run.glob(f"trained-rows-{start}-*.jsonl"):
        for row in read_jsonl(path):
            steps.setdefault(row["step"], Counter()).update(tuple(example) for example in row["examples"])
    return steps


def node(config: Path, port: int, host: bool, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """One node's launcher: `torchrun --nnodes 1:2 --max-restarts 1`, one process, c10d rendezvous on loopback
    (`host`: this node's launcher holds the rendezvous store)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               "--rdzv-conf", f"is_host={int(host)},last_call_timeout=8", "--max-restarts", "1",
               "-m", "lmtune", "train", str(config)]
    return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))


def wait_for(predicate, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_two_nodes_train_as_one_node_and_one_node_goes_on_alone_when_the_other_is_lost(tiny_config, tmp_path):
    # 32 rows, 4 x 1 x 2 = 8 rows a step: 4 steps an epoch, 8 steps, a checkpoint every 2
    settings = dict(num_train_epochs=2, save_steps=2, ddp_timeout=30, callbacks=["node_probe:NodeProbe"])
    env = probe_env(tmp_path)
    straight = tmp_path / "straight"
    torchrun(tiny_config(output_dir=str(straight), **settings), env={"PYTHONPATH": env["PYTHONPATH"]})

    run = tmp_path / "nodes"
    config = tiny_config(output_dir=str(run), **settings)
    port, env["PROBE_STEP_SLEEP"] = free_port(), "1.0"
    node_a = node(config, port, True, tmp_path / "node-a.log", env)
    node_b = node(config, port, False, tmp_path / "node-b.log", env)
    wait_for(lambda: 3 in rows_of(run, 0) and (run / "checkpoint-2").exists(), "step 3 on two nodes")
    for pid_file in run.glob("pid-0-*"):  # node b is lost: its launcher and its worker
        worker = json.loads(pid_file.read_text())
        if worker["launcher"] == node_b.pid:
            os.kill(worker["pid"], signal.SIGKILL)
    os.killpg(node_b.pid, signal.SIGKILL)
    node_b.wait()
    assert node_a.wait(timeout=300) == 0, (tmp_path / "node-a.log").read_text()[-3000:]

    log = " ".join((tmp_path / "node-a.log").read_text().split())
    assert "a collective failed in optimizer step" in log
    rows = read_jsonl(run / "metrics.jsonl")
    restart = next(r for r in rows if r.get("event") == "restart")
    resumed = restart["step"]
    assert restart["processes"] == {"saved": 2, "now": 1}
    assert restart["gradient_accumulation_steps"] == {"saved": 1, "config": 1, "now": 2}
    assert restart["global_batch"] == {"saved": 8, "now": 8}
    assert restart["steps_lost"] == restart["reached_step"] - resumed >= 1
    assert "elastic restart 1 (torchrun): 2 processes -> 1, gradient_accumulation_steps 1 -> 2" in log

    # before the loss, two nodes trained as one node with two processes: the same losses, bit for bit
    expected, got = train_losses(straight), train_losses(run)
    assert [got[s] for s in range(1, resumed + 1)] == [expected[s] for s in range(1, resumed + 1)]
    # after it, one process with twice the accumulation trains each step's very rows, once each
    before, after, straight_rows = rows_of(run, 0), rows_of(run, 1), rows_of(straight, 0)
    trained = {step: before[step] for step in range(1, resumed + 1)} | after
    assert sorted(trained) == list(range(1, 9)) and min(after) == resumed + 1
    for step in trained:
        assert trained[step] == straight_rows[step], step
    for epoch in (range(1, 5), range(5, 9)):
        seen = sum((trained[s] for s in epoch), Counter())
        assert len(seen) == 32 and set(seen.values()) == {1}
    loss_difference, weight_difference = assert_within_float_noise(straight, run, 0)
    print("lost node: largest loss and final weight differences", f"{loss_difference:.2e} {weight_difference:.2e}")


def test_a_frozen_process_stops_the_other_naming_the_operation_and_the_process(tiny_config, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(max_steps=50, save_steps=1, ddp_timeout=8, callbacks=["node_probe:NodeProbe"])
    log = tmp_path / "torchrun.log"
    process = subprocess.Popen(torchrun_command(config), env=probe_env(tmp_path, PROBE_STEP_SLEEP="0.3"),
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    wait_for(lambda: (run / "checkpoint-2").exists() and (run / "pid-0-1").exists(), "checkpoint-2")
    frozen, waiting = (json.loads((run / f"pid-0-{rank}").read_text())["pid"] for rank in (1, 0))
    os.kill(frozen, signal.SIGSTOP)
    try:
        wait_for(lambda: not Path(f"/proc/{waiting}").exists() or _is_zombie(waiting), "process 0 to stop",
                 timeout=120)  # ddp_timeout is 8 s; torch's own default would be 30 minutes
    finally:
        os.kill(frozen, signal.SIGKILL)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    message = " ".join(log.read_text().split())
    assert "failed: process 0 waited" in message and "(ddp_timeout 8 s) in optimizer step" in message
    assert "process 1 gave no sign of life for" in message
    waited = float(message.split("failed: process 0 waited ")[1].split(" s")[0])
    assert waited >= 8
    newest = max((p for p in run.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
    assert verify_checkpoint(newest) == []


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


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
