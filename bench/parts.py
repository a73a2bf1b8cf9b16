"""Sections ``parts`` and ``compile``: GCM, TTA and ensemble costs, memory layout, precision, compilation."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn

from bench.measure import (
    BenchContext,
    Row,
    interleaved_seconds,
    measure_interleaved,
    median_rate,
    median_ratio,
    ratio_of,
    time_module,
)
from bench.submit import create_model_only, load_test_batches, run_forward_only, run_submit
from core.checkpoint import load_model
from core.config import ModelConfig
from core.devices import resolve_channels_last
from core.model import create_classifier
from gcm import GradientConcealment
from infer.defended import EnsembleTTA, View, resolve_views


def bench_gcm(ctx: BenchContext, model: nn.Module, x: torch.Tensor, label: str) -> None:
    gcm = GradientConcealment()
    reps = max(5, ctx.settings.repeats * 3)
    for _ in range(2):
        time_module(model, x, 1), time_module(gcm, x, 5)
    pairs = []
    for _ in range(reps):
        pairs.append((time_module(gcm, x, 20), time_module(model, x, 1)))
    ratio = median_ratio(pairs)
    ctx.rows.append(
        Row(
            "parts",
            f"GCM / one forward ({label})",
            ratio,
            f"{statistics.median(p[0] for p in pairs) * 1e3:.2f} ms vs "
            f"{statistics.median(p[1] for p in pairs) * 1e3:.1f} ms, batch {x.shape[0]}",
            ("<", 0.01),
            unit="%",
        )
    )


def whole_vs_parts(
    whole: nn.Module, parts: Sequence[nn.Module], x: torch.Tensor, rounds: int
) -> list[tuple[float, float]]:
    """Per round, (seconds of ``whole(x)``, summed seconds of each part on ``x``), interleaved."""
    fns = {"whole": lambda: time_module(whole, x, 1)}
    fns.update({f"part{i}": (lambda m=m: time_module(m, x, 1)) for i, m in enumerate(parts)})
    for fn in fns.values():
        fn()
    pairs = []
    for _ in range(rounds):
        t = interleaved_seconds(fns, 1)
        pairs.append((t["whole"], sum(v for k, v in t.items() if k != "whole")))
    return pairs


def bench_parts(ctx: BenchContext) -> None:
    """GCM against one forward, TTA views batched against single views, an ensemble against its
    members, and the CPU's view of the GPU switches."""
    cfg, s = ctx.config(), ctx.settings
    rounds = max(3, 3 * s.repeats)  # each round takes well under a second: buy robustness
    member = in_layout(load_model(ctx.checkpoint)[0], cfg)
    x = torch.rand(cfg.submit.batch_size, 3, s.image_size, s.image_size)
    bench_gcm(ctx, member, x, f"{cfg.model.name} at {s.image_size} px")
    if not s.quick:
        # The challenge's model and resolution: a forward costs ~8x more per pixel than the demo's.
        tiny = create_classifier(ModelConfig(name="convnext_tiny", drop_path_rate=0.0), cfg.data.num_classes).eval()
        bench_gcm(ctx, tiny, torch.rand(8, 3, 224, 224), "convnext_tiny at 224 px")
        del tiny
    bench_tta_views(ctx, member, x, rounds)
    bench_ensemble(ctx, member, x, rounds)
    bench_cpu_switches(ctx, x, rounds)


def in_layout(model: nn.Module, cfg) -> nn.Module:
    """``model`` in the memory layout ``model.channels_last`` gives on this machine."""
    return model.to(memory_format=torch.channels_last) if resolve_channels_last(cfg.model.channels_last) else model


def ms_pair(pairs) -> str:
    return (
        f"{statistics.median(p[0] for p in pairs) * 1e3:.0f} vs {statistics.median(p[1] for p in pairs) * 1e3:.0f} ms"
    )


