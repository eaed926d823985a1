"""The tables in README.md and docs/*.md that come from benchmarks/results/*.json, and the size plot.

Each generated table sits between markers in a Markdown file::

    <!-- table:NAME -->
    ...generated, do not edit...
    <!-- /table -->

``python benchmarks/make_docs.py`` rewrites every such block from the JSON (and the plot
``benchmarks/results/ppl_vs_bytes.png``); ``--check`` rewrites nothing and exits 1 when a block differs from what
the JSON gives (``tests/test_docs.py`` runs it). A block names its JSON under the table, so each number links to
the file it comes from. Reads JSON only: no model, no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
PLOT = f"{RESULTS}/ppl_vs_bytes.png"
MODEL_LABELS = {"smollm2": "SmolLM2-135M", "gemma": "Gemma-3-270M"}  # benchmarks' model names in the tables
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _load(root: Path, name: str) -> dict:
    return json.loads((root / RESULTS / name).read_text())


def _rows(data: dict, run: str | None = None) -> list[dict]:
    rows = data["runs"][run]["rows"] if run else data["rows"]
    return list(rows.values()) if isinstance(rows, dict) else rows


def _find(rows: list[dict], **want) -> dict:
    """The one row whose fields equal ``want`` (a missing field counts as None)."""
    hits = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
    if len(hits) != 1:
        raise LookupError(f"{len(hits)} rows match {want}")
    return hits[0]


def _ppl(x: float) -> str:
    return f"{x:,.0f}" if x >= 10_000 else f"{x:.2f}"


def _gap(fp: float, compressed: float, x: float) -> str:
    return f"{100 * (compressed - x) / (compressed - fp):.1f}%"


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# Each table function returns (markdown table, JSON files it read, in order).

def headline(root: Path):
    q = _rows(_load(root, "quality_3bit_g64.json"))
    sm, gm = _load(root, "residual_options_smollm2.json"), _load(root, "residual_options_gemma.json")
    sizes = {r["variant"]: r["safetensors_bytes"] for r in _rows(_load(root, "sizes_smollm2.json"))}
    screen_rows = _rows(_load(root, "screen.json"))
    out = []
    for model, data, svd in (("SmolLM2-135M", sm, _find(q, method="svd", rank=64)), ("Gemma-3-270M", gm, None)):
        base = _rows(data, "uniform_and_refine")
        fp, rtn = _find(base, method="fp"), _find(base, method="none")
        r64 = _find(base, method="eora", rank=64, refine_rounds=None)
        r192 = _find(_rows(data, "cli_default_r192_int4_shrinkage_auto"), method="eora")
        current = _current_default(screen_rows, "smollm2" if model.startswith("SmolLM2") else "gemma")
        ppl = current["ppl"] if current else r192["ppl"]  # the same layout: r192's bytes stand
        bf16 = (lambda v: _mb(sizes[v])) if model.startswith("SmolLM2") else (lambda v: "-")
        f, c = fp["ppl"], rtn["ppl"]
        out += [
            [model, "fp32", _ppl(f), "-", _mb(fp["packed_bytes"]), bf16("bf16 original")],
            ["", "3-bit g64 RTN", _ppl(c), "-", _mb(rtn["packed_bytes"]), bf16("RTN int3 g64, adapters none")],
            ["", "+ plain SVD r64", _ppl(svd["ppl"]) if svd else "not measured", _gap(f, c, svd["ppl"]) if svd else "-",
             _mb(r64["packed_bytes"]) if svd else "-", bf16("RTN int3 g64, adapters bf16 r64") if svd else "-"],
            ["", "+ EoRA r64", _ppl(r64["ppl"]), _gap(f, c, r64["ppl"]), _mb(r64["packed_bytes"]),
             bf16("RTN int3 g64, adapters bf16 r64")],
            ["", "**+ EoRA r192, int4 adapters (CLI default)**", f"**{_ppl(ppl)}**",
             f"**{_gap(f, c, ppl)}**", _mb(r192["packed_bytes"]), bf16("RTN int3 g64, adapters int4 g32 r192")],
        ]
    header = ["model", "variant", "perplexity", "gap closed", "MB in memory (fp32 run)", "MB checkpoint (bf16)"]
    return _table(header, out), ["residual_options_smollm2.json", "residual_options_gemma.json", "quality_3bit_g64.json",
                                 "sizes_smollm2.json", "screen.json"]


def _current_default(rows: list[dict], model: str) -> dict | None:
    """The CLI default job at the full job's data as the current code runs it: the last 128-window screen row of
    ``model`` with no extra flags that records its residual (older rows predate the quantization-aware adapters)."""
    found = [r for r in rows
             if r["model"] == model and r["calib_samples"] == 128 and not r["flags"] and "residual" in r]
    return found[-1] if found else None


def quality_rtn(root: Path):
    rows = _rows(_load(root, "quality_3bit_g64.json"))
    fp, rtn = _find(rows, method="fp"), _find(rows, method="none")
    out = []
    for label, r in (("fp32", fp), ("3-bit g64 RTN", rtn), ("+ plain SVD r64 (LoRC)", _find(rows, method="svd")),
                     ("**+ EoRA r64**", _find(rows, method="eora"))):
        gap = _gap(fp["ppl"], rtn["ppl"], r["ppl"]) if r["method"] in ("svd", "eora") else "-"
        out.append([label, _ppl(r["ppl"]), gap] + [f"{r[t]:.2f}" for t in ("piqa", "arc_easy", "hellaswag")])
    return _table(["model", "ppl", "gap closed", "piqa", "arc_easy", "hellaswag"], out), ["quality_3bit_g64.json"]


_PAPER = {  # arXiv 2410.21271, LLaMA3-8B WikiText-2: none / SVD / EoRA (only the shape carries over)
    "sparsegpt-2:4": ("SparseGPT 2:4", "12.32 / 11.31 / 11.07"),
    "wanda-2:4": ("Wanda 2:4", "21.4 / 17.2 / 14.0"),
    "gptq": ("GPTQ 3-bit g64", "15.64 / 10.24 / 10.06"),
    "gptq+sparsegpt-2:4": ("GPTQ 4-bit g64 + SparseGPT 2:4", "86.15 / 12.84 / 12.60"),
}


def paper_suite(root: Path):
    rows = _rows(_load(root, "paper_suite_r64.json"))
    zs = lambda r: sum(r[t] for t in ("piqa", "arc_easy", "hellaswag")) / 3  # noqa: E731
    fp = _find(rows, method="fp")
    out = [["fp32", _ppl(fp["ppl"]), "-", "-", f"{zs(fp):.2f}", "6.13"]]
    for comp, (label, paper) in _PAPER.items():
        none, svd, eora = (_find(rows, compression=comp, method=m) for m in ("none", "svd", "eora"))
        out.append([label, _ppl(none["ppl"]), _ppl(svd["ppl"]), f"**{_ppl(eora['ppl'])}**",
                    " / ".join(f"{zs(r):.2f}" for r in (none, svd, eora)), paper])
    header = ["compression (SmolLM2-135M)", "ppl none", "ppl SVD r64", "ppl EoRA r64", "0-shot none / SVD / EoRA",
              "paper LLaMA3-8B ppl none / SVD / EoRA"]
    return _table(header, out), ["paper_suite_r64.json"]


def gptq_engine(root: Path):
    rows = [r for r in _rows(_load(root, "gptq_study.json")) if r["n_samples"] == 128 and r["eval_tokens"] == 20000]
    specs = [("fp32", "fp"), ("RTN", "rtn"), ("GPTQ act-order, plain `v_proj` moment", "gptq,via=engine,act=1,v=plain"),
             ("**GPTQ act-order, attention-weighted `v_proj` moment (the default)**", "gptq,via=engine,act=1,v=head"),
             ("RTN + EoRA r64", "rtn,via=engine,eora=64"),
             ("**GPTQ (default) + EoRA r64**", "gptq,via=engine,act=1,v=head,eora=64"),
             ("GPTQ (default) + EoRA r64, `v_proj` residual attention-weighted",
              "gptq,via=engine,act=1,v=head,eora=64,ev=mixed")]
    # The study has no SmolLM2 fp32 row on this split: that one is the quality run's (same 20,000 tokens).
    rows.append(dict(_find(_rows(_load(root, "quality_3bit_g64.json")), method="fp"), model="smollm2", spec="fp"))
    out = [[label] + [_ppl(_find(rows, model=m, spec=spec)["ppl"]) for m in ("smollm2", "gemma")]
           for label, spec in specs]
    return (_table(["3-bit g64, perplexity", "SmolLM2-135M", "Gemma-3-270M"], out),
            ["gptq_study.json", "quality_3bit_g64.json"])


def residual_options(root: Path):
    sm, gm = _load(root, "residual_options_smollm2.json"), _load(root, "residual_options_gemma.json")

    def cell(data, run, **want):
        if run not in data["runs"]:
            return "-"
        base = _rows(data, "uniform_and_refine")
        f, c = _find(base, method="fp")["ppl"], _find(base, method="none")["ppl"]
        x = _find(_rows(data, run), method="eora", **want)["ppl"]
        return f"{_ppl(x)} ({_gap(f, c, x)})"

    def mb(run, **want):
        return _mb(_find(_rows(sm, run), method="eora", **want)["packed_adapter_bytes"])

    specs = [("+ EoRA r64, fp32 adapters", "uniform_and_refine", {"refine_rounds": None}),
             ("+ EoRA r64, `refine_rounds=2`", "uniform_and_refine", {"refine_rounds": 2}),
             ("+ EoRA r64, `rank_budget=\"global\"`", "global", {}),
             ("+ EoRA r192, int4 g32 adapters, `shrinkage=0`", "r192_int4_adapters", {"refine_rounds": None}),
             ("+ EoRA r192, int4 g32, `shrinkage=0`, `refine_rounds=2`", "r192_int4_adapters", {"refine_rounds": 2}),
             ("**+ EoRA r192, int4 g32, `shrinkage=\"auto\"` (the CLI default)**",
              "cli_default_r192_int4_shrinkage_auto", {})]
    out = []
    for label, run, want in specs:
        out.append([label, mb(run, **want), cell(sm, run, **want), cell(gm, run, **want)])
    header = ["perplexity (gap closed)", "adapter MB (SmolLM2, fp32 run)", "SmolLM2-135M", "Gemma-3-270M"]
    return _table(header, out), ["residual_options_smollm2.json", "residual_options_gemma.json"]


_WINDOWS = {4: ["attention_residual_4windows_sparsegpt.json", "attention_residual_4windows_rest.json"],
            8: ["attention_residual_8windows_gptq.json", "attention_residual_8windows_rest.json"],
            32: ["attention_residual_32windows_gptq.json", "attention_residual_32windows_rest.json"],
            128: ["attention_residual_128windows.json"]}


def attention_residual(root: Path):
    out = []
    for comp, (label, _) in _PAPER.items():
        for n, files in _WINDOWS.items():
            rows = [r for f in files for r in _rows(_load(root, f)) if r.get("compression") == comp]
            svd, eora = _find(rows, method="svd")["ppl"], _find(rows, method="eora")["ppl"]
            out.append([label, str(n), _ppl(svd), f"**{_ppl(eora)}**", f"{100 * (eora / svd - 1):+.1f}%"])
    return (_table(["rank 64, one-shot statistics", "windows", "SVD", "EoRA `\"auto\"`", "EoRA vs SVD"], out),
            [f for files in _WINDOWS.values() for f in files])


def adapter_bits(root: Path):
    rows = _rows(_load(root, "adapter_bits_3bit_g64.json"))
    out = []
    for label, bits, resolve in (("fp32", None, None), ("int8 g32", 8, True), ("**int4 g32**", 4, True),
                                 ("int4 g32, no re-solve", 4, False), ("int3 g32", 3, True),
                                 ("int3 g32, no re-solve", 3, False)):
        e, s = (_find(rows, method=m, rank=64, adapter_bits=bits, resolve=resolve) for m in ("eora", "svd"))
        out.append([label, _ppl(e["ppl"]), _ppl(s["ppl"]), _mb(e["packed_bytes"]), _mb(e["packed_adapter_bytes"])])
    header = ["rank 64 adapters", "EoRA ppl", "SVD ppl", "total MB (fp32 run)", "adapters MB"]
    return _table(header, out), ["adapter_bits_3bit_g64.json"]


def bits_adapters(root: Path):
    rows = _rows(_load(root, "bits_adapters_smollm2.json"))
    sizes = {r["variant"]: r["safetensors_bytes"] for r in _rows(_load(root, "sizes_smollm2.json"))}
    bf16 = sizes["bf16 original"]
    fp = _find(rows, method="fp")["ppl"]
    out = []
    for bits in (4, 3, 2):
        none = _find(rows, bits=bits, method="none")["ppl"]
        for adapters, rank, abits in (("none", 0, None), ("bf16 r64", 64, None), ("int4 g32 r64", 64, 4),
                                      ("int4 g32 r192", 192, 4)):
            r = _find(rows, bits=bits, method="none" if rank == 0 else "eora", rank=rank, adapter_bits=abits)
            size = sizes[f"RTN int{bits} g64, adapters {adapters}"]
            gap = "-" if rank == 0 or bits == 2 else _gap(fp, none, r["ppl"])
            out.append([f"{bits}-bit", adapters, f"{_mb(size)} ({100 * size / bf16:.1f}%)", _ppl(r["ppl"]), gap])
    header = ["RTN g64 base", "adapters", "safetensors MB, bf16 (% of bf16 model)", "ppl", "gap closed"]
    return _table(header, out), ["sizes_smollm2.json", "bits_adapters_smollm2.json"]


def decode_cpu(root: Path):
    data = _load(root, "speed_cpu_decode.json")
    out = []
    for r in data["decode"]:
        label = "fp32 adapters" if r["adapters"] == "float32" else "int4 g64 adapters (packed)"
        out.append([f"SmolLM2-135M, {label}"] + [f"{r[k]:.1f}" for k in ("fp", "torchao", "base", "unfused", "fused")]
                   + [f"**{r['fused/base']:.2f}**"])
    header = ["tokens/s", "fp32", "torchao int4", "base int4 (packed)", "EoRA r64 unfused", "EoRA r64 fused",
              "fused / base"]
    return _table(header, out), ["speed_cpu_decode.json"]


def _layers(data: dict, picks) -> list[list[str]]:
    out = []
    for model, layer, m in picks:
        r = next(r for r in data["layers"] if r["model"] == model and r["layer"] == layer and r["M"] == m
                 and r["mode"] == "compiled")
        fmt = lambda x: f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}"  # noqa: E731
        name = {"smollm2-135m": "SmolLM2", "llama3-8b": "Llama-3-8B"}[model]
        out.append([f"{name} {layer} {r['shape']}", str(m)] + [fmt(r[k]) for k in ("fp", "torchao", "base", "unfused",
                                                                                   "fused")]
                   + [f"{r['fused/base']:.2f}"])
    return out


_LAYER_HEADER = ["compiled, layer (out x in)", "M", "fp", "torchao int4", "base", "EoRA unfused", "EoRA fused",
                 "fused / base"]


def layers_cpu(root: Path):
    picks = [("smollm2-135m", "q/o", 1), ("smollm2-135m", "gate/up", 1), ("smollm2-135m", "gate/up", 16),
             ("smollm2-135m", "gate/up", 2048), ("smollm2-135m", "down", 1), ("llama3-8b", "q/o", 1),
             ("llama3-8b", "q/o", 16), ("llama3-8b", "gate/up", 1), ("llama3-8b", "down", 16),
             ("llama3-8b", "down", 128)]
    return _table(_LAYER_HEADER, _layers(_load(root, "speed_cpu.json"), picks)), ["speed_cpu.json"]


def layers_h200(root: Path):
    picks = [("llama3-8b", "gate/up", m) for m in (1, 16, 128, 2048)] + [("llama3-8b", "down", m) for m in (1, 16, 2048)]
    return _table(_LAYER_HEADER, _layers(_load(root, "speed_h200_llama3_layers.json"), picks)), \
        ["speed_h200_llama3_layers.json"]


def _ratio(row: dict) -> str:
    if "ratio_to_two_bare_forwards" not in row:
        return "-"
    return (f"**{row['ratio_to_two_bare_forwards']:.2f}** ({row['calibration_and_compression_s']:,.0f} s / "
            f"{2 * row['bare_forward_s']:,.0f} s)")


def scale(root: Path):
    rows = _load(root, "scale_cpu.json")["rows"]
    big, small = rows["big"], rows["smollm2"]
    phases = ("forward", "moments", "compress", "shrinkage", "solve", "io")
    ph = lambda r: " / ".join("-" if k not in r["phases_s"] else f"{r['phases_s'][k]:,.0f}" if r["phases_s"][k] >= 10 else f"{r['phases_s'][k]:.1f}" for k in phases)  # noqa
    out = [["model", big["model"], small["model"]],
           ["calibration", big["calibration"], small["calibration"]],
           ["checkpoint", f"{big['checkpoint_gib']:.2f} GiB", "(GGUF, in memory)"],
           ["**peak RSS**", f"**{big['peak_rss_gib']:.2f} GiB = {100 * big['peak_rss_fraction_of_checkpoint']:.1f}% of "
                            f"the checkpoint**", f"{small['peak_rss_gib']:.2f} GiB"],
           ["wall", f"{big['wall_s']:,.0f} s", f"{small['wall_s']:,.0f} s"],
           ["forward / moments / compress / shrinkage / solve / io (s)", ph(big), ph(small)],
           ["written", f"{big['written_gib']:.2f} GiB", f"{small['written_gib']:.2f} GiB"],
           ["calibration + compression / two bare forwards", _ratio(big), _ratio(small)]]
    out.insert(2, ["compression", big.get("compression", "3-bit g128 RTN + EoRA r64"),
                   small.get("compression", "3-bit g64 RTN + EoRA r64")])
    return _table(out[0], out[1:]), ["scale_cpu.json"]


def solve_scaling(root: Path):
    """Seconds per decoder layer of the default solve against the layer's calibration forward passes."""
    name = "solve_scaling_cpu.json"
    out = []
    for r in _load(root, name)["rows"]:
        kv = r["hidden_size"] // r["num_attention_heads"] * r["num_key_value_heads"]
        shapes = f"{r['hidden_size']} / {r['intermediate_size']}, kv {kv}"
        out.append([r["shape"], shapes, r["base"].upper(), f"{r['compress_s']:,.1f}", f"{r['shrinkage_s']:,.1f}",
                    f"{r['solve_s']:,.1f}", f"{r['forward_s']:,.0f}", f"**{r['solve_over_forward']:.2f}**",
                    f"{r['peak_rss_gib']:.1f}", "shared" if r.get("cpu_shared") else "idle"])
    header = ["layer", "hidden / MLP, kv", "base", "compress s", "shrinkage s", "solve s (with shrinkage)",
              "forward s (128 x 512, 2 passes)", "solve / forward", "peak RSS GiB", "CPU"]
    return _table(header, out), [name]


