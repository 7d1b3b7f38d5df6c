"""Importing the authors' checkpoints: parity on the fixtures, and an import at CALM-M's size.

1. Parity: each fixture folder (tests/fixtures/authors-format, written by the
   authors' own code) is imported and every expected tensor recomputed; the
   largest |difference| per tensor and format is reported.
2. Size: a random checkpoint with CALM-M's names and shapes (hidden 1024,
   intermediate 2752, 16 layers, 16 heads, head 4 blocks, noise 64, latent 128,
   vocabulary 128257; its autoencoder 512 / 1280 / 2 + 2 layers inside it as
   ae_model.*) is written in their `.bin` format, then `calm import` runs in a
   child process; its wall time and peak resident memory (VmHWM) are
   reported against the size of the weight file.

Usage: python benchmarks/authors_import.py [--skip-size]
Writes benchmarks/results/authors_import.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "authors-format"


def parity() -> list[list[str]]:
    from calm.authors_format import build_autoencoder, build_calm, read_folder
    from calm.heads.energy import energy_loss

    E = load_file(str(FIX / "expected.safetensors"))
    rows = []
    for fmt, ae_dir, calm_dir in (("safetensors", "autoencoder", "calm-energy"),
                                  ("bin", "autoencoder-bin", "calm-energy-bin")):
        ae, _ = build_autoencoder(read_folder(FIX / ae_dir))
        model, _ = build_calm(read_folder(FIX / calm_dir))
        d = {}
        with torch.no_grad():
            m, ls = ae.encode(E["ae_tokens"].view(4, 2, 4))
            d["ae_mean"], d["ae_log_std"] = (m, E["ae_mean"]), (ls, E["ae_log_std"])
            d["ae_logits"] = (ae.decode(E["ae_z"]).reshape(4, 8, -1), E["ae_logits"])
            chunks = E["calm_input_ids"].view(2, 8, 4)
            x = model.inputs(chunks, None)
            d["calm_compressed"] = (x, E["calm_compressed"])
            d["calm_hidden"] = (model.backbone(x), E["calm_hidden"])
            d["head_out"] = (model.head(E["head_hidden"], E["head_noise"][:, None])[:, 0], E["head_out"])
            y = E["energy_mean"][:, None] + E["energy_eps"].transpose(0, 1) * E["energy_log_std"].exp()[:, None]
            d["energy_score"] = (-energy_loss(E["energy_x"], y), E["energy_score"])
            mean, log_std = model.autoencoder.encode(chunks[:, 1:])
            h = model.backbone(model.inputs(chunks[:, :-1], None)).reshape(14, -1)
            xs = model.head(h, E["loss_rand"].transpose(0, 1) - 0.5)
            ys = mean.reshape(14, 1, -1) + E["loss_eps"].transpose(0, 1) * log_std.exp().reshape(14, 1, -1)
            d["calm_loss"] = (energy_loss(xs, ys).mean(), E["calm_loss"])
            cache = model.make_cache(2, 8)
            hh = model.step(E["gen_prompt"].view(2, -1, 4), None, cache=cache)
            lat = []
            for step in range(4):
                z = model.head(hh, (E["gen_rand"][step] - 0.5)[:, None])[:, 0]
                lat.append(z)
                hh = model.step(model.autoencoder.decode_tokens(z)[:, None], None, cache=cache)
            d["gen_step_latents"] = (torch.stack(lat), E["gen_step_latents"])
        for name, (got, want) in d.items():
            rows.append([fmt, name, f"{float((got - want).abs().max()):.2e}",
                         f"{float(want.abs().max()):.3g}"])
    return rows


def m_size_tensors() -> dict[str, torch.Tensor]:
    """Random tensors with the authors' CALM-M names and shapes (head shared by two names)."""
    V, d, ff, L, noise, lat, blocks, K = 128257, 1024, 2752, 16, 64, 128, 4, 4  # 16 heads of 64
    ad, aff = 512, 1280
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {}

    def w(name, *shape):
        t[name] = torch.randn(*shape, generator=g) * 0.02

    w("transformer.embed_tokens.weight", V, d)
    for i in range(L):
        p = f"transformer.layers.{i}"
        w(f"{p}.input_layernorm.weight", d)
        w(f"{p}.post_attention_layernorm.weight", d)
        for q in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w(f"{p}.self_attn.{q}.weight", d, d)
        w(f"{p}.mlp.gate_proj.weight", ff, d)
        w(f"{p}.mlp.up_proj.weight", ff, d)
        w(f"{p}.mlp.down_proj.weight", d, ff)
    w("transformer.norm.weight", d)
    for name, shape in (("embed_proj.0", (2 * d, K * d)), ("embed_proj.2", (d, 2 * d))):
        w(f"{name}.weight", *shape)
        w(f"{name}.bias", shape[0])
    w("embed_proj.3.weight", d)
    w("embed_proj.3.bias", d)
    head = {}
    shapes = {"noise_embd": (d, noise), "hidden_embd": (d, d), "norm_noise": (d,), "norm_hidden": (d,),
              "final_layer.in_ln": (d,), "final_layer.linears.0": (d, d), "final_layer.linears.2": (lat, d)}
    for j in range(blocks):
        shapes.update({f"mlp_blocks.{j}.in_ln": (d,), f"mlp_blocks.{j}.linears.0": (d, 2 * d),
                       f"mlp_blocks.{j}.linears.2": (d, d), f"mlp_blocks.{j}.linears.4": (2 * d, d),
                       f"mlp_blocks.{j}.down_proj": (d, d)})
    for name, shape in shapes.items():
        head[f"{name}.weight"] = torch.randn(*shape, generator=g) * 0.02
        head[f"{name}.bias"] = torch.randn(shape[0], generator=g) * 0.02
    for k, v in head.items():  # one tensor under both names, as their model holds it
        t[f"mlp_generator.{k}"] = v
        t[f"generative_head.{k}"] = v
    a = "ae_model."
    w(f"{a}encoder.embed_tokens.weight", V, ad)
    t[f"{a}decoder.lm_head_weight"] = t[f"{a}encoder.embed_tokens.weight"]
    for stack in ("encoder.encoder_layers", "decoder.decoder_layers"):
        for i in range(2):
            w(f"{a}{stack}.{i}.layernorm.weight", ad)
            w(f"{a}{stack}.{i}.mlp.gate_proj.weight", aff, ad)
            w(f"{a}{stack}.{i}.mlp.up_proj.weight", aff, ad)
            w(f"{a}{stack}.{i}.mlp.down_proj.weight", ad, aff)
    for name, shape in (("encoder.squeeze_layer", (ad, K * ad)), ("encoder.hidden_to_latent", (2 * lat, ad)),
                        ("decoder.latent_to_hidden", (ad, lat)), ("decoder.expand_layer", (K * ad, ad))):
        w(f"{a}{name}.weight", *shape)
        w(f"{a}{name}.bias", shape[0])
    w(f"{a}encoder.norm.weight", ad)
    w(f"{a}decoder.norm.weight", ad)
    return t


