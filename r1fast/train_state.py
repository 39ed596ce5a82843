"""Resumable training state: model + optimizer + scheduler + RNG + data position, written atomically.

Layout of ``<run>/checkpoints/step_<N>/``:
    model/              HF format (config.json + safetensors + tokenizer): loads in transformers
    train_state.pt      full (unsharded) model and optimizer state, scheduler, step, loop state, and the
                        KL reference's weights when the run has one (it is refreshed from the policy only
                        every ``ref_update_steps``, so it is state of its own)
    rng_rank<R>.pt      each rank's torch / python / numpy RNG state (a rank the saving run lacked starts
                        from rank 0's, re-seeded: see ``_restore_rng``)

Everything is written into ``step_<N>.tmp``, closed by a manifest (``complete.json``: every file and its
size) and renamed into place once complete, so a crash or a SIGTERM mid-save never leaves a checkpoint that
looks finished. A directory is never deleted under its ``step_<N>`` name: it is renamed to ``step_<N>.old``
first (one atomic rename), then removed, so a kill mid-deletion leaves only a name ``latest_checkpoint``
ignores, and the next save clears it (a kill between a replaced ``step_<N>``'s two renames leaves its
complete ``step_<N>.tmp``, which a resume renames into place: ``finish_interrupted_saves``).
``latest_checkpoint`` also checks the manifest, so a checkpoint cut short some other way (a user's ``rm``, a
full disk) is passed over for the intact one before it. The full state dict is gathered on rank 0
(``get_state_dict(full_state_dict=True, cpu_offload=True)``) and read by every rank on resume; fp32 tensors
round-trip bit for bit, so a resumed CPU run equals an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import sys
import time

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from r1fast import distributed as D
from r1fast.safe_write import remove_tree

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TRASH = re.compile(r"^step_\d+\.(old|tmp)$")


MANIFEST = "complete.json"
"""Written last into a checkpoint: its step, world size and every file with its size in bytes."""


def is_complete_checkpoint(path: str) -> bool:
    """Whether ``path`` holds every file its manifest lists, at the listed sizes (train_state.pt and each
    rank's rng_rank<R>.pt among them). A checkpoint written before manifests existed counts when it holds
    train_state.pt and rng_rank0.pt."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return all(os.path.isfile(os.path.join(path, f)) for f in ("train_state.pt", "rng_rank0.pt"))
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
        return all(os.path.getsize(os.path.join(path, name)) == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):  # a torn manifest or a listed file gone
        return False


_warned_links: set[str] = set()
"""Checkpoint roots whose symlinked ``step_<N>`` entries were already named on stderr (once per root)."""


def _step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, path) of the ``step_<N>`` directories under ``root``, newest first (complete or not). A symlink
    is never one of our checkpoints (a save renames a real directory into place): it is passed over, with one
    stderr line per root; keep_last pruning crashed on one ("Cannot call rmtree on a symbolic link")."""
    if not os.path.isdir(root):
        return []
    named = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))]
    links = [path for _, path in named if os.path.islink(path)]
    if links and root not in _warned_links and D.rank() == 0:
        _warned_links.add(root)
        print(f"r1fast: {root}: ignoring {', '.join(os.path.basename(p) for p in links)} (symlinks are never "
              "checkpoints r1fast wrote: not resumed from, pruned or moved)", file=sys.stderr)
    return sorted(((step, path) for step, path in named if path not in links), reverse=True)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete ``step_<N>`` directory under ``run_dir/checkpoints``, or None: one cut short
    (files missing or truncated) is passed over for the intact one before it."""
    for _, path in _step_dirs(os.path.join(run_dir, "checkpoints")):
        if is_complete_checkpoint(path):
            return path
    return None


