"""Speed of CALM against the token-level baseline, side by side in one process.

Setting (both models share the backbone): hidden 512, intermediate 1376, 8
layers, 8 heads, vocab 32000; CALM with K = 4, an energy head of 2 blocks and
N = 8 samples, and the reference-size autoencoder. Random weights: speed does
not depend on them (generation never stops early: no end-of-text).

- generation tokens/s at temperature 1, prompt 32 tokens, 256 new tokens, batch 1 and 8,
  with each model's share of its roofline limit: min(compute limit, weight-reading
  limit) from this machine's own matmul GFLOP/s, measured when the benchmark starts,
  and the matrix-vector bandwidth of reading as many bytes as one decoding step reads
  (batch 1 is bound by reading the weights; a 64 MB weight stays in a large cache,
  a step's 170–210 MB do not, so the share of the 64 MB gemv figure is shown too);
- training tokens/s, batch 8 × 512 tokens, with its share of the matmul limit
  (training FLOPs per token from calm.flops);
- BrierLM evaluation time of one 1024-token sequence;
each at every precision asked for (default: fp32, and bf16 where `auto` picks it).
``--compile`` also times CALM's generation with its head and decoder compiled
(``generate(..., compile=True)``; the compiling first call is timed apart), and
``--head flow`` gives CALM the demo preset's flow-matching head instead.

"Authors'" figures are the authors' implementation measured on a machine of the same
CPU kind (AMD EPYC or Intel Xeon, see AUTHORS); none are shown for another CPU, nor
on a GPU.

With ``--device cuda`` every figure is measured on the GPU (bf16 autocast, fused
AdamW, PyTorch's SDPA), against the GPU's own limits measured at the start; the
same shapes as on a CPU, so the figures say how far a small model's steps are
from what the GPU can do, and ``--gen-batches`` adds larger decoding batches.

Usage: python benchmarks/speed.py [--device cpu|cuda] [--threads 2] [--decode-threads 2]
       [--precision fp32,bf16] [--repeat 3] [--only gen,train,eval] [--gen-batches 1,8]
       [--compile] [--head energy|flow] [--name speed]
Writes benchmarks/results/NAME-<machine>.json (one file per kind of CPU, or of GPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cpu_model,
    format_limits,
    gpu_name,
    limits_key,
    machine_limits,
    table,
    timed,
    weight_read_gbs,
    write,
)

from calm.autoencoder import Autoencoder  # noqa: E402
from calm.baseline import TokenLM  # noqa: E402
from calm.config import CALMConfig, HeadConfig, TrainConfig, preset  # noqa: E402
from calm.errors import CalmError  # noqa: E402
from calm.flops import training_flops_per_token  # noqa: E402
from calm.generate import generate  # noqa: E402
from calm.model import CALM  # noqa: E402
from calm.precision import autocast, resolve_precision  # noqa: E402
from calm.runtime import pick_device  # noqa: E402
from calm.train import make_optimizer  # noqa: E402

AUTHORS = {  # the authors' implementation at these sizes, by CPU kind (tokens/s; medians)
    "AMD EPYC": {  # 2 cores, AVX2
        "gen_b1": {"calm": 137.0, "baseline": 58.0},
        "gen_b8": {"calm": 743.0, "baseline": 202.0},
        "train": {"calm": 1135.0, "baseline": 409.0},
        "eval_seconds": {"calm": 1.0, "baseline": 59.0},
        # that machine's limits at 2 threads (fp32 matmul GFLOP/s, matrix-vector GB/s)
        "limits": {"matmul_fp32_gflops": 175.0, "gemv_fp32_gbs": 40.0},
    },
    "Intel Xeon": {  # 2 cores, AVX-512 and AMX; timed by an independent harness
        "gen_b1": {"calm": 129.0, "baseline": 44.0},
        "gen_b8": {"calm": 603.0, "baseline": 169.0},
        "train": {"calm": 963.0, "baseline": 391.0},
        "limits": {"matmul_fp32_gflops": 277.0, "gemv_fp32_gbs": 38.5},
    },
}
# Machines of one kind differ: where this one's limit differs from the one the authors'
# figures came from by more than this, the comparison is also shown scaled by the ratio
# of the limit that bounds the figure (bandwidth for decoding bound by reading weights,
# fp32 matmul otherwise: the authors' code computes in fp32 on a CPU).
SCALE_TOLERANCE = 0.10
CPU = torch.device("cpu")


def authors_figures() -> dict:
    cpu = " ".join(cpu_model().replace("(R)", " ").replace("(TM)", " ").split())
    for kind, figures in AUTHORS.items():
        if cpu.startswith(kind):
            return figures
    return {}


def build(max_seq_len: int = 1024, device=CPU, head: str = "energy"):
    torch.manual_seed(0)
    backbone = preset("transformer", "bench", max_seq_len=max_seq_len)
    ae = Autoencoder(preset("autoencoder", "reference")).eval()
    calm = CALM(CALMConfig(backbone=backbone, head=HeadConfig(kind=head, num_blocks=2, num_samples=8),
                           chunk_size=4, latent_size=128), ae).eval()
    base = TokenLM(backbone).eval()
    return calm.to(device), base.to(device)


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def per_token_costs(calm: CALM, base: TokenLM, precision: str = "fp32", batch: int = 1) -> dict:
    """Bytes of weights read per generated token of one row, and multiply-adds per token.

    In bf16 decoding on a CPU (calm.layers.decoding_layout) one-row products read fp32
    weights and few-row products bf16 copies (half the bytes): at batch 1 only CALM's
    autoencoder layers after the expand and its vocabulary projection (they run on the
    K token positions), at batch 8 every product. On a GPU bf16 autocast casts each
    weight once per generation and every product reads the bf16 copy.
    """
    K = calm.config.chunk_size
    ae = calm.autoencoder
    half = 0.5 if precision == "bf16" else 1.0  # bytes of a bf16 copy per fp32 byte
    few_rows = half
    if batch > 1 or (precision == "bf16" and next(calm.parameters()).is_cuda):
        return {k: (v * half if "bytes" in k else v)
                for k, v in per_token_costs(calm, base, "fp32", 1).items()}
    dec = [ae.from_latent, *ae.dec_pre, ae.expand, ae.dec_norm]
    dec_bytes = (sum(weight_bytes(m) for m in dec)
                 + few_rows * (sum(weight_bytes(m) for m in ae.dec_post) + weight_bytes(ae.embed)))
    calm_step_bytes = (weight_bytes(calm.backbone) + weight_bytes(calm.compress)
                       + weight_bytes(calm.head) + dec_bytes)
    base_bytes = weight_bytes(base.backbone) + weight_bytes(base.lm_head)
    # Multiply-adds ≈ weights touched once per row (embedding lookups excluded), the
    # autoencoder's vocabulary projection counted once per each of the K positions.
    V, d_ae = ae.config.vocab_size, ae.config.hidden_size
    calm_params = (sum(p.numel() for m in (calm.backbone, calm.compress, calm.head)
                       for p in m.parameters())
                   + sum(p.numel() for m in dec + list(ae.dec_post) for p in m.parameters()))
    calm_macs = calm_params + K * V * d_ae
    base_macs = base_bytes / 4
    return {
        "calm_bytes_per_token": calm_step_bytes / K,
        "base_bytes_per_token": base_bytes,
        "calm_macs_per_token": calm_macs / K,
        "base_macs_per_token": base_macs,
    }


def bench_generation(calm, base, batch: int, new_tokens: int, repeat: int, precision: str,
                     device=CPU, compile: bool = False) -> dict:
    """tokens/s of each model; with ``compile`` also CALM with its head and decoder
    compiled (``calm_compiled``; its first call, which compiles, is timed apart)."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 32000, (batch, 32), generator=g).tolist()
    out = {}
    runs = [("calm", calm, False), ("baseline", base, False)]
    if compile:
        runs.append(("calm_compiled", calm, True))
    for name, model, comp in runs:
        def run(model=model, comp=comp):
            generate(model, prompts, max_new_tokens=new_tokens, eot_id=None,
                     generator=torch.Generator(device=device).manual_seed(1), precision=precision,
                     compile=comp)
        first = None
        if comp:
            first = timed(run, warmup=0, repeat=1, device=device)["median"]
        t = timed(run, warmup=1, repeat=repeat, device=device)
        if first is not None:
            t["first_call_seconds"] = first
        n = batch * new_tokens
        out[name] = {"seconds": t, "tokens_per_s": n / t["median"],
                     "tokens_per_s_min_max": [n / t["max"], n / t["min"]]}
    return out


