"""End to end: W&B logging (offline) and profiler traces of pretrain_amopo.py on a tiny Qwen2 model
(real Qwen2 tokenizer, shrunk; real HelpSteer2 rows: the session's ``tiny_run``) under torchrun on
2 gloo ranks."""

from __future__ import annotations

import collections
import glob
import json
import os
import sys

import pytest

from megatron_amopo.testing.pipeline import TINY_SEQ, run_torchrun

SEQ = TINY_SEQ
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def setup(tiny_run):
    return tiny_run


def train(setup, *flags: str, **kw):
    common = ["--load", str(setup / "init"), "--data-path", str(setup / "data"), "--micro-batch-size", "1"]
    common += ["--global-batch-size", "2", "--seq-length", str(SEQ), "--lr", "1e-3", "--lr-warmup-fraction", "0"]
    return run_torchrun("pretrain_amopo.py", *common, *flags, **kw)


def train_rows(run_dir) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return {r["iteration"]: r for r in rows if r["kind"] == "train"}


def test_profile_traces_exactly_the_chosen_steps_and_ranks_and_keeps_the_losses(setup, tmp_path):
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    train(setup, "--train-iters", "3", "--run-dir", str(plain))
    window = ["--profile-step-start", "2", "--profile-step-end", "3", "--profile-ranks", "1"]
    train(setup, "--train-iters", "3", "--run-dir", str(profiled), "--profile", *window, "--profile-record-shapes")
    traces = sorted(os.listdir(profiled / "profile"))
    assert traces == ["trace_rank1_steps2-3.json"]  # rank 0 was not asked for
    with open(profiled / "profile" / traces[0]) as fh:
        events = json.load(fh)["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("amopo_step_")}
    assert steps == {"amopo_step_2", "amopo_step_3"}
    ops = [e for e in events if e.get("cat") == "cpu_op" and e["name"].startswith("aten::")]
    assert any(e["name"] == "aten::mm" for e in ops), "the model's matrix products are in the trace"
    assert any(e.get("args", {}).get("Input Dims") for e in ops), "--profile-record-shapes records shapes"
    a, b = train_rows(plain), train_rows(profiled)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert [a[i]["loss"] for i in a] == [b[i]["loss"] for i in a]  # bit-identical with profiling on


def _wandb_records(path: str):
    """The records of an offline run's .wandb file, through W&B's own data-store reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(path)
    while (data := store.scan_data()) is not None:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        yield rec


def read_offline_run(path: str) -> tuple[str, str, str, dict, dict[int, dict]]:
    """Run id, project, name, config and history (step -> values) of one offline run's file."""
    run_id = project = name = ""
    config: dict = {}
    history: dict[int, dict] = collections.defaultdict(dict)
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id, project, name = rec.run.run_id, rec.run.project, rec.run.display_name
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            step = rec.history.step.num if rec.history.HasField("step") else row["_step"]
            history[int(step)].update({k: v for k, v in row.items() if not k.startswith("_")})
    return run_id, project, name, config, dict(history)


def tensorboard_scalars(run_dir) -> dict[int, dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[int, dict] = collections.defaultdict(dict)
    for tag in acc.Tags()["scalars"]:
        for ev in acc.Scalars(tag):
            out[ev.step][tag] = ev.value
    return dict(out)


def test_wandb_offline_logs_the_tensorboard_scalars_and_a_resume_continues_the_run(setup, tmp_path, monkeypatch):
    save = tmp_path / "run"
    flags = ["--save", str(save), "--train-iters", "3", "--split", "70,30", "--eval-interval", "2"]
    flags += ["--wandb-project", "amopo-e2e", "--wandb-exp-name", "tiny"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(setup, *flags, "--exit-interval", "2")  # stops after step 2 ...
    train(setup, *flags, "--load", str(save))  # ... and resumes from its checkpoint to step 3
    files = sorted(glob.glob(str(save / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2, files
    first, second = (read_offline_run(f) for f in files)
    assert first[0] and first[0] == second[0], "the resumed launch continues the same W&B run"
    assert first[1:3] == second[1:3] == ("amopo-e2e", "tiny")
    config = first[3]
    assert config["amopo"]["beta"] == 0.8 and config["logging"]["wandb_project"] == "amopo-e2e"
    assert config["derived"]["train_iters"] == 3
    assert sorted(first[4]) == [0, 1, 2] and sorted(second[4]) == [3]
    logged = {**first[4], **second[4]}
    tb = tensorboard_scalars(save)
    assert sorted(tb) == sorted(logged)
    for step, values in tb.items():
        assert set(values) == set(logged[step]), step  # the same scalars as TensorBoard, no more, no fewer
        for tag, v in values.items():
            assert logged[step][tag] == pytest.approx(v, rel=1e-6), (step, tag)  # TensorBoard stores float32
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/weight/general"} <= set(logged[3])
    assert {"valid/loss", "valid/accuracy/general"} <= set(logged[2])
    assert {"valid/loss", "train/loss"} <= set(logged[3])  # the final evaluation, after the last step
    assert logged[3]["train/loss"] == train_rows(save)[3]["loss"]


def test_wandb_without_the_package_is_refused_before_training(monkeypatch, capsys):
    """The entry point refuses --wandb-project when wandb cannot be imported: one line naming the extra, exit 2."""
    from megatron_amopo.cli import train

    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib finds no wandb
    code = train.main(["--load", "nowhere", "--train-iters", "1", "--micro-batch-size", "1", "--wandb-project", "p"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install -e '.[wandb]'" in err and len(err.strip().splitlines()) == 1, err