def solver_accuracy(root: Path):
    """The randomized solver against the exact one on every module of the real models."""
    out, sources = [], []
    for model, label in (("smollm2", "SmolLM2-135M"), ("gemma", "Gemma-3-270M")):
        name = f"solver_accuracy_{model}.json"
        if not (root / RESULTS / name).exists():
            continue
        data = _load(root, name)
        rows = data["rows"]
        worst = max(abs(r["objective_rel_diff"]) for r in rows)
        differ = [r for r in rows if r["amount_randomized"] != r["amount_exact"]]
        checked = f"{len(rows)} of {data['modules_total']}" if "modules_total" in data else str(len(rows))
        out.append([label, checked, f"{data['calib_samples']} x 512", f"{worst:.1e}",
                    f"{len(rows) - len(differ)} of {len(rows)}"])
        sources.append(name)
    header = ["model", "modules checked", "calibration (one-shot)", "worst relative objective difference",
              "same shrinkage amount"]
    return _table(header, out), sources


def solver_perplexity(root: Path):
    """Perplexity of the CLI's default job with the default solver and with the randomized one forced."""
    name = "solver_perplexity.json"
    data = _load(root, name)
    rows = {(r["model"], r["form"]): r for r in data["rows"]}
    out = []
    for model in dict.fromkeys(r["model"] for r in data["rows"]):
        auto, randomized = rows.get((model, "auto")), rows.get((model, "randomized"))
        # solver_perplexity.py puts the relative difference on a model's second (randomized) row
        diff = f"{100 * randomized['ppl_rel_diff']:+.2f}%" if randomized and "ppl_rel_diff" in randomized else "-"
        out.append([MODEL_LABELS.get(model, model), f"{data['args']['calib_samples']} x 512",
                    f"{data['args']['eval_tokens']:,}", *(_ppl(r["ppl"]) if r else "-" for r in (auto, randomized)),
                    diff])
    header = ["model", "calibration (sequential)", "held-out tokens", "perplexity, `--form auto` (default)",
              "perplexity, `--form randomized`", "difference"]
    return _table(header, out), [name]


