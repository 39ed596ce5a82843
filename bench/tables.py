"""Rich tables for the terminal: the case list, the ceilings, one results table per family."""

from __future__ import annotations

from collections.abc import Mapping

from rich.markup import escape
from rich.table import Table

from bench.rows import (
    DASH,
    fmt_floor_ratio,
    fmt_gib,
    fmt_ms,
    fmt_num,
    fmt_peer_ratio,
    fmt_shape,
    fmt_throughput,
)


def floor_label(case) -> str:
    """What the case's floor is computed from, e.g. ``"1.1e+12 FLOP @ bf16_matmul"``."""
    parts = []
    if case.flops is not None and case.ceiling != "copy":
        parts.append(f"{case.flops:.3g} FLOP @ {case.ceiling}")
    if case.bytes is not None:
        parts.append(f"{case.bytes:.3g} B @ copy")
    return " + ".join(parts) if parts else DASH


def list_table(entries: list[tuple[str, object]], seconds: list[float] | None = None) -> Table:
    """``--list``: every selected case with its shape, implementations, floor and estimated seconds."""
    table = Table(title="Registered benchmark cases", show_lines=False)
    for column in ("family", "case", "quick", "shape", "impls", "floor", "est. s"):
        table.add_column(column, overflow="fold")
    for i, (family, case) in enumerate(entries):
        impls = ", ".join(f"{i.name}*" if i.ours else i.name for i in case.impls)
        est = f"{seconds[i]:.0f}" if seconds is not None else DASH
        cells = (family, case.name, "yes" if case.quick else "no", fmt_shape(case.shape), impls, floor_label(case), est)
        table.add_row(*(escape(c) for c in cells))
    table.caption = "* = r1fast's own implementation"
    return table


def ceilings_table(ceilings: Mapping[str, Mapping], title: str = "Device ceilings") -> Table:
    table = Table(title=title)
    for column, justify in (("ceiling", "left"), ("measured", "right"), ("ms", "right"), ("what", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for name, c in ceilings.items():
        value = (
            f"{fmt_num(c['value'])} {c['unit']}" if c.get("value") is not None else f"{DASH} ({c.get('reason', '')})"
        )
        table.add_row(name, escape(value), fmt_ms(c.get("ms")), escape(c.get("what", "")))
    return table


def family_table(family: str, cases: list[Mapping]) -> Table:
    """One section per case, one row per implementation; r1fast's row in bold."""
    table = Table(title=f"{family}", title_justify="left")
    columns = (
        ("case / impl", "left"),
        ("ms", "right"),
        ("throughput", "right"),
        ("× floor", "right"),
        ("× fastest peer", "right"),
        ("extra GiB", "right"),
        ("note", "left"),
    )
    for column, justify in columns:
        table.add_column(column, justify=justify, overflow="fold")
    for case in cases:
        floor = f"floor {fmt_ms(case.get('floor_ms'))} ms" if case.get("floor_ms") else "no floor"
        about = "; ".join(part for part in (fmt_shape(case["shape"]), floor) if part)
        table.add_row(f"[bold cyan]{escape(case['name'])}[/]", "", "", "", "", "", escape(about))
        for row in case["rows"]:
            name = f"  [bold]{escape(row['impl'])}[/]" if row["ours"] else f"  {escape(row['impl'])}"
            timed = row["status"] == "ok"
            table.add_row(
                name,
                fmt_ms(row["ms"]) if timed else f"[yellow]{row['status']}[/]",
                fmt_throughput(row),
                fmt_floor_ratio(row["x_floor"]),
                fmt_peer_ratio(row["x_fastest_peer"]),
                fmt_gib(row["extra_gib"]),
                "" if timed else escape(row["reason"]),
            )
        table.add_section()
    return table
