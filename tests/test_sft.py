"""r1fast.sft: data reading, prompt rendering, the completion-only loss, determinism, FSDP2 ranks, bad input."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import save_char_checkpoint, save_tiny_moe_checkpoint
from safetensors.torch import load_file

from r1fast.config_io import ConfigError, DataError, load_config
from r1fast.data import apply_template, generate_tasks, worked_solution
from r1fast.data_setup import build_tokenizer
from r1fast.model import Transformer
from r1fast.policy import PolicyHead, pack
from r1fast.sft import (
    SFTConfig,
    batch_indices,
    build_model,
    encode_sft_examples,
    fit_sft_examples,
    read_sft_records,
    render_prompt,
    run_sft,
)
from r1fast.tokenizer import CharTokenizer
from r1fast.tokenizer import load as load_tokenizer

TINY = ["--model.num_layers", "1", "--model.hidden_size", "32", "--model.intermediate_size", "64",
        "--model.num_heads", "2", "--model.num_kv_heads", "1", "--model.max_seq_len", "64"]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _task_data(path, n=12, seed=0):
    rows = [{"prompt": s["prompt"], "completion": worked_solution(s)}
            for s in generate_tasks("addition", n, seed=seed, min_digits=1, max_digits=2)]
    return _write_jsonl(path, rows)


def _cfg(tmp_path, data, *extra):
    return load_config(None, ["--data", data, "--out_dir", str(tmp_path / "runs"), "--template", "compact", *TINY,
                              *extra], schema=SFTConfig)


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    """Stage tests run the kernels' PyTorch references (the kernels have their own tests); one test below
    runs the interpreted Triton path on purpose."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    monkeypatch.setenv("R1FAST_PROGRESS", "0")


def test_read_records_prompt_completion_and_messages(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "1+1", "completion": "<answer>2</answer>"},
        {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "<answer>4</answer>"}]},
    ])
    recs = read_sft_records(path)
    assert recs == [({"prompt": "1+1"}, "<answer>2</answer>"),
                    ({"messages": [{"role": "user", "content": "2+2"}]}, "<answer>4</answer>")]
    assert len(read_sft_records(path, limit=1)) == 1


@pytest.mark.parametrize("bad, match", [
    ('{"prompt": "x"', "malformed JSON"),
    ('{"prompt": "x"}', "'prompt' and 'completion'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}', "assistant"),
    ('[1, 2]', "JSON object"),
])
def test_malformed_line_names_line_number(tmp_path, bad, match):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n' + bad + "\n")
    with pytest.raises(ValueError, match=rf"d.jsonl:3: .*{match}"):
        read_sft_records(str(path))


def test_render_prompt_chat_template_and_named_templates():
    plain = CharTokenizer()
    assert render_prompt(plain, "auto", prompt="1+2") == apply_template("1+2", "r1_zero")
    assert render_prompt(plain, "compact", prompt="1+2") == "User: 1+2. Assistant:"
    chat = CharTokenizer(chat_template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                       "{% if add_generation_prompt %}<assistant>{% endif %}")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2"}]
    assert render_prompt(chat, "auto", messages=msgs) == "<system>be brief<user>1+2<assistant>"
    assert render_prompt(chat, "compact", prompt="1+2") == "User: 1+2. Assistant:"  # a named template wins
    with pytest.raises(ValueError, match="single user message"):
        render_prompt(plain, "compact", messages=msgs)
    with pytest.raises(ValueError, match="no chat_template"):
        render_prompt(plain, "chat", prompt="1+2")


def test_batch_indices_cover_each_epoch_once_and_are_seeded():
    n, b = 10, 4
    stream = [i for step in range(5) for i in batch_indices(step, b, n, seed=3)]  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(n)) and sorted(stream[10:]) == list(range(n))
    assert stream[:10] != stream[10:]  # a fresh permutation per epoch
    assert batch_indices(2, b, n, seed=3) == batch_indices(2, b, n, seed=3)
    assert batch_indices(0, b, n, seed=3) != batch_indices(0, b, n, seed=4)