def moe_study(root: Path):
    """Routed EoRA on the experts of a random Qwen3-MoE layer against plain SVD, by calibration size."""
    name = "moe_study.json"
    out = []
    for r in _load(root, name)["results"]:
        tokens = r["tokens per expert"]
        svd, plain, weighted = r["svd"], r["eora plain down"], r["eora weighted down"]
        beats, worse, worst = (r[k] for k in ("eora beats svd (gate_up, down), experts",
                                              "eora worse than svd by > 1% (gate_up, down), experts",
                                              "worst eora / svd (gate_up, down)"))
        out.append([str(r["windows"]), f"{min(tokens)}-{max(tokens)}",
                    f"{svd['gate_up_proj']:.3f} / {svd['down_proj']:.3f} / {svd['block']:.3f}",
                    f"{plain['block']:.4f}", f"{weighted['gate_up_proj']:.3f} / {weighted['down_proj']:.3f} / "
                    f"{weighted['block']:.4f}", f"{beats[0]}/{len(tokens)}, {beats[1]}/{len(tokens)}",
                    f"{worse[1]} (worst {worst[1]:.3f}x)"])
    header = ["windows", "tokens per expert", "SVD: gate_up / down / block", "EoRA, plain down: block",
              "EoRA, routing-weighted down (default): gate_up / down / block", "experts where EoRA beats SVD "
              "(gate_up, down)", "down experts > 1% worse than SVD"]
    return _table(header, out), [name]