def finish_interrupted_saves(run_dir: str) -> list[str]:
    """Rename each complete ``step_<N>.tmp`` of ``run_dir/checkpoints`` whose ``step_<N>`` is absent into place;
    returns the finished paths. A save that replaces ``step_<N>`` (the final save after a periodic one at the
    last step, every mid-SFT checkpoint) moves the old copy to ``step_<N>.old`` before the new one, complete
    and with its manifest, takes the name: a kill between the two renames left no ``step_<N>`` (with keep_last
    1 no checkpoint at all: 'resume latest' found none). Rank 0, with the run directory locked, before
    ``latest_checkpoint`` decides."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    done = []
    for name in sorted(os.listdir(root)):
        m = re.fullmatch(r"(step_\d+)\.tmp", name)
        tmp = os.path.join(root, name)
        if m is None or os.path.islink(tmp) or not os.path.isfile(os.path.join(tmp, MANIFEST)):
            continue  # a manifest is written last: without one the save was cut short
        final = os.path.join(root, m.group(1))
        if not os.path.lexists(final) and is_complete_checkpoint(tmp):
            try:
                os.replace(tmp, final)
            except OSError as err:  # a read-only run directory: left as it is (rank 0 alone must not raise here)
                print(f"r1fast: cannot rename the complete {tmp} into place: {err}", file=sys.stderr)
                continue
            done.append(final)
    return done


def _delete(path: str) -> None:
    """Remove checkpoint ``path`` crash-safely: rename it to ``<path>.old`` (a name nothing reads), then
    delete that; a kill in between leaves ``.old`` trash that the next save clears. A symlink is unlinked, its
    target left alone."""
    aside = path + ".old"
    remove_tree(aside, ignore_errors=True)
    os.replace(path, aside)
    remove_tree(aside)


def _clear_trash(root: str) -> None:
    """Remove what a kill mid-save or mid-deletion left under ``root``: ``step_<N>.old`` and stale
    ``step_<N>.tmp`` directories (one run writes a run directory at a time; each can be a full checkpoint)."""
    for name in os.listdir(root):
        if _TRASH.match(name):
            remove_tree(os.path.join(root, name), ignore_errors=True)


def prune_checkpoints(run_dir: str, keep_last: int, *, keep: str) -> list[str]:
    """Delete the complete ``step_<N>`` checkpoints of ``run_dir`` beyond the newest ``keep_last`` (by step),
    never ``keep`` (the one just written); returns the deleted paths. 0 keeps all. Every kind of save counts:
    periodic, SIGTERM, final, and the cold-start SFT's (step_0, superseded by any later one). Incomplete
    directories are left alone (``latest_checkpoint`` never picks them). Rank 0 only; a resumed run read its
    checkpoint before its first save (every rank passed collectives since), so none is being read."""
    if keep_last <= 0:
        return []
    complete = [path for _, path in _step_dirs(os.path.join(run_dir, "checkpoints")) if is_complete_checkpoint(path)]
    doomed = [path for path in complete[keep_last:] if os.path.normpath(path) != os.path.normpath(keep)]
    for path in doomed:
        _delete(path)
    return doomed


def _missing_rank_file(tmp: str, world: int) -> str | None:
    """Why rank 0 cannot vouch for ``tmp`` (a rank's RNG file it does not see), or None."""
    missing = [r for r in range(world) if not os.path.isfile(os.path.join(tmp, f"rng_rank{r}.pt"))]
    if not missing:
        return None
    return (f"{tmp}: rank 0 does not see rng_rank{missing[0]}.pt that rank {missing[0]} wrote: train.out_dir must "
            "be a directory all nodes share")


def _write_manifest(tmp: str, step: int, world: int) -> None:
    """List every file of the finished ``tmp`` with its size (``is_complete_checkpoint`` checks them)."""
    files = {}
    for dirpath, _, names in os.walk(tmp):
        for name in names:
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, tmp)] = os.path.getsize(full)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"step": step, "world_size": world, "files": files}, f, indent=1)


