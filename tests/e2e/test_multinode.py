"""A real two-node launch on one machine through examples/slurm/launch_node.sh.

The job script starts ``srun --ntasks-per-node=1 bash examples/slurm/launch_node.sh <flags>``; here
``srun`` is a local runner that starts that command once per node with the node's SLURM_NODEID, as SLURM
does, and waits for both. Each node's torchrun agent (``--nnodes 2``, its ``--node-rank``) starts two
gloo ranks, and the agents meet at a static rendezvous on 127.0.0.1: TP2 x DP2 over two "nodes", a few
steps and a save. tests/e2e/test_recipes.py checks the scripts' argv under a fake SLURM; this runs them.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess

import pytest
import torch

from megatron_amopo.testing.pipeline import PY, REPO, run_tool, tiny_qwen2_setup, write_shortest_rows

SEQ, STEPS, VOCAB, PROMPTS = 256, 3, 1024, 16
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

# SLURM's srun on one machine: the command once per node of the job, concurrently, with that node's ids.
LOCAL_SRUN = f"""#!{PY}
import os, sys
argv = sys.argv[1:]
while argv[0].startswith("-"):  # --ntasks-per-node=1 and the like: one task per node is all it does
    argv.pop(0)
nodes = int(os.environ["SLURM_NNODES"])
env = lambda n: dict(os.environ, SLURM_NODEID=str(n), SLURM_PROCID=str(n), SLURM_LOCALID="0")
pids = [os.spawnvpe(os.P_NOWAIT, argv[0], argv, env(n)) for n in range(nodes)]
sys.exit(max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_exe(path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    write_shortest_rows(root / "rows.jsonl", PROMPTS)
    tiny_qwen2_setup(root, root / "rows.jsonl", SEQ, vocab=VOCAB)
    return root


def test_two_torchrun_agents_train_and_save_through_launch_node(setup, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "srun", LOCAL_SRUN)
    write_exe(bin_dir / "torchrun", f'#!/usr/bin/env bash\nexec "{PY}" -m torch.distributed.run "$@"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "TORCHRUN"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="2",
        REPO=REPO,
        GPUS_PER_NODE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        LOG_DIR=str(tmp_path / "logs"),
        OMP_NUM_THREADS="1",
    )
    save = tmp_path / "run"
    flags = [
        "--load", str(setup / "init"), "--save", str(save), "--data-path", str(setup / "data"),
        "--tensor-model-parallel-size", "2", "--micro-batch-size", "1", "--global-batch-size", "2",
        "--train-iters", str(STEPS), "--seq-length", str(SEQ), "--lr", "1e-3", "--lr-warmup-fraction", "0",
        "--amopo-weighting", "equal", "--no-memory-check",
    ]  # fmt: skip
    cmd = ["srun", "--ntasks-per-node=1", "bash", f"{REPO}/examples/slurm/launch_node.sh", *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1000)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"

    # Both agents ran their two workers: torchrun's per-node log directories, one per local rank.
    for node in (0, 1):
        logs = list((tmp_path / "logs" / f"node{node}").rglob("stderr.log"))
        assert len(logs) == 2, (node, logs)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    train = [json.loads(line) for line in open(save / "metrics.jsonl") if '"train"' in line]
    assert [r["iteration"] for r in train] == list(range(1, STEPS + 1))

    # The TP2 checkpoint loads: exported to HF in one process, it holds trained, finite weights.
    from transformers import AutoModelForCausalLM

    run_tool([PY, "tools/convert_megatron_to_hf.py", "--load", str(save), "--save", str(tmp_path / "hf")], timeout=800)
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).state_dict()
    start = AutoModelForCausalLM.from_pretrained(str(setup / "hf"), dtype=torch.float32).state_dict()
    assert trained.keys() == start.keys()
    assert all(torch.isfinite(t).all() for t in trained.values())
    moved = [k for k in start if not torch.equal(trained[k], start[k])]
    assert len(moved) == len(start), sorted(set(start) - set(moved))
