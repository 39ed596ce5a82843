"""r1fast.pipeline end to end on a micro recipe: every stage runs, resume skips finished stages, lineage is
complete, a missing checkpoint fails before any work, an empty kept set names the stage and the counts."""

import hashlib
import json
import os
import subprocess
import sys
import types

import pytest
from pipeline_testing import MICRO_MODEL

from r1fast import pipeline as P
from r1fast.config_io import ConfigError

# Teacher memorizes the 3 cold-start worked solutions (60 steps at lr 1e-2), so rejection sampling on
# those prompts keeps correct traces; everything else takes 1-3 steps.
MICRO = """
[pipeline]
name = "micro"
out_dir = "{out}"
template = "compact"

[models.teacher]
hidden_size = 32
num_layers = 1
num_heads = 2
num_kv_heads = 1
intermediate_size = 64
max_seq_len = 64
tie_word_embeddings = true

[models.student]
""" + MICRO_MODEL + """
[eval]
k = 2
max_new_tokens = 24
bootstrap_resamples = 10

[comparison]
distilled = ["student_distill"]
rl_only = ["student_cold_start", "student_rl"]

[[stages]]
name = "data"
kind = "data"
config = {{ params = {{ min_digits = 1, max_digits = 1 }}, prompts_size = 6, heldout_size = 3, cold_start_size = 3, cold_start_params = {{ min_digits = 1, max_digits = 1 }}, non_reasoning_size = 4, non_reasoning_digits = [1, 2] }}

[[stages]]
name = "teacher_cold_start"
kind = "sft"
inputs = {{ model = "{teacher_base}", data = ["data:cold_start"] }}
config = {{ steps = {cold_steps}, batch_size = 4, lr = {cold_lr} }}

[[stages]]
name = "teacher_rl"
kind = "rl"
inputs = {{ model = "teacher_cold_start:model", prompts = "data:prompts" }}
config = {{ rollout = {{ max_new_tokens = 24 }}, grpo = {{ prompts_per_step = 2, samples_per_prompt = 2, beta = 0.0 }}, rewards = {{ weights = {{ accuracy = 1.0, format = 0.2, language = 0.1 }} }}, data = {{ train_size = 6 }}, train = {{ steps = 1, lr = 1e-7 }} }}

[[stages]]
name = "teacher_rejection"
kind = "rejection"
inputs = {{ model = "teacher_rl:model", prompts = "data:cold_start", decontaminate = ["data:heldout"] }}
config = {{ k = 4, max_new_tokens = 24 }}

[[stages]]
name = "teacher_sft_base"
kind = "sft"
inputs = {{ model = "base:teacher", data = ["teacher_rejection:kept", "data:non_reasoning"] }}
config = {{ steps = 2, batch_size = 2 }}

[[stages]]
name = "teacher_final_rl"
kind = "rl"
inputs = {{ model = "teacher_sft_base:model", prompts = "data:prompts" }}
config = {{ rollout = {{ max_new_tokens = 16 }}, grpo = {{ prompts_per_step = 2, samples_per_prompt = 2, beta = 0.0 }}, data = {{ train_size = 6 }}, train = {{ steps = 1 }} }}

[[stages]]
name = "student_distill"
kind = "sft"
inputs = {{ model = "base:student", data = ["teacher_rejection:kept", "data:non_reasoning"] }}
config = {{ steps = 3, batch_size = 2 }}

[[stages]]
name = "student_cold_start"
kind = "sft"
inputs = {{ model = "base:student", data = ["data:cold_start"] }}
config = {{ steps = 2, batch_size = 2 }}

[[stages]]
name = "student_rl"
kind = "rl"
inputs = {{ model = "student_cold_start:model", prompts = "data:prompts" }}
config = {{ rollout = {{ max_new_tokens = 16 }}, grpo = {{ prompts_per_step = 2, samples_per_prompt = 2, beta = 0.0 }}, data = {{ train_size = 6 }}, train = {{ steps = {student_rl_steps}, lr = {student_rl_lr} }} }}
"""
DEFAULTS = {"teacher_base": "base:teacher", "cold_steps": 60, "cold_lr": 1e-2, "student_rl_steps": 1,
            "student_rl_lr": 3e-4}
