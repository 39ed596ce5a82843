"""Run-directory writes never go through a symlink planted there (a downloaded run, a shared out_dir).

A probe found that a symlink at ``<out_dir>/.<name>.lock`` or ``<pipeline run>/.lock`` had its target's
content replaced by "pid N on host"; that ``--train.resume latest`` of a run directory holding
``summary.json``/``training_curves.png`` links overwrote the files they pointed to (a pipeline's symlinked
``<stage>/eval`` survived its rmtree, and the re-evaluation wrote into the target); and that a symlinked
``checkpoints/step_N`` crashed keep_last pruning at the end of training. Every test plants a link to a
"victim" outside the run directory and checks the victim is byte for byte what it was."""

import json
import os
import types

import pytest
from pipeline_testing import pipeline_header
from train_testing import tiny_config

from r1fast import train_state
from r1fast.config_io import ConfigError, DataError
from r1fast.metrics import MetricsLogger, trim_metrics
from r1fast.run_dir import lock_beside, lock_run_dir
from r1fast.safe_write import UnsafePathError, open_append, open_lock, remove_tree, replace_atomically, write_file

PRECIOUS = "precious user data\n"


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    """The file handling is under test, not the kernels (they have their own tests)."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    monkeypatch.setenv("R1FAST_PROGRESS", "0")


def _victim(tmp_path, name: str = "victim.txt"):
    victim = tmp_path / name
    victim.write_text(PRECIOUS)
    return victim


def _plant(link, target) -> None:
    """A relative symlink ``link`` -> ``target``, as a crafted tarball ships it."""
    os.symlink(os.path.relpath(target, os.path.dirname(link)), link)


# --- r1fast.safe_write ---------------------------------------------------------------------------------------

def test_write_file_replaces_a_symlink_not_its_target_and_leaves_no_temporary(tmp_path):
    victim, run = _victim(tmp_path), tmp_path / "run"
    run.mkdir()
    _plant(run / "summary.json", victim)
    write_file(run / "summary.json", '{"steps": 3}')
    assert victim.read_text() == PRECIOUS
    assert not (run / "summary.json").is_symlink() and (run / "summary.json").read_text() == '{"steps": 3}'
    write_file(run / "curves.png", b"\x89PNG")
    assert (run / "curves.png").read_bytes() == b"\x89PNG"
    assert sorted(os.listdir(run)) == ["curves.png", "summary.json"]
    # created as open(path, "w") would: 0o666 less the umask, not mkstemp's private 0o600
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "summary.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_error_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    (tmp_path / "eval.json").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), replace_atomically(tmp_path / "eval.json") as fh:
        fh.write("half")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["eval.json"] and (tmp_path / "eval.json").read_text() == "old"
    with pytest.raises(ValueError, match="mode"), replace_atomically(tmp_path / "eval.json", "a"):
        pass


def test_append_and_lock_refuse_symlinks_and_a_planted_hard_link(tmp_path):
    victim = _victim(tmp_path)
    _plant(tmp_path / "metrics.jsonl", victim)
    _plant(tmp_path / "dangling.jsonl", tmp_path / "absent")  # would be created through the link
    for name in ("metrics.jsonl", "dangling.jsonl"):
        with pytest.raises(UnsafePathError, match=f"{tmp_path / name} is a symlink"):
            open_append(tmp_path / name)
        with pytest.raises(UnsafePathError, match=f"{tmp_path / name} is a symlink"):
            open_lock(tmp_path / name)
    os.link(victim, tmp_path / ".lock")
    with pytest.raises(UnsafePathError, match="2 hard links"):
        open_lock(tmp_path / ".lock")
    (tmp_path / "dir.lock").mkdir()
    with pytest.raises((UnsafePathError, IsADirectoryError)):
        open_lock(tmp_path / "dir.lock")
    assert victim.read_text() == PRECIOUS and not (tmp_path / "absent").exists()
    assert issubclass(UnsafePathError, DataError)  # the CLIs print it as one line, no traceback
    with open_append(tmp_path / "real.jsonl") as fh:
        fh.write("a\n")
    with open_append(tmp_path / "real.jsonl") as fh:
        fh.write("b\n")
    assert (tmp_path / "real.jsonl").read_text() == "a\nb\n"


def test_remove_tree_unlinks_a_symlinked_directory_and_leaves_its_target(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text(PRECIOUS)
    _plant(tmp_path / "eval", outside)
    remove_tree(tmp_path / "eval")
    assert not os.path.lexists(tmp_path / "eval") and (outside / "keep.txt").read_text() == PRECIOUS
    remove_tree(tmp_path / "eval")  # missing: nothing to do
    remove_tree(outside)
    assert not outside.exists()


# --- the run locks (finding 2) -------------------------------------------------------------------------------

def test_a_symlinked_lock_file_is_refused_with_the_callers_error_and_the_target_is_untouched(tmp_path):
    victim = _victim(tmp_path)
    _plant(tmp_path / ".x.lock", victim)
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'x'}: cannot lock the run directory: .*\.x\.lock is a sym"):
        lock_beside(str(tmp_path / "x"), ConfigError)
    pipeline_dir = tmp_path / "pipe"
    pipeline_dir.mkdir()
    _plant(pipeline_dir / ".lock", victim)
    with pytest.raises(RuntimeError, match=r"pipe: cannot lock the run directory: .*pipe/\.lock is a symlink"):
        lock_run_dir(str(pipeline_dir))
    assert victim.read_text() == PRECIOUS
    os.remove(pipeline_dir / ".lock")
    held = lock_run_dir(str(pipeline_dir))  # a real lock file still works and records its holder
    assert (pipeline_dir / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    held.close()


# --- metrics.jsonl, the plot, the config, the pipeline's and eval's outputs (finding 3) ----------------------

def test_a_symlinked_metrics_file_is_refused_by_the_logger_and_by_trim(tmp_path):
    victim = _victim(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    _plant(run / "metrics.jsonl", victim)
    with pytest.raises(UnsafePathError, match="metrics.jsonl is a symlink"):
        MetricsLogger(str(run), rank=0)
    with pytest.raises(UnsafePathError, match="metrics.jsonl is a symlink"):
        trim_metrics(str(run), step=0)
    assert victim.read_text() == PRECIOUS
    os.remove(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text('{"step": 1, "phase": "rl"}\n{"step": 2, "phase": "rl"}\n')
    assert trim_metrics(str(run), step=1) == 1 and os.listdir(run) == ["metrics.jsonl"]  # no temporary left


def test_plot_config_jsonl_and_eval_outputs_replace_symlinks(tmp_path):
    from r1fast.config import Config
    from r1fast.config_dump import save_config
    from r1fast.eval import EvalConfig, write_outputs
    from r1fast.plots import plot_training_curves
    from r1fast.stage_io import write_jsonl

    victim, run = _victim(tmp_path), tmp_path / "run"
    names = ["training_curves.png", "config.resume-step_1.toml", "kept.jsonl", "eval.json", "eval.md",
             "samples.jsonl"]
    run.mkdir()
    for name in names:
        _plant(run / name, victim)
    _plant(run / "kept.jsonl.tmp", victim)  # the temporary's old, predictable name
    plot_training_curves([{"step": 1, "reward_mean": 0.5}], run / "training_curves.png")
    save_config(Config(), str(run / "config.resume-step_1.toml"))
    write_jsonl(str(run / "kept.jsonl"), [{"prompt": "1+1"}])
    write_outputs(str(run), {"pass@1": 0.5}, [{"index": 0}], EvalConfig(model="m", data="d.jsonl"))
    assert victim.read_text() == PRECIOUS
    assert not any((run / name).is_symlink() for name in names)
    assert sorted(os.listdir(run)) == sorted([*names, "kept.jsonl.tmp"])  # no temporary of ours left
    assert (run / "training_curves.png").read_bytes().startswith(b"\x89PNG")  # PNG even into a file object
    assert json.loads((run / "kept.jsonl").read_text()) == {"prompt": "1+1"}


def test_pipeline_lineage_replaces_a_symlink(tmp_path):
    from r1fast.pipeline_report import write_lineage

    victim = _victim(tmp_path)
    (tmp_path / "run").mkdir()
    _plant(tmp_path / "run" / "lineage.json", victim)
    _plant(tmp_path / "run" / "lineage.json.tmp", victim)  # the temporary's old, predictable name
    recipe = types.SimpleNamespace(stages=[], run_dir=str(tmp_path / "run"), path=str(tmp_path / "r.toml"))
    write_lineage(recipe, {})
    assert victim.read_text() == PRECIOUS
    assert json.loads((tmp_path / "run" / "lineage.json").read_text())["artifacts"] == {}
    assert sorted(os.listdir(tmp_path / "run")) == ["lineage.json", "lineage.json.tmp"]  # the link left alone


def test_a_pipeline_reevaluation_removes_a_symlinked_eval_dir_and_report_links(tmp_path):
    from r1fast import pipeline as P

    recipe_text = pipeline_header("r", "m") + """
