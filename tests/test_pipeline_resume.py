"""r1fast.pipeline resume decisions on a two-layer micro recipe (1-2 SFT steps of a 1-layer model): a stage
made from an input that changed since (an upstream stage re-ran, a file: input was edited) runs again; an
[eval]-only change re-runs evaluations only; a missing file: [eval] data or an impossible data size stops the
pipeline before any work; SIGTERM inside an rl stage ends with one line and resumes."""

import json

import pytest
from pipeline_testing import pipeline_header

from r1fast import pipeline as P
from r1fast.config_io import ConfigError

# the run and its 1-layer model, shared by both recipes
HEADER = pipeline_header("r", "m")

RECIPE = HEADER + """
[eval]
data = "{eval_data}"
k = 1
max_new_tokens = {eval_tokens}
bootstrap_resamples = 2

[[stages]]
name = "data"
kind = "data"
config = {{ params = {{ min_digits = 1, max_digits = 1 }}, prompts_size = 4, heldout_size = 2, cold_start_size = 4, cold_start_params = {{ min_digits = 1, max_digits = 1 }}, non_reasoning_size = 0 }}

[[stages]]
name = "u"
kind = "sft"
inputs = {{ model = "base:m", data = ["{u_data}"] }}
config = {{ steps = 1, batch_size = 2, lr = {u_lr} }}

[[stages]]
name = "d1"
kind = "sft"
inputs = {{ model = "u:model", data = ["data:cold_start"] }}
config = {{ steps = 1, batch_size = 2 }}

[[stages]]
name = "d2"
kind = "sft"
inputs = {{ model = "u:model", data = ["data:cold_start"] }}
config = {{ steps = 1, batch_size = 2 }}
"""
DEFAULTS = {"eval_data": "data:heldout", "eval_tokens": 4, "u_data": "data:cold_start", "u_lr": 1e-4}
STAGES = ["data", "u", "d1", "d2"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    monkeypatch.setenv("R1FAST_PROGRESS", "0")


def _recipe(tmp_path, text: str = RECIPE, **changes) -> str:
    path = tmp_path / "recipe.toml"
    path.write_text(text.format(out=tmp_path / "runs", **{**DEFAULTS, **changes}))
    return str(path)


def _done(tmp_path, stage: str) -> dict:
    return json.loads((tmp_path / "runs" / "r" / stage / "DONE.json").read_text())


def _write_sft_data(path, n: int) -> None:
    path.write_text("".join(json.dumps({"prompt": f"{i}+1", "completion": f"<answer>{i + 1}</answer>",
                                        "answer": str(i + 1)}) + "\n" for i in range(n)))


def _forbid_work(monkeypatch) -> list[str]:
    """Fail on any stage runner; return the list the held-out evaluations append their model to."""
    def no_work(*args, **kwargs):
        raise AssertionError("a finished stage trained again")

    evaluated = []
    original = P._evaluate
    monkeypatch.setattr(P, "RUNNERS", dict.fromkeys(P.RUNNERS, no_work))
    monkeypatch.setattr(P, "_evaluate", lambda recipe, model, *a: evaluated.append(model) or original(recipe, model, *a))
    return evaluated


class _Killed(Exception):
    """Stands for the process dying inside a stage."""


def test_stage_made_from_an_upstream_that_reran_since_runs_again(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)
    assert P.run_pipeline(recipe)["ran"] == STAGES
    first_u = _done(tmp_path, "u")["finished_at"]
    # u changes and re-runs; the invocation dies in d1 (as under SIGKILL), so d2 keeps its DONE.json from the
    # old u:model
    recipe = _recipe(tmp_path, u_lr=5e-4)
    original = P.RUNNERS["sft"]

    def killed_in_d1(stage, stage_dir):
        if stage.name == "d1":
            raise _Killed
        return original(stage, stage_dir)

    monkeypatch.setitem(P.RUNNERS, "sft", killed_in_d1)
    with pytest.raises(_Killed):
        P.run_pipeline(recipe)
    assert _done(tmp_path, "u")["finished_at"] != first_u
    assert P.plan(P.load_recipe(recipe)) == ["d1", "d2"]  # d2 is stale: made from the old u
    assert _done(tmp_path, "d2")["consumed"]["u:model"] == {"finished_at": first_u}
    monkeypatch.setitem(P.RUNNERS, "sft", original)
    assert P.run_pipeline(recipe)["ran"] == ["d1", "d2"]
    assert _done(tmp_path, "d2")["consumed"]["u:model"] == {"finished_at": _done(tmp_path, "u")["finished_at"]}
    assert P.plan(P.load_recipe(recipe)) == []


def _file_recipe(tmp_path, **changes) -> tuple[str, object, object]:
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    if not train.exists():
        _write_sft_data(train, 4)
        _write_sft_data(heldout, 2)
    return _recipe(tmp_path, u_data=f"file:{train}", eval_data=f"file:{heldout}", **changes), train, heldout


def test_changed_file_input_reruns_its_stage_and_downstream(tmp_path, monkeypatch):
    recipe, train, heldout = _file_recipe(tmp_path)
    assert P.run_pipeline(recipe)["ran"] == STAGES
    done, used = _done(tmp_path, "u"), P.sha256_file(str(train))
    _write_sft_data(train, 6)  # the user replaced the training data
    assert P.plan(P.load_recipe(recipe)) == ["u", "d1", "d2"]
    assert done["consumed"][f"file:{train}"] == {"sha256": used}
    # a missing file: [eval] data stops the pipeline before any work, naming eval.data
    _forbid_work(monkeypatch)
    heldout.unlink()
    with pytest.raises(FileNotFoundError, match=r"eval\.data: file .*heldout\.jsonl"):
        P.run_pipeline(recipe)
    assert _done(tmp_path, "u")["finished_at"] == done["finished_at"]


def test_eval_only_changes_rerun_only_evaluations(tmp_path, monkeypatch):
    recipe, train, heldout = _file_recipe(tmp_path)
    assert P.run_pipeline(recipe)["ran"] == STAGES
    done = {s: _done(tmp_path, s) for s in STAGES}
    # only [eval] changed: no stage trains again, every model is evaluated again, finished_at stays
    recipe, _, _ = _file_recipe(tmp_path, eval_tokens=6)
    assert P.plan(P.load_recipe(recipe)) == []
    evaluated = _forbid_work(monkeypatch)
    assert P.run_pipeline(recipe)["ran"] == []
    assert evaluated == [str(tmp_path / "runs" / "r" / s / "model") for s in ("u", "d1", "d2")]
    again = {s: _done(tmp_path, s) for s in STAGES}
    assert all(again[s]["finished_at"] == done[s]["finished_at"] for s in STAGES)
    assert all(again[s]["eval_fingerprint"] != done[s]["eval_fingerprint"] for s in ("u", "d1", "d2"))
    assert json.loads((tmp_path / "runs" / "r" / "u" / "eval" / "eval.json").read_text())["settings"][
        "max_new_tokens"] == 6
    # the held-out file's contents changed: evaluations again, still no training
    evaluated.clear()
    _write_sft_data(heldout, 3)
    assert P.run_pipeline(recipe)["ran"] == [] and len(evaluated) == 3
    assert _done(tmp_path, "u")["eval"]["num_prompts"] == 3
    evaluated.clear()
    assert P.run_pipeline(recipe)["ran"] == [] and evaluated == []  # nothing changed: nothing at all


def test_impossible_data_size_fails_before_any_work(tmp_path):
    # 1-digit sums: 100 exist, about a fifth of them in the held-out split; 50 cannot be had
    recipe = _recipe(tmp_path, RECIPE.replace("heldout_size = 2", "heldout_size = 50"))
    with pytest.raises(ConfigError, match=r"stages\.data\.config\.heldout_size=50: only \d+ distinct addition"):
        P.run_pipeline(recipe)
    assert not (tmp_path / "runs" / "r" / "data").exists()


RL_RECIPE = HEADER + """
[eval]
k = 1
max_new_tokens = 4
bootstrap_resamples = 2

[[stages]]
name = "data"
kind = "data"
config = {{ params = {{ min_digits = 1, max_digits = 1 }}, prompts_size = 4, heldout_size = 2, cold_start_size = 2, non_reasoning_size = 0 }}

[[stages]]
name = "rl"
kind = "rl"
inputs = {{ model = "base:m", prompts = "data:prompts" }}
config = {{ rollout = {{ max_new_tokens = 4 }}, grpo = {{ prompts_per_step = 2, samples_per_prompt = 2, beta = 0.0 }}, data = {{ train_size = 4 }}, train = {{ steps = 2 }} }}
"""


def test_sigterm_in_an_rl_stage_ends_with_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    import r1fast.train as T

    recipe = _recipe(tmp_path, RL_RECIPE)
    original = T.Trainer.grpo_step

    def step_then_sigterm(self, step):  # what the trainer's SIGTERM handler does, after the first step
        metrics = original(self, step)
        self.stop.requested = True
        return metrics

    monkeypatch.setattr(T.Trainer, "grpo_step", step_then_sigterm)
    assert P.main(["--recipe", recipe]) == P.INTERRUPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert "r1fast.pipeline: stage 'rl' interrupted" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err and "KeyError" not in err
    run = tmp_path / "runs" / "r"
    assert not (run / "rl" / "DONE.json").exists() and (run / "rl" / "checkpoints" / "step_1").is_dir()
    monkeypatch.setattr(T.Trainer, "grpo_step", original)
    assert P.main(["--recipe", recipe]) == 0
    assert "rl: running" in capsys.readouterr().err
    done = _done(tmp_path, "rl")
    assert done["summary"]["steps"] == 2 and done["eval"]["num_prompts"] == 2


def test_ctrl_c_in_an_rl_stage_exits_130_as_r1fast_train_does(tmp_path, monkeypatch, capsys):
    """The pipeline reported every interrupted stage as SIGTERM's 143; a Ctrl-C's checkpoint-and-stop is 130."""
    import signal

    import r1fast.train as T

    original = T.Trainer.grpo_step

    def step_then_ctrl_c(self, step):  # what the trainer's handler records for a first Ctrl-C
        metrics = original(self, step)
        self.stop.requested, self.stop.signum = True, signal.SIGINT
        return metrics

    monkeypatch.setattr(T.Trainer, "grpo_step", step_then_ctrl_c)
    assert P.main(["--recipe", _recipe(tmp_path, RL_RECIPE)]) == 130
    assert "r1fast.pipeline: stage 'rl' interrupted" in capsys.readouterr().err


def test_sigterm_during_an_rl_stages_final_save_stops_the_pipeline(tmp_path, monkeypatch, capsys):
    """The trainer finishes a run whose signal came in its final evaluation or save (exit 0 for r1fast.train),
    and the pipeline swallowed that SIGTERM: it went on to the evaluation and the next stages until the
    scheduler's SIGKILL. It now stops after the stage's trainer with 143; the rerun finishes the stage from its
    final checkpoint without training again."""
    import r1fast.train as T

    recipe = _recipe(tmp_path, RL_RECIPE)
    original_finish, original_step = T.Trainer._finish, T.Trainer.grpo_step

    def sigterm_in_final_save(self, summary):
        self.stop.requested = True  # what the handler does when the signal lands during the save
        return original_finish(self, summary)

    monkeypatch.setattr(T.Trainer, "_finish", sigterm_in_final_save)
    assert P.main(["--recipe", recipe]) == P.INTERRUPTED_EXIT_CODE
    assert "r1fast.pipeline: stage 'rl' " in capsys.readouterr().err
    run = tmp_path / "runs" / "r"
    assert not (run / "rl" / "DONE.json").exists() and (run / "rl" / "checkpoints" / "step_2").is_dir()
    monkeypatch.setattr(T.Trainer, "_finish", original_finish)
    stepped = []
    monkeypatch.setattr(T.Trainer, "grpo_step", lambda self, step: (stepped.append(step), original_step(self, step))[1])
    assert P.main(["--recipe", recipe]) == 0
    assert stepped == [] and _done(tmp_path, "rl")["summary"]["steps"] == 2


def test_an_rl_stage_killed_before_its_first_checkpoint_starts_over_and_later_checkpoints_resume(
        tmp_path, monkeypatch, capsys):
    """A kill before the first checkpoint leaves STARTED.json and metrics.jsonl: the next invocation starts the
    stage over itself (r1fast.train set the directory aside as an earlier run, STARTED.json with it, and the
    invocation after that deleted the stage with its later SIGTERM checkpoint)."""
    import os

    import r1fast.train as T

    recipe = _recipe(tmp_path, RL_RECIPE)
    original = T.Trainer.grpo_step

    def killed(self, step):  # SIGKILL mid-step: no checkpoint, nothing more written
        raise KeyboardInterrupt

    monkeypatch.setattr(T.Trainer, "grpo_step", killed)
    with pytest.raises(KeyboardInterrupt):
        P.main(["--recipe", recipe])
    run = tmp_path / "runs" / "r"
    assert (run / "rl" / "STARTED.json").is_file() and not (run / "rl" / "checkpoints").exists()

    def step_then_sigterm(self, step):
        metrics = original(self, step)
        self.stop.requested = True
        return metrics

    monkeypatch.setattr(T.Trainer, "grpo_step", step_then_sigterm)
    assert P.main(["--recipe", recipe]) == P.INTERRUPTED_EXIT_CODE
    assert (run / "rl" / "checkpoints" / "step_1").is_dir()
    assert not [name for name in os.listdir(run) if ".prev-" in name]  # nothing was set aside
    resumed = []
    monkeypatch.setattr(T.Trainer, "grpo_step", lambda self, step: (resumed.append(step), original(self, step))[1])
    assert P.main(["--recipe", recipe]) == 0
    assert resumed == [1]  # continued from step_1's checkpoint


def test_a_second_invocation_on_the_same_run_directory_is_refused_and_a_torn_marker_is_no_match(tmp_path):
    from r1fast.run_dir import lock_run_dir, read_json

    held = lock_run_dir(str(tmp_path / "run"), P.PipelineError)
    with pytest.raises(P.PipelineError, match="another process is running on this run directory"):
        lock_run_dir(str(tmp_path / "run"), P.PipelineError)
    held.close()
    lock_run_dir(str(tmp_path / "run")).close()  # free again
    (tmp_path / "torn.json").write_text('{"fingerprint": "ab')
    assert read_json(str(tmp_path / "torn.json")) is None and read_json(str(tmp_path / "absent.json")) is None


def test_an_interrupted_rl_stage_whose_config_changed_starts_over(tmp_path, monkeypatch):
    """STARTED.json must match the stage's fingerprint and inputs for GRPO to resume: after the rl config
    changed, the old step_1 checkpoint (trained under the old config) is discarded, not continued."""
    import r1fast.train as T

    original = T.Trainer.grpo_step

    def step_then_sigterm(self, step):
        metrics = original(self, step)
        self.stop.requested = True
        return metrics

    monkeypatch.setattr(T.Trainer, "grpo_step", step_then_sigterm)
    assert P.main(["--recipe", _recipe(tmp_path, RL_RECIPE)]) == P.INTERRUPTED_EXIT_CODE
    stage = tmp_path / "runs" / "r" / "rl"
    assert (stage / "checkpoints" / "step_1").is_dir() and (stage / "STARTED.json").is_file()
    old_key = json.loads((stage / "STARTED.json").read_text())

    changed = RL_RECIPE.replace("train = {{ steps = 2 }}", "train = {{ steps = 2, lr = 3e-4 }}")
    assert changed != RL_RECIPE
    ran = []
    monkeypatch.setattr(T.Trainer, "grpo_step", lambda self, step: (ran.append(step), original(self, step))[1])
    assert P.main(["--recipe", _recipe(tmp_path, changed)]) == 0
    assert ran == [0, 1]  # from scratch; a resume of the old checkpoint ran only [1]
    assert json.loads((stage / "STARTED.json").read_text())["fingerprint"] != old_key["fingerprint"]
    assert [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("phase") == "rl"] == [1, 2]
    assert json.loads((stage / "DONE.json").read_text())["config"]["train"]["lr"] == 3e-4