STAGES = ["data", "teacher_cold_start", "teacher_rl", "teacher_rejection", "teacher_sft_base", "teacher_final_rl",
          "student_distill", "student_cold_start", "student_rl"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")  # kernels have their own tests; this tests the stages
    monkeypatch.setenv("R1FAST_PROGRESS", "0")


def _recipe(tmp_path, text: str | None = None, **changes) -> str:
    path = tmp_path / "recipe.toml"
    path.write_text(text if text is not None else MICRO.format(out=tmp_path / "runs", **{**DEFAULTS, **changes}))
    return str(path)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_every_stage_runs_resume_skips_and_lineage_is_complete(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)
    report = P.run_pipeline(recipe)
    run = tmp_path / "runs" / "micro"
    done = {s: json.loads((run / s / "DONE.json").read_text()) for s in STAGES}
    assert report["ran"] == STAGES
    # every stage made its outputs; every model stage was evaluated on the same held-out set
    for name, rec in done.items():
        for out in rec["outputs"].values():
            assert (run / out["path"]).exists(), (name, out)
        if rec["kind"] in ("sft", "rl"):
            assert rec["eval"]["num_prompts"] == 3 and (run / name / "eval" / "eval.json").is_file()
            assert (run / rec["outputs"]["model"]["path"] / "config.json").is_file()
    kept = [json.loads(x) for x in (run / "teacher_rejection" / "kept.jsonl").read_text().splitlines()]
    assert kept and done["teacher_rejection"]["summary"]["kept"] == len(kept)
    assert all(k["provenance"]["checkpoint"] == str(run / done["teacher_rl"]["outputs"]["model"]["path"]) for k in kept)
    non_reasoning = (run / "data" / "non_reasoning.jsonl").read_text().splitlines()
    mixed = (run / "teacher_sft_base" / "train.jsonl").read_text().splitlines()
    assert len(mixed) == len(kept) + len(non_reasoning) == done["teacher_sft_base"]["summary"]["examples"]
    assert all("<think>" not in json.loads(x)["completion"] for x in non_reasoning)
    # the base model really is the base: teacher_sft_base starts from the same init as the cold start
    assert done["teacher_sft_base"]["config"]["model"] == done["teacher_cold_start"]["config"]["model"]
    assert done["teacher_rl"]["config"]["train"]["sft_steps"] == 0
    assert done["student_distill"]["optimizer_steps"] == 3 == sum(done[s]["optimizer_steps"]
                                                                  for s in ("student_cold_start", "student_rl"))

    # lineage: every output of every stage, with the stage, checkpoints, data (sha256) and resolved config
    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["stages"] == STAGES
    expected = {out["path"]: (name, out) for name, rec in done.items() for out in rec["outputs"].values()}
    assert set(lineage["artifacts"]) == set(expected)
    for path, art in lineage["artifacts"].items():
        name, out = expected[path]
        assert art["stage"] == name and art["config"] == done[name]["config"]
        if art["kind"] == "data":
            assert art["sha256"] == _sha(run / path)
        for d in art["made_from"]["data"]:
            assert d["sha256"] == _sha(run / d["path"])
    rl = lineage["artifacts"][done["teacher_rl"]["outputs"]["model"]["path"]]
    assert [c["ref"] for c in rl["made_from"]["checkpoints"]] == ["teacher_cold_start:model"]
    assert rl["made_from"]["checkpoints"][0]["path"] == "teacher_cold_start/model"
    assert [d["ref"] for d in rl["made_from"]["data"]] == ["data:prompts"]
    assert rl["config"]["data"]["task"] == str(run / "data" / "prompts.jsonl")
    distill = lineage["artifacts"]["student_distill/model"]["made_from"]
    assert [c["ref"] for c in distill["checkpoints"]] == ["base:student"]
    assert [d["ref"] for d in distill["data"]] == ["teacher_rejection:kept", "data:non_reasoning"]

    # the report: a row per stage, the comparison, both files
    saved = json.loads((run / "report.json").read_text())
    assert [r["stage"] for r in saved["stages"]] == STAGES and saved["comparison"]["budget"] == "same total optimizer steps"
    assert saved["comparison"]["distillation_beat_rl"] == (saved["comparison"]["pass@1_gap"] > 0)
    # both arms were scored on the same 3 prompts: the gap's std pairs them (read from eval/samples.jsonl)
    assert saved["comparison"]["pass@1_gap_std_method"] == "paired bootstrap over 3 shared prompts"
    md = (run / "report.md").read_text()
    assert "| teacher_final_rl | rl | teacher |" in md and "RL alone for the student" in md

    # second invocation: no stage does any work, markers untouched
    mtimes = {s: os.stat(run / s / "DONE.json").st_mtime_ns for s in STAGES}

    def no_work(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(P, "RUNNERS", dict.fromkeys(P.RUNNERS, no_work))
    monkeypatch.setattr(P, "_evaluate", no_work)
    again = P.run_pipeline(recipe)
    assert again["ran"] == [] and {s: os.stat(run / s / "DONE.json").st_mtime_ns for s in STAGES} == mtimes
    assert [r["pass@1"] for r in again["stages"]] == [r["pass@1"] for r in saved["stages"]]

    # a changed stage reruns with everything downstream of it, and nothing else
    assert P.plan(P.load_recipe(_recipe(tmp_path, student_rl_lr=1e-4))) == ["student_rl"]
    text = MICRO.format(out=tmp_path / "runs", **DEFAULTS).replace("config = { steps = 2, batch_size = 2 }\n\n[[stages]]\n"
                                                          'name = "teacher_final_rl"',
                                                          "config = { steps = 2, batch_size = 4 }\n\n[[stages]]\n"
                                                          'name = "teacher_final_rl"')
    assert P.plan(P.load_recipe(_recipe(tmp_path, text))) == ["teacher_sft_base", "teacher_final_rl"]
    _recipe(tmp_path)
    os.rename(run / "student_cold_start" / "model", run / "student_cold_start" / "moved")  # an output went missing
    assert P.plan(P.load_recipe(recipe)) == ["student_cold_start", "student_rl"]


def test_missing_checkpoint_fails_before_any_work(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    recipe = _recipe(tmp_path, teacher_base=f"file:{missing}")
    with pytest.raises(FileNotFoundError, match=r"stages\.teacher_cold_start\.inputs\.model: checkpoint directory"):
        P.run_pipeline(recipe)
    assert not (tmp_path / "runs" / "micro" / "data").exists()  # the data stage before it never started
    # the command line: one line naming the stage, exit code 1
    env = {**os.environ, "R1FAST_KERNELS": "torch", "R1FAST_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "r1fast.pipeline", "--recipe", recipe], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "teacher_cold_start" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_eval_file_fails_before_any_work(tmp_path):
    recipe = _recipe(tmp_path, MICRO.format(out=tmp_path / "runs", **DEFAULTS).replace(
        "[eval]\n", f'[eval]\ndata = "file:{tmp_path / "no_heldout.jsonl"}"\n'))
    with pytest.raises(FileNotFoundError, match=r"eval\.data: file .*no_heldout\.jsonl"):
        P.run_pipeline(recipe)
    assert not (tmp_path / "runs" / "micro" / "data").exists()


def test_recipe_errors_are_caught_on_load(tmp_path):
    text = MICRO.format(out=tmp_path / "runs", **DEFAULTS)
    cases = [
        (text.replace('"teacher_rl:model", prompts = "data:cold_start"', '"teacher_rl:modle", prompts = "data:cold_start"'),
         r"stage 'teacher_rl' has no output 'modle'"),
        (text.replace("teacher_cold_start:model", "student_rl:model"), r"names no earlier stage 'student_rl'"),
        (text.replace("base:student", "base:pupil", 1), r"names no \[models.pupil\] section"),
        (text.replace("config = { k = 4,", "config = { out = 'x.jsonl', k = 4,"), r"config.out: set by the pipeline"),
        (text.replace("train = { steps = 1, lr = 1e-7 }", "train = { steps = 1, sft_steps = 5 }"), "its own sft stage"),
        # a scalar where a section goes: a TypeError traceback ('int' is not iterable) from the forced-key check
        (text.replace("data = { train_size = 6 }", "data = 5", 1), r"stages.teacher_rl.config.data is a section"),
        (text.replace("data = { train_size = 6 }", "data = 'task'", 1),
         r"stages.teacher_rl.config.data is a section"),  # not "data.task: set by the pipeline"
        # a traceback each ('int' object is not iterable / has no attribute 'items') before
        ("stages = 5\n" + text.split("[[stages]]")[0], r"^stages must be an array of \[\[stages\]\] tables"),
        ("stages = [5]\n" + text.split("[[stages]]")[0], r"^stages\[0\]: a stage has a string name"),
        ("models = 5\n" + text.split("[models.teacher]")[0], r"^models must be a table of \[models.<family>\] tables"),
        # lengths the tiny teacher's 64 positions cannot hold failed only when their stage ran, after earlier ones
        (text.replace("max_new_tokens = 24\nbootstrap", "max_new_tokens = 64\nbootstrap"),
         r"^eval.max_new_tokens=64 must be < models.teacher.max_seq_len=64, .* stage 'teacher_cold_start' uses"),
        (text.replace("rollout = { max_new_tokens = 24 }", "rollout = { max_new_tokens = 80 }"),
         r"^stages.teacher_rl.config.rollout.max_new_tokens=80 must be < models.teacher.max_seq_len=64"),
        (text.replace("config = { steps = 2, batch_size = 2 }", "config = { steps = 2, batch_size = 2, max_seq_len = 65 }"),
         r"^stages.teacher_sft_base.config.max_seq_len=65 exceeds models.teacher.max_seq_len=64"),
        (text.replace("k = 4, max_new_tokens = 24", "k = 4"),  # RejectionConfig's default: 256
         r"^stages.teacher_rejection.config.max_new_tokens=256 must be < models.teacher.max_seq_len=64"),
        (text.replace("num_heads = 2", "num_heads = 3", 1),  # said only "model.num_heads=3 must divide ..."
         r"^models.teacher: model.num_heads=3 must divide model.hidden_size=32 .*\(in .*recipe.toml\)$"),
        (text.replace("[eval]\n", "[eval]\ntemperature = 1e-6\n"), r"^eval: temperature=1e-06 is below 1e-05, .* \(in "),
        (text.replace("[eval]\n", "[eval]\ntemperature = -1.0\n"), r"^eval.temperature: -1.0 is out of range"),
        (text.replace('data = ["data:cold_start"]', "data = []", 1),
         r"^stages.teacher_cold_start.inputs.data: expected a non-empty list of refs \(in "),
        # a model where data goes and back: loaded, then failed when the stage ran (or evaluated)
        (text.replace('"teacher_cold_start:model", prompts', '"data:prompts", prompts'),
         r"^stages.teacher_rl.inputs.model: 'data:prompts' is a data file; this input takes a model$"),
        (text.replace('data = ["data:cold_start"]', 'data = ["base:student"]', 1),
         r"^stages.teacher_cold_start.inputs.data: 'base:student' is a model; this input takes a data file$"),
        (text.replace("[eval]\n", '[eval]\ndata = "teacher_cold_start:model"\n'), r"^eval.data: .* is a model;"),
        (text.replace("weights = { accuracy = 1.0,", "weights = { acuracy = 1.0,"),  # refused once teacher_rl ran
         r"^stages.teacher_rl.config.rewards.weights.acuracy: unknown reward; known: .* \(in "),
        (text.replace("non_reasoning_digits = [1, 2]", "non_reasoning_digits = [2, 1]"),  # randint's traceback
         r"^stages.data.config.non_reasoning_digits: \[2, 1\] is not \[shortest, longest\] \(in "),
        (text.replace('"student_distill"', '"report.md"'), r"^stages.report.md: stage names must be unique, without"),
        (MICRO.format(out=tmp_path / "runs", **{**DEFAULTS, "student_rl_steps": 2}), r"same total optimizer steps; distilled takes 3, rl_only 4"),
        (text.replace('kind = "rejection"', 'kind = "reject"'), r"'reject' is not one of"),
        (text.replace("k = 4, max_new_tokens", "k = 0, max_new_tokens"), r"stages.teacher_rejection.config.k"),
        (text.replace("config = {{ params".replace("{{", "{"), 'config = { task = "additon", params'),
         r"stages.data.config.task: unknown task 'additon'; allowed: addition"),
        (text.replace("params = { min_digits = 1,", "params = { min_digit = 1,"), r"stages.data.config.params: .*min_digit"),
        (text.replace("[eval]\n", '[eval]\ndata = "teacher_rejection:kept"\n'),
         r"eval.data: .* after 'teacher_cold_start', the first stage whose model is evaluated"),
        # base:student drawn from seed 1 for the distilled arm and seed 0 for the RL arm: two base models
        (text.replace("config = { steps = 3, batch_size = 2 }", "config = { steps = 3, batch_size = 2, seed = 1 }"),
         r"stages.student_cold_start: starts from base:student with seed 0, stage 'student_distill' with seed 1"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message):
            P.load_recipe(_recipe(tmp_path, bad))


def test_a_batch_the_ranks_cannot_split_is_refused_before_any_work(tmp_path, monkeypatch):
    """r1fast.sft and r1fast.train refuse an uneven batch only when they start: on 4 ranks the data stage and
    teacher_cold_start (batch 4) ran before teacher_rl's grpo.prompts_per_step=2 was refused."""
    from r1fast.pipeline_checks import check_batch_splits

    recipe = _recipe(tmp_path)
    check_batch_splits(P.load_recipe(recipe), STAGES, 2)  # every batch of the micro recipe splits over 2 ranks
    check_batch_splits(P.load_recipe(recipe), STAGES[:2], 4)  # only the stages that will run are checked
    monkeypatch.setattr(P.D, "world_size", lambda: 4)  # what the check sees; nothing here runs a collective
    with pytest.raises(ConfigError, match=r"^stages\.teacher_rl\.config\.grpo\.prompts_per_step=2 must be divisible "
                                          r"by the 4 ranks$"):
        P.run_pipeline(recipe)
    assert not (tmp_path / "runs" / "micro" / "data").exists()


def test_empty_kept_set_stops_the_pipeline_naming_stage_and_counts(tmp_path):
    recipe = _recipe(tmp_path, cold_steps=1, cold_lr=1e-6)  # an untrained teacher answers nothing correctly
    with pytest.raises(P.PipelineError, match=r"stage 'teacher_rejection' \(rejection\) kept no trace.*"
                                              r"\"samples\": 12.*\"kept\": 0"):
        P.run_pipeline(recipe)
    run = tmp_path / "runs" / "micro"
    assert all((run / s / "DONE.json").is_file() for s in ("data", "teacher_cold_start", "teacher_rl"))
    assert not (run / "teacher_rejection" / "DONE.json").exists() and not (run / "teacher_sft_base").exists()


@pytest.mark.dist
def test_under_torchrun_two_ranks(tmp_path):
    """The same recipe under torchrun (2 gloo ranks): every stage runs once, rank 0 writes markers and report."""
    recipe = _recipe(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "R1FAST_KERNELS": "torch", "R1FAST_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "r1fast.pipeline", "--recipe", recipe]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "micro"
    report = json.loads((run / "report.json").read_text())
    assert report["ran"] == STAGES and [r["stage"] for r in report["stages"]] == STAGES
    assert proc.stderr.count("teacher_rl: running") == 1  # progress lines come from rank 0 only
    done = json.loads((run / "teacher_rejection" / "DONE.json").read_text())
    assert done["summary"]["kept"] == len((run / "teacher_rejection" / "kept.jsonl").read_text().splitlines()) > 0
    assert json.loads((run / "teacher_rl" / "DONE.json").read_text())["summary"]["world_size"] == 2


def test_same_size_edit_is_detected_by_hash(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "1+1", "answer": "2"}\n')
    recipe = types.SimpleNamespace(run_dir=str(tmp_path))
    out = {"path": "sft.jsonl", "kind": "data", **P.data_identity(str(path))}
    assert P._output_intact(recipe, out)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same content, new mtime
    assert P._output_intact(recipe, out)
    path.write_text('{"prompt": "1+1", "answer": "3"}\n')          # edited: same size, other content
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert os.path.getsize(path) == out["size"]
    assert not P._output_intact(recipe, out)
    path.write_text('{"prompt": "1+1", "answer": "22"}\n')         # other size
    assert not P._output_intact(recipe, out)


def test_eval_require_answer_tag_reaches_the_held_out_evaluation(monkeypatch, tmp_path):
    """[eval] require_answer_tag = false grades the pipeline's held-out evaluation as the rl stages' rewards
    (rewards.require_answer_tag): it was always the <answer> block, so an R1-Distill-style student scored 0."""
    from r1fast import eval as E
    from r1fast.pipeline_recipe import load_recipe

    text = open(os.path.join(os.path.dirname(P.__file__), "..", "recipes", "tiny_r1.toml")).read()
    assert "[eval]\n" in text
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(text.replace("[eval]\n", "[eval]\nrequire_answer_tag = false\n", 1))
    seen = []
    monkeypatch.setattr(E, "run_eval", lambda cfg: seen.append(cfg) or {})
    for path, expected in ((recipe_file, False), (os.path.join(os.path.dirname(P.__file__), "..", "recipes",
                                                                "tiny_r1.toml"), True)):
        P._evaluate(load_recipe(str(path), out_dir=str(tmp_path / "runs")), "model", "heldout.jsonl", "out")
        assert seen[-1].require_answer_tag is expected