def qwen_coder(root: Path):
    """Qwen2.5-Coder-1.5B through the streaming CLI: RTN / GPTQ at 3 bits, with and without EoRA."""
    name = "qwen_coder.json"
    data = _load(root, name)
    tasks = [t for t in data["args"]["tasks"].split(",") if t]
    out = []
    for r in data["rows"]:
        phases = r.get("phases_s", {})
        calib = phases.get("forward", 0) + phases.get("moments", 0)
        solve = phases.get("shrinkage", 0) + phases.get("solve", 0)
        out.append([r["run"], _ppl(r["ppl"]), f"{100 * r['gap_closed']:.1f}%" if "gap_closed" in r else "-",
                    *(f"{r[t]:.2f} ± {r[t + '_stderr']:.2f}" for t in tasks),
                    f"{sum(v for k, v in phases.items() if k != 'evaluate'):,.0f}" if phases else "-",
                    f"{calib:,.0f} / {phases.get('compress', 0):,.0f} / {solve:,.0f}" if phases else "-",
                    f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "-",
                    f"{r['written_gib']:.2f}" if "written_gib" in r else "-"])
    header = ["model", "perplexity", "gap closed", *tasks, "job s (no evaluation)", "calibration / compress / solve s",
              "peak RSS GiB", "written GiB"]
    return _table(header, out), [name]