def test_loss_counts_completion_tokens_only_and_matches_fp64_reference(tmp_path, monkeypatch):
    """The SFT loss (fused kernel through the Triton interpreter) equals an fp64 cross-entropy over the
    completion tokens alone, value and gradient; prompt tokens carry no loss."""
    monkeypatch.delenv("R1FAST_KERNELS")
    cfg = _cfg(tmp_path, _task_data(tmp_path / "d.jsonl", n=3))
    tok, model = build_model(cfg.model, torch.device("cpu"), seed=1)
    examples, dropped = encode_sft_examples(read_sft_records(cfg.data), tok, "compact", 64)
    assert dropped == 0 and all(c[-1] == tok.eos_id for _, c in examples)
    batch = pack([p for p, _ in examples], [c for _, c in examples])
    loss = PolicyHead(model)(batch, mode="nll")
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_model = Transformer.from_config(model.args, seed=1).double()
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    total, count = 0.0, 0
    for p, c in examples:
        ids = torch.tensor(p + c)
        logits = ref_model.logits(ref_model(ids))
        # position t predicts token t + 1; only the completion's tokens are targets
        logp = torch.log_softmax(logits[len(p) - 1:-1], -1)
        total = total - logp.gather(1, torch.tensor(c)[:, None]).sum()
        count += len(c)
    ref = total / count
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for name, p in ref_model.named_parameters():
        err = (got[name].double() - p.grad).abs().max().item()
        assert err <= 1e-5 * p.grad.abs().max().item() + 1e-9, name


def test_run_sft_learns_saves_and_is_deterministic(tmp_path):
    data = _task_data(tmp_path / "d.jsonl", n=8)
    common = ("--steps", "6", "--batch_size", "4", "--lr", "3e-3", "--warmup_steps", "2")
    a = run_sft(_cfg(tmp_path, data, "--name", "a", "--micro_batch_size", "4", *common))
    b = run_sft(_cfg(tmp_path, data, "--name", "b", "--micro_batch_size", "4", *common))
    c = run_sft(_cfg(tmp_path, data, "--name", "c", "--micro_batch_size", "1", *common))
    d = run_sft(_cfg(tmp_path, data, "--name", "d", "--micro_batch_size", "4", "--seed", "1", *common))
    assert a["final_nll"] < a["first_nll"] and a["steps"] == 6 and a["examples"] == 8
    wa, wb, wc, wd = (load_file(os.path.join(s["model_dir"], "model.safetensors")) for s in (a, b, c, d))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed: bit for bit
    # gradient accumulation over micro-batches gives the same update (global token normalization)
    assert all(torch.allclose(wa[k], wc[k], rtol=1e-4, atol=1e-6) for k in wa)
    assert any(not torch.equal(wa[k], wd[k]) for k in wa)
    run_dir = tmp_path / "runs" / "a"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "model/config.json", "model/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7)) and all(r["phase"] == "sft" for r in lines)
    assert lines[0]["lr"] < lines[1]["lr"]  # warmup
    reloaded = Transformer.from_pretrained(a["model_dir"])
    assert isinstance(load_tokenizer(a["model_dir"]), CharTokenizer) and reloaded.args.num_layers == 1
    # continuing from a saved checkpoint (the path every later stage takes)
    e = run_sft(_cfg(tmp_path, data, "--name", "e", "--steps", "1", "--model.name_or_path", a["model_dir"]))
    assert e["first_nll"] < a["first_nll"]


def test_chat_records_and_too_long_examples(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "<answer>3</answer>"}]},
            {"prompt": "9" * 80, "completion": "x"}]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    s = run_sft(_cfg(tmp_path, data, "--steps", "1", "--batch_size", "1"))
    assert s["examples"] == 1 and s["dropped_too_long"] == 1
    # said on stderr too (it was in summary.json alone), as the cold start, eval and rejection say theirs
    assert "r1fast.sft: dropped 1 of 2 records" in capsys.readouterr().err
    only_long = _write_jsonl(tmp_path / "long.jsonl", rows[1:])
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        run_sft(_cfg(tmp_path, only_long, "--steps", "1"))
    # 'auto' on the tiny model renders r1_zero's long preamble: the error says so (it named only the length)
    with pytest.raises(ValueError, match=r"longer than max_seq_len=64 tokens \(prompts rendered with template "
                                         r"'r1_zero' from auto\)"):
        run_sft(_cfg(tmp_path, only_long, "--steps", "1", "--template", "auto"))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # the skipped steps