[eval]
data = "data:heldout"
k = 1
max_new_tokens = {tokens}
bootstrap_resamples = 2

[[stages]]
name = "data"
kind = "data"
config = {{ params = {{ min_digits = 1, max_digits = 1 }}, prompts_size = 2, heldout_size = 2, cold_start_size = 2, cold_start_params = {{ min_digits = 1, max_digits = 1 }}, non_reasoning_size = 0 }}

[[stages]]
name = "u"
kind = "sft"
inputs = {{ model = "base:m", data = ["data:cold_start"] }}
config = {{ steps = 1, batch_size = 2 }}
"""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text.format(out=tmp_path / "runs", tokens=2))
    P.run_pipeline(str(recipe))
    run = tmp_path / "runs" / "r"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "eval.json").write_text(PRECIOUS)
    victim = _victim(tmp_path)
    remove_tree(run / "u" / "eval")
    _plant(run / "u" / "eval", outside)
    for name in ("report.json", "report.md", "lineage.json"):
        os.remove(run / name)
        _plant(run / name, victim)
    recipe.write_text(recipe_text.format(out=tmp_path / "runs", tokens=3))  # an [eval]-only change
    assert P.run_pipeline(str(recipe))["ran"] == []
    assert victim.read_text() == PRECIOUS and os.listdir(outside) == ["eval.json"]
    assert (outside / "eval.json").read_text() == PRECIOUS
    assert not (run / "u" / "eval").is_symlink() and (run / "u" / "eval" / "eval.json").is_file()
    assert not any((run / n).is_symlink() for n in ("report.json", "report.md", "lineage.json"))


# --- train and sft end to end (findings 3 and 6) -------------------------------------------------------------

QUICK = ("--train.sft_steps", "0", "--data.eval_size", "0", "--grpo.prompts_per_step", "2",
         "--train.warmup_steps", "0", "--train.name", "x", "--train.checkpoint_every", "1")


def test_resume_replaces_symlinked_outputs_and_prunes_past_a_symlinked_checkpoint(tmp_path, capsys):
    from r1fast.train import run

    run(tiny_config(tmp_path / "dl", *QUICK, "--train.steps", "2"))
    run_dir = tmp_path / "dl" / "x"
    victim = _victim(tmp_path)
    for name in ("summary.json", "training_curves.png", "config.resume-step_2.toml"):
        if os.path.exists(run_dir / name):
            os.remove(run_dir / name)
        _plant(run_dir / name, victim)
    ckpts = run_dir / "checkpoints"
    os.replace(ckpts / "step_1", tmp_path / "outside_step_1")
    _plant(ckpts / "step_1", tmp_path / "outside_step_1")
    capsys.readouterr()
    summary = run(tiny_config(tmp_path / "dl", *QUICK, "--train.steps", "3", "--train.resume", "latest",
                              "--train.keep_last", "1"))
    assert summary["steps"] == 3 and victim.read_text() == PRECIOUS
    assert (tmp_path / "outside_step_1" / "train_state.pt").is_file()  # the link's target is never pruned
    assert sorted(os.listdir(ckpts)) == ["step_1", "step_3"] and (ckpts / "step_1").is_symlink()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    assert (run_dir / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    assert not (run_dir / "config.resume-step_2.toml").is_symlink()
    assert capsys.readouterr().err.count("ignoring step_1 (symlinks are never checkpoints") == 1  # once a root


def test_prune_and_delete_handle_symlinked_step_dirs(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3):
        (ckpts / f"step_{step}").mkdir(parents=True)
        for name in ("train_state.pt", "rng_rank0.pt"):  # a pre-manifest checkpoint counts as complete
            (ckpts / f"step_{step}" / name).write_text("x")
    os.replace(ckpts / "step_3", tmp_path / "outside")
    _plant(ckpts / "step_3", tmp_path / "outside")
    assert [s for s, _ in train_state._step_dirs(str(ckpts))] == [2, 1]
    assert train_state.prune_checkpoints(str(tmp_path / "run"), 1, keep=str(ckpts / "step_2")) == [
        str(ckpts / "step_1")]
    train_state._delete(str(ckpts / "step_3"))  # a link reaching _delete is unlinked, not rmtree-d
    assert sorted(os.listdir(ckpts)) == ["step_2"] and (tmp_path / "outside" / "train_state.pt").is_file()


def test_sft_summary_replaces_a_symlink(tmp_path):
    from train_testing import tiny_sft_config

    from r1fast.sft import run_sft

    cfg = tiny_sft_config(tmp_path, examples=2)
    victim = _victim(tmp_path)
    (tmp_path / "s").mkdir()
    _plant(tmp_path / "s" / "summary.json", victim)
    run_sft(cfg)
    assert victim.read_text() == PRECIOUS and json.loads((tmp_path / "s" / "summary.json").read_text())["steps"] == 1