def lm_eval(root: Path):
    """lm-evaluation-harness (both routes) against our own scoring, on the same documents."""
    data = _load(root, "lm_eval_smollm2.json")
    pair = lambda m: f"{m['acc']:.2f} / {m['acc_norm']:.2f}"  # noqa: E731
    out = [[task, str(r["docs"]), pair(r["lm_eval_checkpoint"]), pair(r["lm_eval_peft"]),
            pair(r["ours_same_requests"]), pair(r["ours_zero_shot"])] for task, r in data["rows"].items()]
    header = ["task", "docs", "lm-eval, our checkpoint", "lm-eval, torchao base + PEFT",
              "ours, lm-eval's requests", "ours, `torchao-eora eval`"]
    return _table(header, out), ["lm_eval_smollm2.json"]


def served_bytes(root: Path):
    """Quality per adapter byte as vLLM serves it (bf16 at its rank slot) and as our runtime holds it."""
    name = "served_bytes.json"
    out = []
    for r in _load(root, name)["rows"]:
        adapters = f"int{r['adapter_bits']}" if r["adapter_bits"] else "full precision"
        bf16 = _ppl(r["ppl_bf16_adapters"]) if "ppl_bf16_adapters" in r else "-"
        out.append([MODEL_LABELS.get(r["model"], r["model"]), f"{r['calib_samples']} x 512", f"{r['eval_tokens']:,}",
                    str(r["rank"]), adapters, _ppl(r["ppl"]), bf16,
                    str(r["max_lora_rank"]), f"{r['vllm_bf16_mb']:.1f}", f"{r['our_adapter_mb']:.1f}"])
    header = ["model", "calibration", "held-out tokens", "rank", "adapters", "perplexity",
              "perplexity, adapters rounded to bf16",
              "vLLM `--max-lora-rank`", "vLLM bf16 adapter MB", "our adapter MB (as run: fp32 or int4)"]
    return _table(header, out), [name]