def bench_tta_views(ctx: BenchContext, member: nn.Module, x: torch.Tensor, rounds: int) -> None:
    """k TTA views in one batched forward against k single-view forwards."""
    views = resolve_views([1.0, 0.9], hflip=True)[: ctx.settings.tta_views]
    size = ctx.settings.image_size
    batched = EnsembleTTA([member], [size], views).eval()
    singles = [EnsembleTTA([member], [size], [v]).eval() for v in views]
    pairs = whole_vs_parts(batched, singles, x, rounds)
    ctx.rows.append(
        Row(
            "parts",
            f"{len(views)} TTA views batched / {len(views)} single-view forwards",
            median_ratio(pairs),
            f"{ms_pair(pairs)}, batch {len(x)}, views {', '.join(map(str, views))}",
            ("<=", 1.05),
        )
    )


def bench_ensemble(ctx: BenchContext, member: nn.Module, x: torch.Tensor, rounds: int) -> None:
    """An ensemble of ``settings.members`` in one forward against the sum of its members' forwards."""
    cfg, size = ctx.config(), ctx.settings.image_size
    others = []
    for i in range(1, ctx.settings.members):
        torch.manual_seed(i)
        others.append(in_layout(create_classifier(cfg.model, cfg.data.num_classes).eval(), cfg))
    members = [member, *others]
    ensemble = EnsembleTTA(members, [size] * len(members), [View()]).eval()
    alone = [EnsembleTTA([m], [size], [View()]).eval() for m in members]
    pairs = whole_vs_parts(ensemble, alone, x, rounds)
    ctx.rows.append(
        Row(
            "parts",
            f"ensemble of {len(members)} / sum of its members",
            median_ratio(pairs),
            f"{ms_pair(pairs)}, batch {len(x)}",
            ("<=", 1.05),
        )
    )


def bench_cpu_switches(ctx: BenchContext, x: torch.Tensor, rounds: int) -> None:
    """The CPU's view of the GPU switches: channels_last and bf16 autocast against the default forward."""
    plain, _ = load_model(ctx.checkpoint)
    cl = load_model(ctx.checkpoint)[0].to(memory_format=torch.channels_last)

    def bf16_forward() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return time_module(plain, x, 1)

    fns = {"cl": lambda: time_module(cl, x, 1), "plain": lambda: time_module(plain, x, 1), "bf16": bf16_forward}
    r = measure_interleaved(fns, rounds, warmup=True)
    for key, label in (
        ("cl", "channels_last forward / default layout forward (time)"),
        ("bf16", "bf16 autocast forward / float32 forward (time)"),
    ):
        ctx.rows.append(
            Row(
                "parts",
                label,
                ratio_of(r, key, "plain"),
                f"{statistics.median(r[key]) * 1e3:.1f} vs {statistics.median(r['plain']) * 1e3:.1f} ms, "
                f"batch {len(x)}, CPU; < 1 is faster",
            )
        )


def bench_compile(ctx: BenchContext) -> None:
    """``model.compile=true`` on CPU: the forward, and submit end to end with compilation."""
    cfg = ctx.config()
    compiled_cfg = ctx.config("model.compile=true")
    batches = load_test_batches(ctx.test_dir, ctx.settings.image_size, cfg.submit.batch_size)
    eager = create_model_only(ctx.checkpoint, cfg)
    start = time.perf_counter()
    compiled = create_model_only(ctx.checkpoint, compiled_cfg)
    run_forward_only(compiled, batches)
    first = time.perf_counter() - start
    fns = {"compiled": lambda: run_forward_only(compiled, batches), "eager": lambda: run_forward_only(eager, batches)}
    r = measure_interleaved(fns, ctx.settings.repeats, warmup=True)
    ctx.rows.append(
        Row(
            "compile",
            "compiled forward / eager forward (img/s)",
            ratio_of(r, "compiled", "eager"),
            f"{median_rate(r['compiled'])} vs {median_rate(r['eager'])} img/s; first call (compilation) {first:.0f} s",
        )
    )
    fns = {"compiled": lambda: run_submit(ctx, "model.compile=true"), "eager": lambda: run_submit(ctx)}
    r = measure_interleaved(fns, ctx.settings.repeats)
    ctx.rows.append(
        Row(
            "compile",
            "submit model.compile=true / eager, end to end incl. compilation",
            ratio_of(r, "compiled", "eager"),
            f"{median_rate(r['compiled'])} vs {median_rate(r['eager'])} img/s on "
            f"{sum(b.shape[0] for b in batches)} images (compiled kernels cached on disk after the first run)",
        )
    )