M_CONFIG = {
    "ae_path": "/mnt/train/checkpoints/autoencoder", "architectures": ["EnergyTransformer"],
    "attention_bias": False, "attention_dropout": 0.0, "beta": 1.0, "bos_token_id": 509,
    "eos_token_id": 510, "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 2752,
    "latent_size": 128, "max_position_embeddings": 4096, "mlp_bias": False, "noise_size": 64,
    "num_attention_heads": 16, "num_hidden_layers": 16, "num_key_value_heads": 16,
    "num_mlp_layers": 4, "num_samples": 8, "pad_token_id": 128256, "patch_size": 4,
    "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True, "vocab_size": 128257,
}


def size_run(work: Path) -> dict:
    src = work / "calm-m"
    src.mkdir()
    t0 = time.perf_counter()
    tensors = m_size_tensors()
    torch.save(tensors, src / "pytorch_model.bin")
    n_params = sum(v.numel() for k, v in tensors.items()
                   if not k.startswith("generative_head.") and k != "ae_model.decoder.lm_head_weight")
    del tensors
    (src / "config.json").write_text(json.dumps(M_CONFIG, indent=2))
    # The fixtures' small tokenizer (bos 509, eos 510) stands in for Llama 3's.
    shutil.copy(FIX / "calm-energy-bin" / "tokenizer.json", src / "tokenizer.json")
    write_s = time.perf_counter() - t0
    size = (src / "pytorch_model.bin").stat().st_size
    # Peak resident memory from VmHWM, which starts afresh with the new program (ru_maxrss
    # would carry over the parent's size at fork).
    code = ("import re, sys, time; import torch, safetensors.torch, calm.authors_format, calm.model; "
            "from calm.cli import main; "
            "hwm = lambda: re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print('BASE', hwm()); t = time.perf_counter(); "
            "rc = main(['import', sys.argv[1], '--out', sys.argv[2]]); "
            "print('WALL', time.perf_counter() - t); print('RSS', hwm()); sys.exit(rc)")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, str(src), str(work / "out")],
                       capture_output=True, text=True)
    total = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"import failed: {p.stderr.strip()}")
    vals = dict(line.split(" ", 1) for line in p.stdout.splitlines() if line.startswith(("WALL", "RSS", "BASE")))
    peak = int(vals["RSS"]) * 1024  # kB
    base = int(vals["BASE"]) * 1024  # the interpreter with torch and calm imported, before the import
    out_size = sum(f.stat().st_size for f in (work / "out").rglob("model.safetensors"))
    return {"parameters": n_params, "bin_bytes": size, "write_seconds": write_s,
            "import_seconds": float(vals["WALL"]), "process_seconds": total,
            "peak_rss_bytes": peak, "peak_over_weights": peak / size, "output_bytes": out_size,
            "baseline_rss_bytes": base, "import_rss_bytes": peak - base,
            "import_rss_over_weights": (peak - base) / size,
            }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-size", action="store_true", help="parity only (no 1.5 GB checkpoint)")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the M-size files")
    args = p.parse_args()
    rows = parity()
    print(table(rows, ["format", "tensor", "max |Δ|", "max |expected|"]))
    out = {"machine": machine(), "parity": [dict(zip(("format", "tensor", "max_abs_diff", "max_abs"), r))
                                            for r in rows]}
    if not args.skip_size:
        work = Path(tempfile.mkdtemp(dir=args.workdir))
        try:
            s = size_run(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        out["m_size"] = s
        print(table([[f"{s['parameters'] / 1e6:.0f}M", f"{s['bin_bytes'] / 2**30:.2f} GiB",
                      f"{s['import_seconds']:.1f} s", f"{s['peak_rss_bytes'] / 2**30:.2f} GiB",
                      f"{s['peak_over_weights']:.2f}×", f"{s['baseline_rss_bytes'] / 2**30:.2f} GiB",
                      f"{s['import_rss_over_weights']:.2f}×"]],
                    ["parameters", "weights (.bin)", "import time", "peak memory", "peak / weights",
                     "of which torch + calm loaded", "(peak − that) / weights"]))
    path = RESULTS / "authors_import.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
