"""The launch scripts run end to end: torchrun-style training with zero_sf
(2 gloo ranks), a checkpoint resumed at 1 rank, and the DeepSpeed job."""

import os
import sys

import pytest

import zero_sf
import zero_sf.checkpoint
from tests.distributed import spawn

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
sys.path.insert(0, LAUNCH)


def _train(rank, world_size, argv, out):
    import train
    history = train.main(argv)
    if rank == 0:
        import json
        with open(out, "w") as f:
            json.dump(history, f)


def _run(world_size, argv, tmp_path, name):
    import json
    out = str(tmp_path / f"{name}.json")
    spawn(_train, world_size, argv, out)
    with open(out) as f:
        return json.load(f)


# The job `make demo` runs (2 ranks train and save, 1 rank resumes); ~50 s.
@pytest.mark.slow
def test_train_loss_falls_and_resumes_at_another_world_size(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    small = ["--dim", "64", "--layers", "2", "--seq", "64", "--eval-every", "30"]
    h = _run(2, small + ["--steps", "30", "--save", ckpt], tmp_path, "a")
    first, last = h["train"][0][1], sum(l for _, l in h["train"][-5:]) / 5
    assert last < first - 1.0, (first, last)  # from ~5.5 (uniform over bytes)
    assert h["val"] and h["val"][-1][1] < first - 1.0
    version = zero_sf.checkpoint.versions.candidates(ckpt)[0]  # the path the save printed
    h2 = _run(1, small + ["--steps", "36", "--batch", "32", "--resume", version], tmp_path, "b")
    assert h2["resumed"] == [version, 30]
    assert h2["train"][0][0] == 31  # continued from the saved step
    assert h2["val"][-1][1] < h["val"][-1][1] + 0.1
    # Resumed at the same world size: the very trajectory of a run that never
    # stopped (losses equal to the last bit on CPU), so a corrupted reshard,
    # a lost lr or a lost state tensor shows.
    resumed = _run(2, small + ["--steps", "36", "--resume", ckpt], tmp_path, "c")
    whole = _run(2, small + ["--steps", "36"], tmp_path, "d")
    assert resumed["train"] == whole["train"][30:]
    assert resumed["val"][-1] == whole["val"][-1]


TINY = ["--dim", "32", "--layers", "1", "--seq", "16", "--batch", "2", "--eval-every", "100",
        "--log-every", "100"]


def _no_training(monkeypatch):
    import train
    monkeypatch.setattr(train, "GPT", lambda *a, **k: pytest.fail("trained before failing"))
    return train


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "sf", "--save", "{d}/new"], "--save needs a zero-\\* optimizer"),
    (["--optimizer", "adamw", "--resume", "{d}"], "--resume needs a zero-\\* optimizer"),
    (["--resume", "{d}/missing"], "no such directory"),
    (["--save", "{d}/old"], "already holds a checkpoint that this run does not resume from"),
    # a sibling whose name extends it is not "inside" it
    (["--save", "{d}/old", "--resume", "{d}/old2"], "already holds a checkpoint"),
    (["--fsdp", "--optimizer", "zero-sf"], "--fsdp shards the model itself"),
    (["--optimizer", "adamw", "--state-dtype", "bf16"], "zero_sf optimizers only"),
    (["--master-weights", "remainder", "--dtype", "fp32"], "needs a bf16 model"),
    (["--optimizer", "sf", "--shard-size", "2"], "ZeroOptimizer options"),
    (["--shard-size", "two"], "expected a number of ranks or 'local'"),
])
def test_argument_mistakes_fail_before_training(tmp_path, monkeypatch, capsys, argv, message):
    train = _no_training(monkeypatch)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "LATEST").write_text("v-000001-00000000")
    (tmp_path / "old2").mkdir()
    with pytest.raises(SystemExit):
        train.main([a.format(d=tmp_path) for a in argv])
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "new").exists()


