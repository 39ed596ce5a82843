"""r1fast.metrics (JSONL logger, rank gating) and r1fast.progress (bar on terminal and non-terminal streams)."""

import io
import json
import math
import warnings

import numpy as np
import pytest
import torch

from r1fast import metrics as M
from r1fast.metrics import MetricsLogger, current_rank, read_metrics
from r1fast.progress import progress

# --------------------------------------------------------------------------------------------------- metrics


def test_log_writes_one_flushed_json_line_per_call(tmp_path):
    with MetricsLogger(str(tmp_path / "run"), rank=0) as logger:
        logger.log(1, loss=torch.tensor(0.5), reward=np.float32(0.25), n=np.int64(7), ok=True, phase="rollout")
        # Flushed before close: a reader sees the line while the run is still going.
        first = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        assert len(first) == 1
        logger.log(2, loss=torch.tensor([1.5], dtype=torch.bfloat16), nan=float("nan"), inf=-math.inf, none=None,
                   arr=np.array(3.0), flag=np.bool_(False))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec1, rec2 = (json.loads(line) for line in lines)  # strict JSON: no NaN tokens
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    assert rec1["step"] == 1 and rec1["loss"] == 0.5 and rec1["reward"] == 0.25
    assert rec1["n"] == 7 and isinstance(rec1["n"], int) and rec1["ok"] is True and rec1["phase"] == "rollout"
    assert isinstance(rec1["time"], float)
    assert rec2 == {"step": 2, "time": rec2["time"], "loss": 1.5, "nan": None, "inf": None, "none": None,
                    "arr": 3.0, "flag": False}
    assert read_metrics(str(tmp_path / "run")) == [rec1, rec2]