def screen(root: Path):
    """Options screened against the default job (``screen.py``), one table per model, grouped by calibration size,
    bit width and quantizer (the base): each row against its group's default row (the first row where it has none),
    its perplexity as a multiple of the original's, and the share of the base's perplexity gap it closes (not shown
    where the base is destroyed, over 100x the original); with LAMBADA, its accuracy and the share of the base's
    accuracy loss it recovers, and, where both rows kept their per-doc outcomes, the paired change against the
    group's default with its standard error."""
    from torchao_eora.eval import paired_difference

    name = "screen.json"
    data = _load(root, name)
    base_flags = ("--bits", "--quantizer", "--compensation")
    adapter_flags = ("--rank", "--adapter-bits", "--adapter-group-size")

    def flag(r: dict, option: str, default: str) -> str:
        flags = r["flags"].split()
        return flags[flags.index(option) + 1] if option in flags else default

    def option(r: dict) -> str:
        flags, shown = r["flags"].split(), base_flags + adapter_flags
        kept = [f for i, f in enumerate(flags) if f not in shown and (i == 0 or flags[i - 1] not in shown)]
        return " ".join(kept)

    def adapters(r: dict) -> str:
        """Rows that record the job's ``residual`` ran the quantization-aware adapters; older rows ran the CLI's
        earlier default adapters (rank 192, int4 g32) and re-solved ``B`` only."""
        if "residual" in r:
            rank, layout = re.search(r" r(\d+)", r["residual"]), re.search(r"\((int\d g\d+) adapters", r["residual"])
            return f"{layout.group(1)} r{rank.group(1)}" if layout else f"full precision r{rank.group(1)}"
        return f"int{flag(r, '--adapter-bits', '4')} g{flag(r, '--adapter-group-size', '32')} " \
               f"r{flag(r, '--rank', '192')}, B re-solved"

    def key(r: dict) -> tuple:
        return r["model"], r.get("calib_samples", data["args"]["calib_samples"]), flag(r, "--bits", "3"), \
            flag(r, "--quantizer", "rtn")

    rows = data["rows"]
    original = {(r["model"], r["eval_tokens"]): r for r in rows if r["name"] == "original"}
    base_rows = {key(r): r for r in rows if flag(r, "--compensation", "eora") == "none"}
    fitted = [r for r in rows if r["name"] != "original" and flag(r, "--compensation", "eora") != "none"]
    reference: dict[tuple, dict] = {}
    for r in fitted:
        if key(r) not in reference or (option(reference[key(r)]) and not option(r)):
            reference[key(r)] = r
    order = {k: i for i, k in enumerate(dict.fromkeys(key(r) for r in fitted))}
    fitted.sort(key=lambda r: (r["model"] != "smollm2", key(r)[1], -int(key(r)[2]), order[key(r)],
                               r is not reference[key(r)]))  # each group's default first
    header = ["calibration", "held-out tokens", "base", "adapters", "option", "perplexity", "x original", "gap closed",
              "vs the group's default", "LAMBADA", "LAMBADA loss recovered", "calibration s", "job s"]
    tables = {}
    for r in fitted:
        ref, fp, base = reference[key(r)], original.get((r["model"], r["eval_tokens"])), base_rows.get(key(r))
        diff = f"{100 * (r['ppl'] / ref['ppl'] - 1):+.2f}%" if r is not ref else "-"
        gap = _gap(fp["ppl"], base["ppl"], r["ppl"]) if fp and base and base["ppl"] < 100 * fp["ppl"] else "-"
        lambada = recovered = "-"
        if "lambada" in r:
            lambada = f"{100 * r['lambada']:.1f}%"
            if r is not ref and "lambada_correct" in r and "lambada_correct" in ref:  # the same docs: paired
                change, stderr = paired_difference([c == "1" for c in r["lambada_correct"]],
                                                   [c == "1" for c in ref["lambada_correct"]])
                lambada += f" ({100 * change:+.1f} ± {100 * stderr:.1f} paired)"
            if fp and base and "lambada" in fp and "lambada" in base:
                recovered = _gap(fp["lambada"], base["lambada"], r["lambada"])
        phases = r["phases_s"]
        windows, tokens = (r.get(k, data["args"][k]) for k in ("calib_samples", "eval_tokens"))
        tables.setdefault(r["model"], []).append([
            f"{windows} x 512", f"{tokens:,}", f"{key(r)[2]}-bit {key(r)[3].upper()}", adapters(r),
            f"`{option(r)}`" if option(r) else "-", _ppl(r["ppl"]), f"{r['ppl'] / fp['ppl']:.2f}x" if fp
            else "-", gap, diff, lambada, recovered,
            f"{sum(phases.get(k, 0) for k in ('forward', 'moments', 'gradients')):,.0f}", f"{r['wall_s']:,.0f}"])
    parts = [f"**{MODEL_LABELS.get(m, m)}**\n\n" + _table(header, t) for m, t in tables.items()]
    def measured(r: dict) -> str:
        lambada = f", LAMBADA {100 * r['lambada']:.1f}%" if "lambada" in r else ""
        return f"{_ppl(r['ppl'])} ({r['eval_tokens']:,} tokens{lambada})"

    refs = [f"{MODEL_LABELS.get(m, m)} original {measured(r)}" for (m, _), r in original.items()]
    refs += [f"{MODEL_LABELS.get(k[0], k[0])} {k[2]}-bit {k[3].upper()} alone {measured(r)}"
             for k, r in base_rows.items()]
    return "\n\n".join(parts) + ("\n\nReferences: " + "; ".join(refs) + "." if refs else ""), [name]