def _rng_state() -> dict:
    """Tensors, ints and tuples only, so it loads with ``weights_only=True`` (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _load_rng(file: str) -> dict:
    """A rank's RNG file, unpickled with ``weights_only=True``: a checkpoint is data, and a crafted one ran a shell
    command on ``--train.resume`` (weights_only=False). Files from before r1fast stored numpy's keys as a tensor
    hold an ndarray: only numpy's array reconstruction is allowed for them."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        core = getattr(np, "_core", None) or np.core  # numpy 2 renamed it
        with torch.serialization.safe_globals([core.multiarray._reconstruct, np.ndarray, np.dtype,
                                               type(np.dtype(np.uint32))]):
            return torch.load(file, map_location="cpu", weights_only=True)


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, step: int, root: torch.nn.Module, model, optimizer, scheduler, loop_state: dict,
                    tokenizer=None, reference: torch.nn.Module | None = None, hf_dtype: torch.dtype | None = None,
                    keep_last: int = 0) -> str:
    """Write the checkpoint of ``step`` (with the frozen KL ``reference``, when given; the HF copy in ``hf_dtype``,
    default the parameters'), then keep only the newest ``keep_last`` checkpoints (0 = all; see
    ``prune_checkpoints``); every rank must call it. Returns the final directory."""
    final = os.path.join(run_dir, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    if D.rank() == 0:
        # before writing: a kill's or a full disk's leftovers (another step's partial save held its space while
        # this one was written), this step's own step_<N>.tmp among them (a symlink there made makedirs fail:
        # unlinked)
        if os.path.isdir(os.path.dirname(tmp)):
            _clear_trash(os.path.dirname(tmp))
        os.makedirs(tmp)
    D.barrier()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(root, optimizer, options=opts)
    ref_sd = get_model_state_dict(reference, options=opts) if reference is not None else None
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{D.rank()}.pt"))
    if D.rank() == 0:
        torch.save({"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(), "step": step,
                    "loop": loop_state, "reference": ref_sd}, os.path.join(tmp, "train_state.pt"))
        hf_dir = os.path.join(tmp, "model")
        prefix = "model."
        weights = {k[len(prefix):]: v for k, v in model_sd.items() if k.startswith(prefix)}
        save_hf(model, weights, hf_dir, dtype=hf_dtype)
        if tokenizer is not None:
            tokenizer.save(hf_dir)
    D.barrier()
    # agreed by every rank: an error on rank 0 alone would leave the others waiting at the next barrier
    problem = D.broadcast_object(_missing_rank_file(tmp, D.world_size()) if D.rank() == 0 else None)
    if problem is not None:
        raise RuntimeError(problem)
    if D.rank() == 0:
        _write_manifest(tmp, step, D.world_size())
        # step_<N> exists when this step was saved before (the final save after a periodic one at the last
        # step; every SFT interruption is step_0): moved aside, never deleted in place, so no moment shows a
        # half-deleted step_<N> (a kill mid-rmtree left one that resume "latest" picked and failed to load)
        if os.path.lexists(final):  # lexists: renaming a directory over a dangling symlink fails (ENOTDIR)
            remove_tree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        _clear_trash(os.path.dirname(final))
        prune_checkpoints(run_dir, keep_last, keep=final)
    D.barrier()
    return final


def save_hf(model, weights: dict, path: str, dtype: torch.dtype | None = None) -> None:
    """save_pretrained of ``model``'s architecture with the gathered full ``weights``, in ``dtype`` (default: the
    parameters'; a bf16 run passes bf16, its fp32 master weights would double the bytes)."""
    from r1fast.checkpoint_save import save_pretrained

    # not the fp32 default: a shell in fp32 saved bf16 runs as float32 (twice the bytes, and config.json said so)
    dtype = dtype or next(iter(model.parameters())).dtype
    shell = type(model).from_config(model.args, device="meta", dtype=dtype) if hasattr(type(model), "from_config") \
        else None
    if shell is None:
        raise ValueError(f"{type(model).__name__} cannot be saved in HF format")
    shell.to_empty(device="cpu")
    shell.load_state_dict(weights, strict=True)
    save_pretrained(shell, path)


def _check_same_model(path: str, saved: dict, root: torch.nn.Module) -> None:
    """ConfigError naming train.resume when the checkpoint's weights are not this model's (names and full
    shapes): set_state_dict raised a torch RuntimeError about missing optimizer state instead."""
    from r1fast.config_io import ConfigError

    live = {name: tuple(t.shape) for name, t in get_model_state_dict(root).items()}
    stored = {name: tuple(t.shape) for name, t in saved.items()}
    if live == stored:
        return
    missing, extra = sorted(live.keys() - stored.keys()), sorted(stored.keys() - live.keys())
    differ = [f"{n} {stored[n]} vs {live[n]}" for n in sorted(live.keys() & stored.keys()) if live[n] != stored[n]]
    what = (f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model lacks" if extra
            else f"has {differ[0]} (checkpoint vs this model)")
    raise ConfigError(f"train.resume: {path} holds another model's weights ({what}; {len(missing)} missing, "
                      f"{len(extra)} extra, {len(differ)} of another shape); resume with the model it was trained with")


def load_checkpoint(path: str, root: torch.nn.Module, optimizer, scheduler,
                    reference: torch.nn.Module | None = None) -> tuple[int, dict]:
    """Restore model, optimizer, scheduler, the KL ``reference`` (when given) and this rank's RNG from
    ``path``; returns (step, loop_state). A checkpoint written without a reference (a run with beta = 0)
    gives the reference the restored policy's weights."""
    state_file = os.path.join(path, "train_state.pt")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{state_file}: not a finished r1fast checkpoint (train_state.pt missing)")
    # Every rank reads the full state (checkpoints live on a filesystem all ranks see, as the per-rank
    # RNG files already require) and keeps its own shard: no broadcast whose collective order could
    # differ between the rank that holds the data and the ranks that do not.
    state = torch.load(state_file, map_location="cpu", weights_only=True)  # data only: see _load_rng
    _check_same_model(path, state["model"], root)
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    if reference is not None:
        ref_sd = state.get("reference")
        if ref_sd is None:
            ref_sd = state["model"]  # policy and reference share one module layout
            if D.rank() == 0:
                print(f"r1fast: {path} holds no KL reference (written with grpo.beta=0); the reference starts "
                      "from the restored policy", file=sys.stderr)
        set_model_state_dict(reference, ref_sd, options=StateDictOptions(full_state_dict=True))
    meta = state
    scheduler.load_state_dict(meta["scheduler"])
    _restore_rng(path)
    return meta["step"], meta["loop"]


def saved_world_size(path: str) -> int:
    """How many ranks wrote checkpoint ``path``: its manifest's world_size, or (a checkpoint from before
    manifests) how many consecutive rng_rank<R>.pt files it holds."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return int(json.load(f)["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        world = 0
        while os.path.isfile(os.path.join(path, f"rng_rank{world}.pt")):
            world += 1
        return world


def _restore_rng(path: str) -> None:
    """This rank's RNG state from ``path``; a rank the saving run did not have starts from rank 0's state
    re-seeded with (a number drawn from it) + rank, the same on every resume.

    Why a fallback and not an error: training draws nothing from the global RNGs that shapes its trajectory.
    Rollout sampling uses one generator per sample seeded from (train.seed, step, prompt, sample)
    (``r1fast.seeding.rollout_seeds``), evaluation passes train.seed, the data order is seeded by
    ``r1fast.data.order``, and the model has no dropout; a 2-rank checkpoint resumed on 1 rank was already
    bit-exact. Raising on the new ranks alone left rank 0 dying in gloo ("Connection closed by peer")."""
    saved = saved_world_size(path)
    if D.rank() < saved:
        _set_rng_state(_load_rng(os.path.join(path, f"rng_rank{D.rank()}.pt")))
        return
    if D.rank() == saved and D.rank() > 0:  # one line for all new ranks; rank 0 may not be a new rank
        print(f"r1fast: {path} was written by {saved} rank(s), resumed on {D.world_size()}: ranks {saved}.."
              f"{D.world_size() - 1} start from rank 0's RNG state re-seeded per rank (training draws its "
              "randomness from per-sample seeds, so the trajectory does not depend on it)", file=sys.stderr)
    _set_rng_state(_load_rng(os.path.join(path, "rng_rank0.pt")))
    seed = int(torch.randint(0, 2**62, (1,))) + D.rank()  # deterministic: drawn from rank 0's restored state
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds


def rewind_run_dir(run_dir: str, path: str, step: int, sft_step: int | None) -> None:
    """After resuming ``run_dir`` from checkpoint ``path`` (at GRPO ``step``, or mid-SFT at ``sft_step``), make
    the run directory read as if the run had stopped there (every rank calls it; rank 0 writes):

    - its checkpoints newer than ``step`` (``path`` need not be one of them) move to
      ``checkpoints/abandoned-<UTC time>/`` (renamed, never deleted), with one stderr line: a resume from an
      older checkpoint (a fork) with keep_last 1 kept the abandoned run's step_6 and pruned the fork's own, so a
      later ``resume latest`` continued the old run;
    - metrics.jsonl loses the records logged after the checkpoint (``trim_metrics``): a crash between
      checkpoints logged steps that the resumed run logs again (rl steps read 1, 2, 3, 3, 4); after a fork the
      dropped records go to ``abandoned-<UTC time>/metrics.jsonl`` beside the checkpoints they belong to."""
    from r1fast.metrics import trim_metrics

    if D.rank() == 0:
        # wherever ``path`` lies (this run's checkpoints, or a copy's: cp -r a b, then b resumed from a's step_2),
        # this directory's later checkpoints belong to the branch the resumed run leaves
        aside = _set_aside_newer(os.path.join(run_dir, "checkpoints"), step)
        trim_metrics(run_dir, step, sft_step,
                     keep_dropped=None if aside is None else os.path.join(aside, "metrics.jsonl"))
    D.barrier()


def _set_aside_newer(root: str, step: int) -> str | None:
    """Move the ``step_<N>`` directories of ``root`` with N > ``step`` into ``root/abandoned-<UTC time>``;
    returns that directory (None when nothing was newer)."""
    newer = sorted((s, p) for s, p in _step_dirs(root) if s > step)
    if not newer:
        return None
    aside = os.path.join(root, "abandoned-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    while os.path.exists(aside):  # two forks within one second
        aside += "+"
    os.makedirs(aside)
    for _, src in newer:
        os.replace(src, os.path.join(aside, os.path.basename(src)))
    names = ", ".join(os.path.basename(p) for _, p in newer)
    print(f"r1fast.train: resumed from step {step}: moved its later checkpoints ({names}) to {aside} "
          "(nothing deleted; 'resume latest' now continues this run)", file=sys.stderr)
    return aside