def test_log_appends_across_loggers_for_resume(tmp_path):
    for step in (1, 2):
        with MetricsLogger(str(tmp_path), rank=0) as logger:
            logger.log(step, x=step)
    assert [r["x"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2]


def test_nonzero_rank_writes_nothing(tmp_path):
    out = tmp_path / "rank1"
    with MetricsLogger(str(out), rank=1) as logger:
        assert not logger.enabled
        assert logger.log(1, loss=1.0) is None
    assert not out.exists()


def test_rank_defaults_to_torchrun_env_before_init(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert current_rank() == 3
    with MetricsLogger(str(tmp_path / "r3")) as logger:
        logger.log(0, x=1)
    assert not (tmp_path / "r3").exists()
    monkeypatch.delenv("RANK")
    assert current_rank() == 0


@pytest.mark.parametrize(
    "step, metrics, message",
    [
        (1, {"v": torch.ones(2)}, "metric 'v': expected a scalar, got a tensor/array with 2 elements"),
        (1, {"v": np.zeros(3)}, "metric 'v': expected a scalar"),
        (1, {"v": [1, 2]}, "metric 'v': expected a number"),
        (1, {"time": 1.0}, "'time' is reserved"),
        (1.5, {}, "step: expected an int"),
        (True, {}, "step: expected an int"),
    ],
)
def test_bad_values_raise_naming_the_metric(tmp_path, step, metrics, message):
    with MetricsLogger(str(tmp_path), rank=0) as logger, pytest.raises(ValueError, match=message):
        logger.log(step, **metrics)
    assert read_metrics(str(tmp_path)) == []  # nothing half-written


def test_closed_logger_refuses_and_close_is_idempotent(tmp_path):
    logger = MetricsLogger(str(tmp_path), rank=0)
    logger.close()
    logger.close()
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(1, x=1)


def test_tensorboard_missing_warns_once_and_jsonl_still_works(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.setattr(M, "_warned_no_tensorboard", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for sub in ("a", "b"):
            with MetricsLogger(str(tmp_path / sub), rank=0, tensorboard=True) as logger:
                logger.log(1, x=2.0)
    assert [str(w.message) for w in caught if "TensorBoard" in str(w.message)].__len__() == 1
    assert read_metrics(str(tmp_path / "b"))[0]["x"] == 2.0


def test_read_metrics_skips_only_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(str(path)) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(str(path))


@pytest.mark.parametrize("torn", ['{"step": 2, "time": 1.0, "lo', "x" * 70_000])  # the second: > one 64 KiB chunk
def test_resumed_logger_drops_a_torn_last_line_before_appending(tmp_path, torn):
    with MetricsLogger(str(tmp_path), rank=0) as logger:
        logger.log(0, loss=1.0)
        logger.log(1, loss=0.5)
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as fh:
        fh.write(torn)  # the process was killed mid-write
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1]
    with pytest.warns(UserWarning, match=f"dropped a final line cut short by a crash \\({len(torn)} bytes\\)"):
        logger = MetricsLogger(str(tmp_path), rank=0)  # --train.resume latest: the same file
    with logger:
        logger.log(2, loss=0.25)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2]


def test_resumed_logger_leaves_whole_files_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for text in ("", '{"step": 0}\n'):
        path.write_text(text)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            MetricsLogger(str(tmp_path), rank=0).close()
        assert path.read_text() == text
    path.write_text("no newline at all")  # one torn line and nothing else: the file becomes empty
    with pytest.warns(UserWarning, match="17 bytes"):
        MetricsLogger(str(tmp_path), rank=0).close()
    assert path.read_text() == ""


# --------------------------------------------------------------------------------------------------- progress


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_non_tty_prints_rate_limited_plain_lines():
    stream = io.StringIO()
    with progress(10, "rollout", enabled=True, stream=stream, log_interval_s=3600) as bar:
        for i in range(10):
            bar.advance(reward=0.5 + i / 100, **{"tok/s": 1234.5678})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines  # only the final line: nothing per step in a job log
    assert lines[0].startswith("rollout 10/10 (100%) reward=0.59 tok/s=1235 [0:00:00 elapsed")
    assert "\x1b[" not in stream.getvalue()  # no terminal escapes in a log file
    assert bar.completed == 10 and bar.fields["reward"] == pytest.approx(0.59)


def test_progress_non_tty_with_zero_interval_prints_each_advance_and_unknown_total():
    stream = io.StringIO()
    with progress(None, "eval", enabled=True, stream=stream, log_interval_s=0) as bar:
        bar.advance(2, acc="[bold]x")  # markup-like text is printed verbatim
        bar.advance(0, acc=1.0)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("eval 2/? acc=[bold]x [") and lines[1].startswith("eval 2/? acc=1 [")
    assert len(lines) == 3


def test_progress_on_a_terminal_renders_the_rich_bar():
    stream = _FakeTTY()
    with progress(4, "train", enabled=True, stream=stream) as bar:
        bar.advance(4, loss=0.125)
    text = stream.getvalue()
    assert "train" in text and "4/4" in text and "loss=0.125" in text


def test_progress_on_a_terminal_shows_brackets_as_text():
    """'[/think]' or '[/]' in a description or value is data: as rich markup it raised MarkupError."""
    stream = _FakeTTY()
    with progress(3, "[/]", enabled=True, stream=stream) as bar:
        bar.advance(1, last="</answer>[/think]", tag="[bold]x")
    text = stream.getvalue()
    assert "[/]" in text and "last=</answer>[/think]" in text and "tag=[bold]x" in text


def test_progress_disabled_on_nonzero_rank_prints_nothing_but_counts(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    stream = _FakeTTY()
    with progress(3, "train", stream=stream) as bar:
        bar.advance(3, loss=1.0)
    assert stream.getvalue() == "" and bar.completed == 3 and not bar.enabled


def test_progress_rejects_bad_counts():
    with pytest.raises(ValueError, match="total"):
        with progress(-1, "x", enabled=False):
            pass
    with progress(1, "x", enabled=False) as bar, pytest.raises(ValueError, match="n: expected >= 0"):
        bar.advance(-1)


def test_progress_still_prints_final_line_when_the_block_raises():
    stream = io.StringIO()
    with pytest.raises(KeyError), progress(5, "steps", enabled=True, stream=stream) as bar:
        bar.advance(2)
        raise KeyError("boom")
    assert stream.getvalue().startswith("steps 2/5 (40%)")


def test_progress_with_force_color_into_a_file_prints_plain_lines(monkeypatch):
    """rich calls any stream a terminal under FORCE_COLOR (CI sets it for colored logs): a redirected log got
    two redrawn frames a second of escapes and carriage returns. TTY_COMPATIBLE=1 still asks for the bar."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    stream = io.StringIO()
    with progress(5, "train", enabled=True, stream=stream, log_interval_s=3600) as bar:
        bar.advance(5, loss=0.5)
    assert stream.getvalue().startswith("train 5/5 (100%) loss=0.5 [") and "\x1b" not in stream.getvalue()
    assert "\r" not in stream.getvalue() and len(stream.getvalue().splitlines()) == 1
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    stream = io.StringIO()
    with progress(5, "train", enabled=True, stream=stream) as bar:
        bar.advance(5, loss=0.5)
    assert "\x1b[" in stream.getvalue()  # the live bar, as asked


def test_remaining_time_is_what_is_left_and_minutes_wrap():
    stream = io.StringIO()  # not a terminal: the plain line
    with progress(4, "train", enabled=True, stream=stream, log_interval_s=3600) as bar:
        bar.advance(1)
        start = bar._start
        # 1 of 4 done after 3,665 s: 1 h 1 min 5 s elapsed, 3 x 3,665 = 10,995 s = 3:03:15 left
        line = bar.line(now=start + 3665)
    assert "1:01:05 elapsed" in line, line
    assert "~3:03:15 left" in line, line
    assert "1/4 (25%)" in line, line