def test_nonfinite_losses_are_skipped_then_abort(tmp_path, monkeypatch):
    data = _task_data(tmp_path / "d.jsonl", n=4)
    original = PolicyHead.forward
    monkeypatch.setattr(PolicyHead, "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    with pytest.raises(RuntimeError, match="3 non-finite losses or gradients in a row at step 2"):
        run_sft(_cfg(tmp_path, data, "--steps", "5", "--batch_size", "2"))
    rows = [json.loads(x) for x in (tmp_path / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in rows] == [True, True] and rows[0]["nll"] is None


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # the skipped steps
def test_an_overflowing_backward_counts_as_a_skipped_step_and_nan_is_no_json(tmp_path, monkeypatch):
    """A finite loss whose backward overflowed: clip_and_step kept the weights, but the step was logged
    skipped_nonfinite=false, reset the abort count, and summary.json's NaN nll was no valid JSON."""
    class _InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    data = _task_data(tmp_path / "d.jsonl", n=4)
    original = PolicyHead.forward
    monkeypatch.setattr(PolicyHead, "forward", lambda self, *a, **k: _InfGrad.apply(original(self, *a, **k)))
    with pytest.raises(RuntimeError, match="3 non-finite losses or gradients in a row at step 2"):
        run_sft(_cfg(tmp_path, data, "--steps", "5", "--batch_size", "2"))
    rows = [json.loads(x) for x in (tmp_path / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in rows] == [True, True] and rows[0]["nll"] is not None
    monkeypatch.setattr(PolicyHead, "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    run_sft(_cfg(tmp_path, data, "--steps", "2", "--batch_size", "2", "--name", "nan2"))
    summary = json.loads((tmp_path / "runs" / "nan2" / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
    assert summary["first_nll"] is None and summary["final_nll"] is None


def test_bad_input_fails_before_work(tmp_path):
    data = _task_data(tmp_path / "d.jsonl", n=2)
    with pytest.raises(FileNotFoundError, match="data: file"):
        run_sft(_cfg(tmp_path, str(tmp_path / "missing.jsonl")))
    with pytest.raises(FileNotFoundError, match="model.name_or_path: checkpoint directory"):
        run_sft(_cfg(tmp_path, data, "--model.name_or_path", str(tmp_path / "no_such_ckpt")))
    assert not (tmp_path / "runs").exists()  # nothing was started
    with pytest.raises(ConfigError, match="data: a JSONL file"):
        load_config(None, [], schema=SFTConfig)
    with pytest.raises(ConfigError, match="template"):
        _cfg(tmp_path, data, "--template", "fancy")


@pytest.mark.dist
def test_two_rank_fsdp_equals_one_rank(tmp_path):
    """torchrun with 2 gloo ranks and FSDP2 trains to the same weights as one process (fp32, CPU)."""
    data = _task_data(tmp_path / "d.jsonl", n=8)
    args = ["--data", data, "--template", "compact", "--steps", "3", "--batch_size", "4", "--micro_batch_size", "1",
            "--lr", "3e-3", *TINY, "--out_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "R1FAST_KERNELS": "torch", "R1FAST_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "r1fast.sft", *args, "--name", "two", "--parallel.fsdp", "true"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_sft(load_config(None, [*args, "--name", "one"], schema=SFTConfig))
    one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-6), k
    # Adam hides a constant gradient scale in the weights; the logged loss and gradient norm do not
    logs = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")]
    for a, b in zip(*logs, strict=True):
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_fp8_experts_train_an_moe_model_and_requantize_every_step(tmp_path, monkeypatch):
    from r1fast.kernels.moe_layer import Fp8WeightCache
    from r1fast.moe import set_fp8_experts_fn

    data, model_dir = _task_data(tmp_path / "d.jsonl", n=8), save_tiny_moe_checkpoint(tmp_path / "moe")
    invalidations = []
    real = Fp8WeightCache.invalidate
    monkeypatch.setattr(Fp8WeightCache, "invalidate", lambda self: (invalidations.append(1), real(self))[1])
    common = ("--model.name_or_path", model_dir, "--steps", "4", "--batch_size", "4", "--lr", "3e-3")
    try:
        fp8 = load_config(None, ["--data", data, "--out_dir", str(tmp_path / "runs"), "--template", "compact",
                                 "--name", "fp8", "--parallel.fp8_experts", "true", *common], schema=SFTConfig)
        result = run_sft(fp8)  # the recipe in exact arithmetic here (R1FAST_KERNELS=torch): FP8 numerics
    finally:
        set_fp8_experts_fn(None)
    bf16 = run_sft(load_config(None, ["--data", data, "--out_dir", str(tmp_path / "runs"), "--template", "compact",
                                      "--name", "bf16", *common], schema=SFTConfig))
    assert result["final_nll"] < result["first_nll"]
    assert len(invalidations) == 4  # one per optimizer step
    assert result["first_nll"] == pytest.approx(bf16["first_nll"], rel=0.02)  # FP8 experts, same model
    assert result["first_nll"] != bf16["first_nll"]
    with pytest.raises(ValueError, match="the tiny model is dense"):
        run_sft(_cfg(tmp_path, data, "--name", "dense", "--parallel.fp8_experts", "true"))


def test_the_gradient_does_not_depend_on_the_micro_batch_split(tmp_path, monkeypatch):
    """Global per-token mean: the step's gradient, read where run_sft clips it, is the same for 1, 3 or 7
    sequences per forward (ragged lengths, so a per-micro-batch mean would weight tokens differently)."""
    import r1fast.sft as sft

    data = _task_data(tmp_path / "d.jsonl", n=7)
    grads = {}
    original = sft.clip_and_step

    def recording(root, *args):
        grads[micro] = {n: p.grad.clone() for n, p in root.named_parameters()}
        return original(root, *args)

    monkeypatch.setattr(sft, "clip_and_step", recording)
    for micro in (1, 3, 7):
        run_sft(_cfg(tmp_path, data, "--name", f"m{micro}", "--steps", "1", "--batch_size", "7",
                     "--micro_batch_size", str(micro)))
    examples, _ = encode_sft_examples(read_sft_records(data), CharTokenizer(), "compact", 64)
    assert len({len(c) for _, c in examples}) > 1  # ragged completions
    for name, g in grads[7].items():
        for micro in (1, 3):
            assert (grads[micro][name] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-9, (micro, name)


def test_activation_checkpointing_gives_the_same_weights(tmp_path):
    data = _task_data(tmp_path / "d.jsonl", n=4)
    common = ("--steps", "2", "--batch_size", "4", "--lr", "3e-3")
    plain = run_sft(_cfg(tmp_path, data, "--name", "plain", *common))
    ckpt = run_sft(_cfg(tmp_path, data, "--name", "ckpt", "--parallel.activation_checkpointing", "true", *common))
    wa, wb = (load_file(os.path.join(s["model_dir"], "model.safetensors")) for s in (plain, ckpt))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_data_is_one_line_and_found_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    import r1fast.sft as sft

    monkeypatch.setattr(sft, "build_model", lambda *a, **k: pytest.fail("model built before the data check"))
    (tmp_path / "empty.jsonl").write_text("\n")
    eval_style = _write_jsonl(tmp_path / "ev.jsonl", [{"prompt": "1+1", "answer": "2"}])
    out = ["--out_dir", str(tmp_path / "runs"), *TINY]
    for data, match in ((str(tmp_path / "empty.jsonl"), r"data: '.*empty\.jsonl' holds no records"),
                        (eval_style, r".*ev\.jsonl:1: expected string 'prompt' and 'completion', or 'messages'"),
                        (_write_jsonl(tmp_path / "bad.jsonl", ["x"]), r".*bad\.jsonl:1: expected a JSON object")):
        assert sft.main(["--data", data, *out]) == 1, data
        err = capsys.readouterr().err
        assert re.match(f"r1fast.sft: error: {match}", err) and err.count("\n") == 1, err
    with pytest.raises(DataError):  # programmatic callers get the same type (a ValueError)
        read_sft_records(eval_style)
    assert not (tmp_path / "runs").exists()
    # every record longer than max_seq_len, a max_seq_len past an HF model's positions: known from the tokenizer
    # and config.json, still one line (both were checked after the model was built: a 7B's whole load)
    long = _write_jsonl(tmp_path / "long.jsonl", [{"prompt": "9" * 80, "completion": "x"}])
    assert sft.main(["--data", long, *out]) == 1
    err = capsys.readouterr().err
    assert "r1fast.sft: error: data: all 1 records" in err and "longer than max_seq_len" in err and err.count("\n") == 1
    ckpt = save_char_checkpoint(tmp_path / "ckpt", max_position_embeddings=64)
    assert sft.main(["--data", long, *out, "--model.name_or_path", ckpt, "--max_seq_len", "65"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r1fast.sft: error: max_seq_len=65 exceeds the model's max_position_embeddings=64 ("), err


def test_fit_keeps_an_example_of_exactly_max_seq_len():
    tokenized = [([1, 2, 3], [4, 5]), ([1, 2, 3], [4, 5, 6])]  # 3 + 2 + EOS = 6; 3 + 3 + EOS = 7
    kept, dropped = fit_sft_examples(tokenized, 9, 6)
    assert kept == [([1, 2, 3], [4, 5, 9])] and dropped == 1
    assert fit_sft_examples(tokenized, 9, 7) == ([([1, 2, 3], [4, 5, 9]), ([1, 2, 3], [4, 5, 6, 9])], 0)


def test_the_token_count_is_completion_tokens_plus_eos(tmp_path, monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    monkeypatch.setenv("R1FAST_PROGRESS", "0")
    rows = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "10+20=", "completion": "<answer>30</answer>"},
            {"prompt": "7+0=", "completion": "seven and then some more words"}, {"prompt": "5+5=", "completion": "10"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cfg(name, micro):
        return load_config(None, ["--data", str(data), "--out_dir", str(tmp_path / "runs"), "--template", "compact",
                                  "--steps", "2", "--batch_size", "2", "--micro_batch_size", str(micro),
                                  "--name", name, *TINY], schema=SFTConfig)

    examples, _ = encode_sft_examples(read_sft_records(str(data)), build_tokenizer(cfg("a", 1).model), "compact", 64)
    sizes = [len(c) for _, c in examples]  # completion ids + EOS; prompts carry no loss
    want = sum(sizes)
    assert want < sum(len(p) + len(c) for p, c in examples)
    assert all(2 * (a + b) != want for i, a in enumerate(sizes) for b in sizes[i + 1:])  # a repeated batch shows
    one = run_sft(cfg("a", 1))  # two steps of 2 sequences: one epoch, every example once
    assert one["tokens_trained"] == want
    logged = [json.loads(x) for x in (tmp_path / "runs" / "a" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["tokens"] for r in logged) == want
    # the logged nll is the step's, not its last micro-batch's
    two = run_sft(cfg("b", 2))
    assert one["first_nll"] == pytest.approx(two["first_nll"], rel=1e-6)


def test_a_rerun_after_a_crash_sets_the_earlier_run_aside(tmp_path, monkeypatch, capsys):
    """An SFT killed at step 3, run again: its steps were appended to the crashed run's metrics.jsonl (steps
    1, 2, 1, 2, 3), the plot and a reader saw two runs as one."""
    import r1fast.sft as sft

    data = _task_data(tmp_path / "d.jsonl", n=4)
    cfg = _cfg(tmp_path, data, "--steps", "3", "--batch_size", "2")
    real, calls = sft.clip_and_step, []

    def killed_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "clip_and_step", killed_at_step_3)
    with pytest.raises(MemoryError):
        run_sft(cfg)
    monkeypatch.setattr(sft, "clip_and_step", real)
    run_sft(cfg)
    rows = [json.loads(x) for x in (tmp_path / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    (aside,) = [p for p in os.listdir(tmp_path / "runs") if p.startswith("sft.prev-")]
    earlier = (tmp_path / "runs" / aside / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in earlier] == [1, 2]
    assert "r1fast.sft: " in capsys.readouterr().err