def adapter_quantization(root: Path):
    """The activation-weighted error the residual leaves per way of rounding its factors
    (``adapter_quantization.py``)."""
    name = "adapter_quantization_smollm2.json"
    ways = ("full precision", "as solved", "B re-solved", "quantization-aware")
    out = [[f"{r['adapters']} ({r['modules']} modules)", f"{r['base alone']:.2f}",
            *(f"**{r[w]:.2f}**" if w == "quantization-aware" else f"{r[w]:.2f}" for w in ways)]
           for r in _rows(_load(root, name))]
    return _table(["adapters", "base alone", *ways], out), [name]


TABLES = {f.__name__.replace("_", "-"): f for f in (
    headline, quality_rtn, paper_suite, gptq_engine, residual_options, attention_residual, adapter_bits,
    bits_adapters, decode_cpu, layers_cpu, layers_h200, scale, solve_scaling, solver_accuracy, solver_perplexity,
    moe_study, qwen_coder, lm_eval, served_bytes, screen, adapter_quantization)}


def render(name: str, root: Path, doc: Path) -> str:
    """The block body for table ``name`` as it belongs in ``doc`` (links relative to the doc's folder)."""
    if name not in TABLES:
        raise KeyError(f"{doc}: unknown table {name!r}; known: {', '.join(TABLES)}")
    table, sources = TABLES[name](root)
    rel = Path(os.path.relpath(root / RESULTS, doc.parent)).as_posix()
    links = ", ".join(f"[{s}]({rel}/{s})" for s in dict.fromkeys(sources))
    return f"{table}\n\n<sub>Generated by `python benchmarks/make_docs.py` from {links}.</sub>\n"


def docs(root: Path) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def update(root: Path, check: bool) -> list[str]:
    """Rewrite (or, with ``check``, compare) every table block; returns the names of stale blocks."""
    stale = []
    for doc in docs(root):
        text = doc.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + render(m.group("name"), root, doc) + m.group(4), text)
        if new != text:
            stale += [f"{doc.relative_to(root)}: {m.group('name')}" for m, n in
                      zip(BLOCK.finditer(text), BLOCK.finditer(new)) if m.group("body") != n.group("body")]
            if not check:
                doc.write_text(new)
    return stale


def _rtn_line(ax, x, y, label, color="gray"):
    ax.plot(x, y, "*", color=color, markersize=10)
    ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")


def _fp_line(ax, fp: dict) -> None:
    ax.axhline(fp["ppl"], color="black", linewidth=1)
    ax.text(0.75, fp["ppl"] * 0.96, f"fp32 model: ppl {fp['ppl']:.2f} at {_mb(fp['packed_bytes'])} MB",
            transform=ax.get_yaxis_transform(), fontsize=7, ha="right", va="top")