def test_compressed_state_saves_and_resumes_into_the_default_format(tmp_path):
    """--state-dtype bf16 --master-weights remainder on a bf16 model: the
    optimizer holds bf16 state and int16 remainders; its checkpoint resumes
    into a run with the default format (fp32 master and state)."""
    import train
    ckpt = str(tmp_path / "ckpt")
    h = train.main(TINY + ["--dtype", "bf16", "--steps", "3", "--save", ckpt,
                           "--state-dtype", "bf16", "--master-weights", "remainder"])
    assert h["train"][-1][0] == 3
    h = train.main(TINY + ["--dtype", "bf16", "--steps", "5", "--resume", ckpt])
    assert h["resumed"][1] == 3 and [s for s, _ in h["train"]] == [4, 5]


def test_resume_steps_and_overwrite(tmp_path, monkeypatch):
    """zero-rmsprop (a step count per parameter, no k): the resumed run says
    where it resumed and continues from there; --steps not past the
    checkpoint is an error, not a silent no-op; --save into a checkpoint
    directory needs --resume of it or --overwrite."""
    import train
    ckpt = str(tmp_path / "ckpt")
    train.main(TINY + ["--optimizer", "zero-rmsprop", "--steps", "3", "--save", ckpt])
    h = train.main(TINY + ["--optimizer", "zero-rmsprop", "--steps", "5", "--resume", ckpt,
                           "--save", ckpt])
    assert h["resumed"][1] == 3 and [s for s, _ in h["train"]] == [4, 5]
    with pytest.raises(SystemExit, match="at step 5, and --steps 5 is the total"):
        train.main(TINY + ["--optimizer", "zero-rmsprop", "--steps", "5", "--resume", ckpt])
    train.main(TINY + ["--optimizer", "zero-rmsprop", "--steps", "1", "--save", ckpt, "--overwrite"])


def test_scale_flags_give_the_flat_jobs_numbers(tmp_path):
    """--shard-size 1 (state replicated, gradients all-reduced), the
    overlapped gather and fp32 reduction on a fp32 model: at 2 ranks every
    sum has two addends, so the losses are the flat job's, bit for bit."""
    argv = TINY + ["--dtype", "fp32", "--steps", "4", "--log-every", "1"]
    flat = _run(2, argv, tmp_path, "flat")
    scaled = _run(2, argv + ["--shard-size", "1", "--overlap-param-gather", "--reduce-dtype",
                             "fp32"], tmp_path, "scaled")
    assert len(flat["train"]) == 4 and flat["train"] == scaled["train"]


def test_fsdp2_job_trains_and_resumes_at_another_world_size(tmp_path):
    """--fsdp: FSDP2 shards the model, zero_sf.ScheduleFreeAdamW updates the
    local shards; a DCP checkpoint from 2 ranks resumes at 1."""
    ckpt = str(tmp_path / "ckpt")
    small = ["--fsdp", "--optimizer", "sf", "--dim", "64", "--layers", "2", "--seq", "64",
             "--eval-every", "20"]
    h = _run(2, small + ["--steps", "30", "--save", ckpt], tmp_path, "a")
    first = h["train"][0][1]
    assert h["val"][-1][1] < first - 1.0, (first, h["val"])
    h2 = _run(1, small + ["--steps", "40", "--resume", ckpt], tmp_path, "b")
    assert h2["train"][0][0] == 31  # continued from the saved step
    assert h2["val"][-1][1] < h["val"][-1][1] + 0.1


def _ds_train(rank, world_size, argv):
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import ds_train
    engine = ds_train.main(argv)
    assert engine.global_steps == 20


def test_deepspeed_job_from_config(tmp_path):
    pytest.importorskip("deepspeed")
    spawn(_ds_train, 2, ["--steps", "20", "--seq", "32", "--eval-every", "10",
                         "--save", str(tmp_path / "ds")])
    assert os.path.exists(tmp_path / "ds" / "latest")
