"""Shared pieces of the training-loop tests: the tiny run's CLI arguments and readers of its outputs."""

import os
import subprocess
import sys

from safetensors.torch import load_file

from r1fast.config import load_config

TINY = [
    "--model.hidden_size", "32", "--model.num_layers", "1", "--model.num_heads", "2", "--model.num_kv_heads", "1",
    "--model.intermediate_size", "64", "--model.max_seq_len", "64", "--model.tie_word_embeddings", "true",
    "--data.task", "addition", "--data.template", "compact", "--data.train_size", "64", "--data.eval_size", "4",
    "--data.sft_size", "32", "--data.params", "{min_digits = 1, max_digits = 1}",
    "--rollout.max_new_tokens", "12", "--grpo.prompts_per_step", "4", "--grpo.samples_per_prompt", "4",
    "--grpo.micro_batch_size", "6", "--grpo.loss_type", "dapo", "--grpo.beta", "0.0",
    "--train.sft_steps", "2", "--train.sft_batch_size", "4", "--train.eval_samples", "2", "--train.lr", "1e-3",
    "--rewards.weights", "{accuracy = 1.0, format = 0.5}",
]


def tiny_config(tmp_path, *extra):
    """The tiny recipe overridden by TINY, writing under tmp_path, plus `extra` CLI arguments."""
    return load_config(None, [*TINY, "--train.out_dir", str(tmp_path), *extra])


def final_weights(run_dir):
    """The weights of the run's latest checkpoint (by step number, not name order)."""
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")), key=lambda n: int(n.split("_")[1]))
    return load_file(os.path.join(run_dir, "checkpoints", ckpts[-1], "model", "model.safetensors"))


def rl_metrics(run_dir):
    """The GRPO steps' records of metrics.jsonl."""
    from r1fast.metrics import read_metrics

    return [m for m in read_metrics(str(run_dir)) if m.get("phase") == "rl"]


def run_cli(tmp_path, name, nproc, *extra, timeout=300):
    """`r1fast.train` as a user runs it: one process, or torchrun with `nproc` gloo ranks, on the torch kernels."""
    env = {**os.environ, "R1FAST_KERNELS": "torch", "OMP_NUM_THREADS": "1", "R1FAST_PROGRESS": "0"}
    env.pop("TRITON_INTERPRET", None)
    args = [*TINY, "--train.out_dir", str(tmp_path), "--train.name", name, *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "r1fast.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "r1fast.train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path))


def tiny_sft_config(tmp_path, examples: int = 4, name: str = "s"):
    """An r1fast.sft config for one step on ``examples`` generated worked solutions (a 1-layer model)."""
    import json

    from r1fast.config_io import load_config
    from r1fast.data import generate_tasks, worked_solution
    from r1fast.sft import SFTConfig

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": s["prompt"], "completion": worked_solution(s)}) + "\n"
                            for s in generate_tasks("addition", examples, seed=0, min_digits=1, max_digits=1)))
    return load_config(None, ["--data", str(data), "--out_dir", str(tmp_path), "--name", name, "--template",
                              "compact", "--model.num_layers", "1", "--model.hidden_size", "32",
                              "--model.intermediate_size", "64", "--model.num_heads", "2", "--model.num_kv_heads", "1",
                              "--steps", "1", "--batch_size", "2"], schema=SFTConfig)