def plot(root: Path, path: Path) -> None:
    """Perplexity against model bytes (fp32 run, intN values bit-packed): RTN / SVD / EoRA, bits x ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
    colors = {4: "C0", 3: "C2", 2: "C3"}
    ymax = 1200

    ax = axes[0]
    ba = _rows(_load(root, "bits_adapters_smollm2.json"))
    ab = _rows(_load(root, "adapter_bits_3bit_g64.json"))
    b2 = _rows(_load(root, "bits2_r128_int4.json"))
    fp = _find(ba, method="fp")
    for bits in (4, 3, 2):
        rtn = _find(ba, bits=bits, method="none")
        if rtn["ppl"] < ymax:
            _rtn_line(ax, rtn["packed_bytes"] / 1e6, rtn["ppl"], f"{bits}-bit RTN", colors[bits])
        else:
            ax.text(0.02, 0.97, f"{bits}-bit RTN alone ({_mb(rtn['packed_bytes'])} MB): ppl {_ppl(rtn['ppl'])}, "
                    "off the chart", transform=ax.transAxes, fontsize=7, color=colors[bits], va="top")
        for abits, style in ((None, "-"), (4, "--")):
            pts = sorted((r["packed_bytes"] / 1e6, r["ppl"], r["rank"]) for r in ba
                         if r["bits"] == bits and r["method"] == "eora" and r.get("adapter_bits") == abits)
            pts += [(r["packed_bytes"] / 1e6, r["ppl"], r["rank"]) for r in b2
                    if bits == 2 and abits == 4 and r["method"] == "eora" and r.get("shrinkage") == 0.0
                    and not r.get("refine_rounds")]
            pts.sort()
            x, y, ranks = zip(*pts)
            ax.plot(x, y, style, marker="o", color=colors[bits], markerfacecolor="white" if abits else colors[bits],
                    label=f"{bits}-bit + EoRA, {'int4' if abits else 'fp32'} adapters (32 windows)")
            for xi, yi, rank in pts:
                ax.annotate(f"r{rank}", (xi, yi), fontsize=6, xytext=(3, -9), textcoords="offset points")
    svd2 = _find(b2, method="svd")
    ax.plot(svd2["packed_bytes"] / 1e6, svd2["ppl"], "s", color=colors[2], markerfacecolor="none",
            label="2-bit + SVD r128, int4 adapters (32 windows)")
    for abits, style in ((None, ":"), (4, "-.")):
        pts = sorted((r["packed_bytes"] / 1e6, r["ppl"]) for r in ab if r["method"] == "svd"
                     and r.get("adapter_bits") == abits and r.get("resolve") in (None, True))
        ax.plot(*zip(*pts), style, marker="s", color="C1", markerfacecolor="none",
                label=f"3-bit + SVD r32/64/128, {'int4' if abits else 'fp32'} adapters (16 windows)")
    pts = sorted((r["packed_bytes"] / 1e6, r["ppl"]) for r in ab if r["method"] == "eora"
                 and r.get("adapter_bits") is None)
    ax.plot(*zip(*pts), ":", marker="^", color="C1", label="3-bit + EoRA r32/64/128, fp32 adapters (16 windows)")
    _fp_line(ax, fp)
    ax.set_title("SmolLM2-135M: one-shot statistics, 8,192 held-out tokens", fontsize=9)

    ax = axes[1]
    gm = _load(root, "residual_options_gemma.json")
    base = _rows(gm, "uniform_and_refine")
    fp, rtn = _find(base, method="fp"), _find(base, method="none")
    r64 = _find(base, method="eora", rank=64, refine_rounds=None)
    r192 = _find(_rows(gm, "cli_default_r192_int4_shrinkage_auto"), method="eora")
    _rtn_line(ax, rtn["packed_bytes"] / 1e6, rtn["ppl"], "3-bit RTN", colors[3])
    ax.plot(r64["packed_bytes"] / 1e6, r64["ppl"], "o", color=colors[3], label="3-bit + EoRA r64, fp32 adapters")
    ax.plot(r192["packed_bytes"] / 1e6, r192["ppl"], "o", color=colors[3], markerfacecolor="white",
            label="3-bit + EoRA r192, int4 adapters (CLI default)")
    for r, name in ((r64, "r64"), (r192, "r192 int4")):
        ax.annotate(name, (r["packed_bytes"] / 1e6, r["ppl"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    _fp_line(ax, fp)
    ax.set_title("Gemma-3-270M: 128 sequential windows, 8,192 held-out tokens\n(no SVD or other bit widths measured)",
                 fontsize=9)

    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylim(18, ymax if ax is axes[0] else 220)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(which="minor", labelsize=6)
        ax.set_xlabel("model MB (fp32 run; int2/3/4 values bit-packed)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    axes[0].set_ylabel("held-out Wikipedia perplexity (log)")
    fig.suptitle("Perplexity against model bytes, 3-bit g64 RTN base unless marked (generated by "
                 "benchmarks/make_docs.py)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 when a table is out of date")
    p.add_argument("--no-plot", action="store_true", help=f"do not redraw {PLOT}")
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = p.parse_args(argv)
    stale = update(args.root, check=args.check)
    if args.check:
        for s in stale:
            print(f"out of date: {s} (run `python benchmarks/make_docs.py`)", file=sys.stderr)
        return 1 if stale else 0
    for s in stale:
        print(f"rewrote {s}")
    if not args.no_plot:
        plot(args.root, args.root / PLOT)
        print(f"wrote {PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
