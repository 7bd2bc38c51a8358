"""Flags generated from the config dataclasses, YAML run files mapping onto the same fields."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_amopo.config import run_arg_parser, run_config_from_args
from megatron_amopo.runtime.errors import UsageError


def parse(argv):
    return run_config_from_args(run_arg_parser().parse_args(argv))


def test_flags_reach_their_fields():
    cfg = parse(
        [
            "--micro-batch-size",
            "2",
            "--train-iters",
            "3",
            "--amopo-beta",
            "2.5",
            "--amopo-loss",
            "orpo",
            "--amopo-seed",
            "9",
            "--seed",
            "5",
            "--tensor-model-parallel-size",
            "2",
            "--sequence-parallel",
            "--amopo-weighting",
            "fixed",
            "--amopo-fixed-weights",
            "1",
            "2",
            "3",
            "4",
            "--lr",
            "1e-5",
            "--use-distributed-optimizer",
        ]
    )
    assert (cfg.training.micro_batch_size, cfg.training.train_iters, cfg.training.seed) == (2, 3, 5)
    assert (cfg.amopo.beta, cfg.amopo.loss_type, cfg.amopo.seed) == (2.5, "orpo", 9)
    assert cfg.amopo.fixed_weights == [1.0, 2.0, 3.0, 4.0]
    assert cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.optimizer.lr == 1e-5 and cfg.training.use_distributed_optimizer


def test_yaml_supplies_fields_and_flags_override(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("micro_batch_size: 4\ntrain_epochs: 3\namopo_gamma: 1.5\nlr: 3.0e-7\nseq_length: 512\n")
    cfg = parse(["--config", str(run), "--lr", "1e-6"])
    assert cfg.training.micro_batch_size == 4 and cfg.training.train_epochs == 3
    assert cfg.amopo.gamma == 1.5 and cfg.training.seq_length == 512
    assert cfg.optimizer.lr == 1e-6  # the command line wins


def test_yaml_unknown_key_is_named(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("micro_batch_size: 4\ntrain_iters: 2\nlearning_rate: 1.0\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rate'\]"):
        parse(["--config", str(run)])


@pytest.mark.parametrize(
    "argv, match",
    [
        ("--train-iters 2", "exactly one of --micro-batch-size"),
        ("--micro-batch-size 1", "exactly one of --train-iters or --train-epochs"),
        ("--micro-batch-size 1 --train-iters 2 --amopo-weighting fixed", "needs --amopo-fixed-weights"),
        ("--micro-batch-size 1 --train-iters 2 --split 95", "--split must be two non-negative numbers"),
        ("--micro-batch-size 1 --train-iters 2 --sequence-parallel", "--sequence-parallel needs"),
        ("--micro-batch-size 1 --train-iters 2 --wandb-exp-name x", "--wandb-exp-name needs --wandb-project"),
        ("--micro-batch-size 1 --train-iters 2 --profile-step-start 5 --profile-step-end 4", "--profile-step-start <="),
        ("--micro-batch-size 1 --train-iters 2 --profile-step-start 0", "1 <= --profile-step-start"),
    ],
)
def test_bad_flags_are_refused_before_any_work(argv, match):
    with pytest.raises(ValueError, match=match):
        parse(argv.split())


CHOICES = [  # (flag, a value outside its Literal choices)
    ("--amopo-loss", "dpo"),
    ("--amopo-weighting", "softmax"),
    ("--amopo-pair-reduction", "max"),
    ("--batch-layout", "dense"),
    ("--recompute-granularity", "some"),
    ("--lr-decay-style", "exp"),
    ("--distributed-backend", "mpi"),
]


@pytest.mark.parametrize("flag, value", CHOICES)
def test_bad_choice_flag_is_refused_with_the_choices(flag, value):
    with pytest.raises(UsageError, match=rf"^argument {flag}: invalid choice: '{value}' \(choose from '\w+', '"):
        parse(["--micro-batch-size", "1", "--train-iters", "2", flag, value])


def test_help_lists_every_choice_field_with_its_choices():
    """--help shows each Literal field as {a,b,...}, the choices of its dataclass field."""
    import typing

    from megatron_amopo.config import RUN_SECTIONS, flag_name, run_arg_parser, unwrap_optional

    text = " ".join(run_arg_parser().format_help().split())
    shown = 0
    for cls, prefix in RUN_SECTIONS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, _ = unwrap_optional(hints[f.name])
            if typing.get_origin(tp) is typing.Literal:
                assert f"{flag_name(f, prefix)} {{{','.join(typing.get_args(tp))}}}" in text
                shown += 1
    assert shown >= len(CHOICES)


@pytest.mark.parametrize("flag, value", CHOICES)
def test_bad_choice_in_yaml_is_refused_naming_the_flag(tmp_path, flag, value):
    """YAML values skip argparse: the dataclass refuses them, naming the flag and its choices."""
    run = tmp_path / "run.yaml"
    run.write_text(f"micro_batch_size: 1\ntrain_iters: 2\n{flag[2:].replace('-', '_')}: {value}\n")
    with pytest.raises(ValueError, match=rf"^{flag} must be one of \('\w+', .*\), got '{value}'$"):
        parse(["--config", str(run)])


def test_logging_and_profile_flags_reach_their_fields():
    cfg = parse(
        [
            "--micro-batch-size",
            "1",
            "--train-iters",
            "2",
            "--wandb-project",
            "p",
            "--wandb-exp-name",
            "n",
            "--wandb-save-dir",
            "d",
            "--profile",
            "--profile-step-start",
            "3",
            "--profile-step-end",
            "5",
            "--profile-ranks",
            "0",
            "3",
            "--profile-record-shapes",
        ]
    )
    assert (cfg.logging.wandb_project, cfg.logging.wandb_exp_name, cfg.logging.wandb_save_dir) == ("p", "n", "d")
    p = cfg.profile
    assert p.profile and (p.profile_step_start, p.profile_step_end, p.profile_ranks) == (3, 5, [0, 3])
    assert p.profile_record_shapes