def bench_training(calm, base, repeat: int, precision: str, device=CPU) -> dict:
    x = torch.randint(0, 32000, (8, 512)).to(device)
    out = {}
    for name, model in (("calm", calm), ("baseline", base)):
        model.train()
        opt = make_optimizer(model, TrainConfig(lr=1e-4), device)
        params = [p for p in model.parameters() if p.requires_grad]

        def step(model=model, opt=opt, params=params):
            with autocast(device, precision):
                loss, _ = model(x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = timed(step, warmup=1, repeat=repeat, device=device)
        out[name] = {"seconds": t, "tokens_per_s": x.numel() / t["median"],
                     "tokens_per_s_min_max": [x.numel() / t["max"], x.numel() / t["min"]],
                     "flops_per_token": training_flops_per_token(model, x.shape[1])}
        del opt
        model.eval()
    return out


def bench_eval(calm, base, repeat: int, precision: str, device=CPU) -> dict:
    """BrierLM (Brier-1..4) of one 1024-token sequence, random weights."""
    from calm.evaluate import brier_for_model

    x = torch.randint(1, 32000, (1, 1024), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for name, model in (("calm", calm), ("baseline", base)):
        def run(model=model):
            with torch.no_grad(), autocast(device, precision):
                brier_for_model(model, x, generator=torch.Generator(device=device).manual_seed(0))
        t = timed(run, warmup=1, repeat=repeat, device=device)
        out[name] = {"seconds": t}
    return out


def generation_limit(costs: dict, key: str, batch: int, limits: dict, precision: str,
                     read_gbs: float | None = None) -> dict:
    """Roofline tokens/s of decoding: the lower of the compute limit and the limit of
    reading the weights once per step for ``batch`` rows (batch 1: bandwidth-bound).

    ``read_gbs``: the read bandwidth that applies to a step's weights (on a CPU,
    ``weight_read_gbs`` measured at the step's own bytes); default the limits' gemv
    figure. The share of the gemv figure is kept as well (``memory_tokens_per_s_gemv``).
    """
    flops = 2 * costs[f"{key}_macs_per_token"]
    compute = limits[f"matmul_{precision}_gflops"] * 1e9 / flops
    per_token = costs[f"{key}_bytes_per_token"]
    gemv = limits["gemv_fp32_gbs"] * 1e9 * batch / per_token
    memory = (read_gbs or limits["gemv_fp32_gbs"]) * 1e9 * batch / per_token
    return {"tokens_per_s": min(compute, memory),
            "bound": "memory" if memory < compute else "compute",
            "compute_tokens_per_s": compute, "memory_tokens_per_s": memory,
            "read_gbs": read_gbs or limits["gemv_fp32_gbs"],
            "memory_tokens_per_s_gemv": gemv}


def step_bytes(costs: dict, key: str, calm: CALM) -> int:
    """Bytes of weights one decoding step reads (a CALM step makes K tokens a row)."""
    unit = calm.config.chunk_size if key == "calm" else 1
    return int(costs[f"{key}_bytes_per_token"] * unit)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for training and batch 8")
    p.add_argument("--decode-threads", type=int, default=0,
                   help="intra-op threads for batch-1 decoding (0: the same as --threads)")
    p.add_argument("--precision", default=None,
                   help="comma list of fp32, bf16 (default: fp32, plus bf16 where auto picks it)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--only", default="gen,train,eval", help="comma list of: gen, train, eval")
    p.add_argument("--gen-batches", default="1,8",
                   help="comma list of generation batch sizes (batch 1 decodes on --decode-threads)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--compile", action="store_true",
                   help="also time CALM generation with its head and decoder compiled "
                        "(generate(..., compile=True)); the compiling call is timed apart")
    p.add_argument("--head", choices=["energy", "flow"], default="energy",
                   help="CALM's generative head (energy: the paper's; flow: the demo preset's, "
                        "4 midpoint steps)")
    p.add_argument("--name", default="speed",
                   help="result file: benchmarks/results/NAME-<machine>.json")
    args = p.parse_args()
    only = set(args.only.split(","))
    try:
        gen_batches = sorted({int(b) for b in args.gen_batches.split(",")})
    except ValueError:
        gen_batches = []
    if not gen_batches or gen_batches[0] < 1:
        p.error(f"--gen-batches: expected positive integers like 1,8, got {args.gen_batches!r}")
    try:
        device = pick_device(args.device)
        precisions = ([resolve_precision(x.strip(), device) for x in args.precision.split(",")]
                      if args.precision else
                      ["fp32"] + (["bf16"] if resolve_precision("auto", device) == "bf16" else []))
    except CalmError as e:  # an unknown or missing device or precision
        p.error(str(e))
    decode_threads = args.decode_threads or args.threads
    torch.set_num_threads(args.threads)
    limits = machine_limits(sorted({1, args.threads, decode_threads}), device=device)
    gpu = gpu_name(device)
    print(f"{gpu or cpu_model()}: {format_limits(limits)}", flush=True)
    ref = {} if gpu else authors_figures()
    calm, base = build(device=device, head=args.head)
    result: dict = {"setting": {"backbone": "hidden 512, ffn 1376, 8 layers, 8 heads, vocab 32000",
                                "K": 4, "head": args.head, "head_blocks": 2, "N": 8, "prompt": 32,
                                "new_tokens": args.new_tokens, "threads": args.threads,
                                "decode_threads_batch1": decode_threads,
                                "device": str(device), "generation_batches": gen_batches},
                    "limits": limits, "authors": ref, "precisions": {}}
    rows = []
    reads: dict = {}  # (MB, threads) → GB/s of reading that many bytes of weights
    comparisons: dict = {}
    result["vs_authors"] = comparisons
    result["weight_read_gbs"] = reads_json = {}

    def vs_authors(value: float, key: str, name: str, limit: str, threads: int) -> str:
        """Our figure over the authors', and scaled by the two machines' ``limit`` when they differ."""
        r = ref.get(key, {}).get(name)
        if not r:
            return "–"
        ratio = value / r
        comparisons[f"{prec}/{key}/{name}"] = entry = {"ratio": ratio}
        theirs = ref.get("limits", {}).get(limit)
        ours = limits[limits_key(threads, device)].get(limit)
        if theirs and ours and abs(ours / theirs - 1) > SCALE_TOLERANCE:
            entry.update(limit=limit, machine_over_authors_machine=ours / theirs,
                         scaled_ratio=ratio * theirs / ours)
            return f"{ratio:.2f}× ({ratio * theirs / ours:.2f}× scaled by {limit})"
        return f"{ratio:.2f}×"

    where = lambda threads: "GPU" if gpu else f"{threads} thr"  # noqa: E731
    for prec in precisions:
        res: dict = {"costs": {f"batch{b}": per_token_costs(calm, base, prec, b)
                               for b in sorted({1, 8, *gen_batches})}}
        if "gen" in only:
            for batch in gen_batches:
                threads = decode_threads if batch == 1 else args.threads
                torch.set_num_threads(threads)
                costs = res["costs"][f"batch{batch}"]
                g = bench_generation(calm, base, batch, args.new_tokens, args.repeat, prec, device,
                                     compile=args.compile)
                names = [("calm", "calm"), ("baseline", "base")]
                names += [("calm_compiled", "calm")] if args.compile else []
                for name, key in names:
                    tps = g[name]["tokens_per_s"]
                    nbytes = step_bytes(costs, key, calm)
                    if gpu:
                        read = None
                    else:  # the bandwidth of reading this step's bytes, measured once
                        mb = round(nbytes / 2**20)
                        if (mb, threads) not in reads:
                            reads[(mb, threads)] = weight_read_gbs(mb << 20, threads)
                        read = reads[(mb, threads)]
                    lim = generation_limit(costs, key, batch, limits[limits_key(threads, device)],
                                           prec, read)
                    lim["step_weight_bytes"] = nbytes
                    g[name]["limit"] = lim
                    g[name]["share_of_limit"] = tps / lim["tokens_per_s"]
                    lo, hi = g[name]["tokens_per_s_min_max"]
                    how = ""
                    if lim["bound"] == "memory" and read is not None:
                        how = (f" ({nbytes / 2**20:.0f} MB/step at {read:.0f} GB/s; "
                               f"{tps / lim['memory_tokens_per_s_gemv']:.0%} at the gemv's "
                               f"{limits[limits_key(threads, device)]['gemv_fp32_gbs']:.0f})")
                    rows.append([f"generate, batch {batch}, {where(threads)}", prec, name,
                                 f"{tps:.0f} ({lo:.0f}–{hi:.0f})",
                                 f"{tps / lim['tokens_per_s']:.0%} of {lim['bound']} limit "
                                 f"{lim['tokens_per_s']:.0f}{how}",
                                 vs_authors(tps, f"gen_b{batch}", name,
                                            "gemv_fp32_gbs" if lim["bound"] == "memory"
                                            else "matmul_fp32_gflops", threads)])
                g["calm_over_baseline"] = g["calm"]["tokens_per_s"] / g["baseline"]["tokens_per_s"]
                rows.append([f"generate, batch {batch}", prec, "CALM / baseline",
                             f"{g['calm_over_baseline']:.2f}×", "", ""])
                if args.compile:
                    c = g["calm_compiled"]
                    g["compiled_over_eager"] = c["tokens_per_s"] / g["calm"]["tokens_per_s"]
                    rows.append([f"generate, batch {batch}", prec, "CALM compiled / eager",
                                 f"{g['compiled_over_eager']:.2f}×",
                                 f"first call (compiles) {c['seconds']['first_call_seconds']:.0f} s",
                                 ""])
                res[f"generation_batch{batch}"] = g
        if "train" in only:
            torch.set_num_threads(args.threads)
            t = bench_training(calm, base, args.repeat, prec, device)
            peak = limits[limits_key(args.threads, device)][f"matmul_{prec}_gflops"] * 1e9
            for name in ("calm", "baseline"):
                tps = t[name]["tokens_per_s"]
                lo, hi = t[name]["tokens_per_s_min_max"]
                bound = peak / t[name]["flops_per_token"]
                t[name]["limit_tokens_per_s"] = bound
                t[name]["share_of_limit"] = tps / bound
                rows.append([f"train, 8×512, {where(args.threads)}", prec, name,
                             f"{tps:.0f} ({lo:.0f}–{hi:.0f})",
                             f"{tps / bound:.0%} of compute limit {bound:.0f}",
                             vs_authors(tps, "train", name, "matmul_fp32_gflops", args.threads)])
            res["training"] = t
        if "eval" in only:
            torch.set_num_threads(args.threads)
            e = bench_eval(calm, base, args.repeat, prec, device)
            for name in ("calm", "baseline"):
                t = e[name]["seconds"]
                r = ref.get("eval_seconds", {}).get(name)
                rows.append([f"BrierLM of 1024 tokens, {where(args.threads)}", prec, name,
                             f"{t['median']:.2f} s ({t['min']:.2f}–{t['max']:.2f})", "",
                             f"{r / t['median']:.2f}× faster" if r else "–"])
            res["evaluation"] = e
        result["precisions"][prec] = res
    for name in ("calm", "baseline"):
        if len(precisions) == 2 and "train" in only:
            a, b = (result["precisions"][x]["training"][name]["tokens_per_s"] for x in precisions)
            rows.append(["train, 8×512", "/".join(precisions[::-1]), name, f"{b / a:.2f}×", "", ""])
    reads_json.update({f"{mb} MB, {t} thr": v for (mb, t), v in sorted(reads.items())})
    path = write(args.name, result, per_machine=True, device=device)
    print(table(rows, ["what", "precision", "model", "tokens/s median (min–max)", "limit",
                       "vs authors'"]))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
