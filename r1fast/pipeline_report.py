"""The pipeline's report: held-out accuracy after every stage, and distillation vs RL alone for the student;
and its lineage (``lineage.json``: what made every artifact).

Reads the stages' DONE records (``r1fast.pipeline``) and writes ``report.json`` and ``report.md`` into
the run directory. Every model-producing stage was evaluated on the same held-out prompts with the same
seeds and settings, so the rows compare directly. The comparison takes the last stage of each arm;
"beat" means a higher pass@1 (R1's headline metric, averaged over k samples; computed from integer counts,
so equal scores compare equal), and the report says whether the gap exceeds twice the bootstrap standard
deviation of the difference. Both arms are scored on the same prompts, so that deviation is a **paired**
bootstrap over the per-prompt differences (read from each final stage's ``eval/samples.jsonl``); only
where those are missing does the report fall back to treating the arms as independent, and says so.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING

from r1fast.eval_metrics import bootstrap_std
from r1fast.safe_write import write_file

if TYPE_CHECKING:
    from r1fast.pipeline_recipe import Recipe

__all__ = ["build_report", "write_lineage", "write_report"]


def _row(record: dict) -> dict:
    m = record.get("eval") or {}
    k = m.get("samples_per_prompt")
    return {"stage": record["stage"], "kind": record["kind"], "family": record.get("family"),
            "optimizer_steps": record.get("optimizer_steps"), "train_s": record.get("train_s"),
            "wall_s": record.get("wall_s"), "greedy_accuracy": m.get("greedy_accuracy"),
            "greedy_accuracy_std": m.get("greedy_accuracy_std"), "pass@1": m.get("pass@1"),
            "pass@1_std": m.get("pass@1_std"), f"pass@{k}": m.get(f"pass@{k}") if k else None, "k": k,
            "format_rate": m.get("format_rate"), "response_length_mean": m.get("response_length_mean"),
            "num_prompts": m.get("num_prompts"), "dropped_too_long": m.get("dropped_too_long") or 0,
            "skipped_prompts": m.get("skipped_prompts") or 0, "summary": _stage_summary(record)}


def _stage_summary(record: dict) -> str:
    s = record.get("summary") or {}
    if record["kind"] == "rejection":
        return f"kept {s.get('kept')} of {s.get('samples')} samples ({s.get('prompts_with_kept')} prompts)"
    if record["kind"] == "data":
        return ", ".join(f"{k} {v}" for k, v in s.items())
    if record["kind"] == "sft":
        return f"{s.get('examples')} examples, nll {s.get('first_nll', math.nan):.3f} -> {s.get('final_nll', math.nan):.3f}"
    return f"{s.get('steps')} GRPO steps"


def _gap_std(d: dict, r: dict, per_prompt: dict | None, num_resamples: int) -> tuple[float | None, str]:
    """(bootstrap std of the pass@1 gap, None when unknown; how it was measured). Paired over the prompts
    both arms graded when their per-prompt pass@1 is known: the arms share prompts, so easy and hard
    prompts move both and the independent-arms sum of variances overstates the spread of the difference."""
    a, b = (per_prompt or {}).get(d["final_stage"]), (per_prompt or {}).get(r["final_stage"])
    if a and b:
        common = sorted(set(a) & set(b))
        if len(common) == 1:  # one difference has no spread to resample: 0 would make any gap "significant"
            return None, "one shared prompt: the spread of the gap is unknown"
        if common:
            return bootstrap_std([a[i] - b[i] for i in common], num_resamples=num_resamples), \
                f"paired bootstrap over {len(common)} shared prompts"
    return math.hypot(d["pass@1_std"], r["pass@1_std"]), "arms treated as independent: per-prompt results missing"


def _compare(rows: dict[str, dict], comparison: dict, per_prompt: dict | None = None,
             num_resamples: int = 1000) -> dict | None:
    if not comparison.get("distilled") or not comparison.get("rl_only"):
        return None
    arms = {}
    for arm in ("distilled", "rl_only"):
        names = comparison[arm]
        last = rows[names[-1]]
        arms[arm] = {"stages": names, "final_stage": names[-1], "pass@1": last["pass@1"], "pass@1_std": last["pass@1_std"],
                     "greedy_accuracy": last["greedy_accuracy"], "greedy_accuracy_std": last["greedy_accuracy_std"],
                     "optimizer_steps": sum(rows[n]["optimizer_steps"] for n in names),
                     "train_s": sum(rows[n]["train_s"] for n in names)}
    d, r = arms["distilled"], arms["rl_only"]
    # pass@1 is a correctly rounded count ratio (eval_metrics.summarize), so equal scores give gap == 0.0
    gap = d["pass@1"] - r["pass@1"]
    std, method = _gap_std(d, r, per_prompt, num_resamples)
    verdict = "beat" if gap > 0 else "tied with" if gap == 0 else "did not beat"
    significant = std is not None and abs(gap) > 2 * std
    sigma = "not known to be beyond" if std is None else "beyond" if significant else "within"
    return {**arms, "budget": "same total optimizer steps", "pass@1_gap": gap, "pass@1_gap_std": std,
            "pass@1_gap_std_method": method,
            "greedy_gap": d["greedy_accuracy"] - r["greedy_accuracy"], "distillation_beat_rl": gap > 0,
            "significant_2sigma": significant,
            "sentence": (f"Distillation {verdict} RL alone for the student: pass@1 {100 * d['pass@1']:.1f}% vs "
                         f"{100 * r['pass@1']:.1f}% ({100 * gap:+.1f} points, bootstrap std of the gap "
                         f"{_pct(std)} ({method}); {sigma} 2 sigma), "
                         f"greedy {100 * d['greedy_accuracy']:.1f}% vs {100 * r['greedy_accuracy']:.1f}%, at "
                         f"{d['optimizer_steps']} optimizer steps each ({d['train_s']:.0f} s vs {r['train_s']:.0f} s "
                         "of training on this machine).")}


def _pct(value, std=None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _scored_note(r: dict, heldout_prompts: int) -> str:
    """Where a stage scored fewer prompts than the held-out set has, say how many and why."""
    if r["num_prompts"] is None or r["num_prompts"] >= heldout_prompts:
        return ""
    why = [f"{r['dropped_too_long']} too long for the model"] if r["dropped_too_long"] else []
    why += [f"{r['skipped_prompts']} skipped: gold answer ungradable"] if r["skipped_prompts"] else []
    return f"; scored {r['num_prompts']} of {heldout_prompts} prompts ({', '.join(why) or 'reason not recorded'})"


def build_report(records: list[dict], *, comparison: dict, heldout: dict, eval_settings: dict, ran: list[str],
                 per_prompt: dict[str, dict[int, float]] | None = None) -> dict:
    """The report as a dict (``markdown`` holds the rendered text).

    ``per_prompt``: stage -> {held-out prompt index: pass@1 of that prompt}, for the paired bootstrap of the
    comparison's gap (``write_report`` reads it from each stage's samples.jsonl); None = unavailable."""
    rows = {r["stage"]: _row(r) for r in records}
    compare = _compare(rows, comparison, per_prompt, eval_settings.get("bootstrap_resamples") or 1000)
    k = eval_settings.get("k")
    lines = ["# R1 pipeline report", "",
             f"Held-out set: {heldout['num_prompts']} prompts (`{heldout['path']}`, sha256 {heldout['sha256'][:12]}); "
             f"greedy accuracy and pass@1 over k={k} samples at temperature {eval_settings.get('temperature')}, "
             f"top-p {eval_settings.get('top_p')} (percent ± bootstrap std).", "",
             f"| stage | kind | model | opt. steps | greedy acc. | pass@1 (k={k}) | pass@{k} | format | "
             "train s | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        # prompts too long for a stage's model are dropped, ungradable ones skipped: say so where its numbers are
        notes = r["summary"] + _scored_note(r, heldout["num_prompts"])
        lines.append(f"| {r['stage']} | {r['kind']} | {r['family'] or '-'} | {r['optimizer_steps'] or '-'} | "
                     f"{_pct(r['greedy_accuracy'], r['greedy_accuracy_std'])} | {_pct(r['pass@1'], r['pass@1_std'])} | "
                     f"{_pct(r.get(f'pass@{k}'))} | {_pct(r['format_rate'])} | {r['train_s']:.0f} | {notes} |")
    total = sum(r["wall_s"] for r in rows.values())
    if len({(r["num_prompts"], r["dropped_too_long"]) for r in rows.values() if r["num_prompts"] is not None}) > 1:
        lines += ["", "**Stages were scored on different subsets of the held-out set** (their models hold different "
                  "lengths, or prompts were skipped): compare their rows with care."]
    lines += ["", f"Stages run in this invocation: {', '.join(ran) if ran else 'none (all done)'}. "
              f"Sum of stage wall times (training + evaluation): {total:.0f} s.", ""]
    if compare is not None:
        lines += ["## Distillation vs RL alone (student)", "", compare["sentence"], "",
                  f"- distilled: {' -> '.join(compare['distilled']['stages'])}",
                  f"- RL alone: {' -> '.join(compare['rl_only']['stages'])}", ""]
    return {"stages": list(rows.values()), "comparison": compare, "heldout": heldout, "eval_settings": eval_settings,
            "stage_wall_s_total": total, "ran": ran, "markdown": "\n".join(lines)}


def _per_prompt_pass1(path: str) -> dict[int, float] | None:
    """{prompt index: pass@1} of the graded prompts in an r1fast.eval samples.jsonl; None when it is missing."""
    if not os.path.isfile(path):
        return None
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line) if line.strip() else None
            if rec is not None and not rec.get("skipped") and rec.get("correct"):
                out[int(rec["index"])] = sum(map(bool, rec["correct"])) / len(rec["correct"])
    return out or None


def write_report(recipe, records: list[dict], *, ran: list[str]) -> dict:
    """Build the report for ``recipe`` (r1fast.pipeline.Recipe) and write report.json and report.md."""
    from r1fast.stage_io import sha256_file

    source, _, what = recipe.eval.data.partition(":")
    heldout_path = next(r for r in records if r["stage"] == source)["outputs"][what]["path"] if source != "file" else what
    full = heldout_path if os.path.isabs(heldout_path) else os.path.join(recipe.run_dir, heldout_path)
    with open(full, encoding="utf-8") as f:
        n = sum(1 for line in f if line.strip())
    heldout = {"path": heldout_path, "sha256": sha256_file(full), "num_prompts": n}
    settings = {k: getattr(recipe.eval, k) for k in ("k", "temperature", "top_p", "max_new_tokens",
                                                    "bootstrap_resamples", "require_answer_tag")}
    comparison = {"distilled": recipe.comparison.distilled, "rl_only": recipe.comparison.rl_only}
    finals = {arm[-1] for arm in comparison.values() if arm}
    per_prompt = {name: _per_prompt_pass1(os.path.join(recipe.run_dir, name, "eval", "samples.jsonl"))
                  for name in finals}
    report = build_report(records, comparison=comparison, heldout=heldout, eval_settings=settings, ran=ran,
                          per_prompt={k: v for k, v in per_prompt.items() if v is not None})
    # replaced, never written through a symlink planted in a downloaded run directory (r1fast.safe_write)
    write_file(os.path.join(recipe.run_dir, "report.json"),
               json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=2))
    write_file(os.path.join(recipe.run_dir, "report.md"), report["markdown"] + "\n")
    return report


def write_lineage(recipe: Recipe, markers: dict[str, dict]) -> dict:
    """lineage.json: per artifact, the stage, checkpoints and data (with sha256) that made it, and its config."""
    artifacts = {}
    for name in (s.name for s in recipe.stages if s.name in markers):
        m = markers[name]
        made_from = {"checkpoints": [], "data": []}
        for role, refs in m["inputs"].items():
            for ref in refs:
                made_from["checkpoints" if ref["kind"] == "checkpoint" else "data"].append({**ref, "role": role})
        for out_name, out in m["outputs"].items():
            artifacts[out["path"]] = {**out, "stage": name, "output": out_name, "made_from": made_from,
                                      "config": m["config"]}
    lineage = {"run_dir": recipe.run_dir, "recipe": os.path.abspath(recipe.path),
               "stages": [s.name for s in recipe.stages], "artifacts": artifacts}
    write_file(os.path.join(recipe.run_dir, "lineage.json"), json.dumps(lineage, indent=2, default=str))
    return lineage
