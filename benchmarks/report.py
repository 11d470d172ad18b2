"""Tables for OPTIMIZATION.md, computed only from the committed result files in benchmarks/results/.

    python -m benchmarks.report            # prints the markdown tables
    python -m benchmarks.report --check OPTIMIZATION.md   # exit 1 if the document's tables differ

A waterfall file without its own stage costs takes them from the stages file named in STAGE_SOURCES (same
session, same machine); which file backs which number is printed under each table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import fewstep, fp8, memory_tiers
from benchmarks.waterfall import markdown, projection

RESULTS = Path(__file__).resolve().parent / "results"
# waterfall file -> files whose "stages" (or top-level stage keys) fill in what it did not measure, in order
STAGE_SOURCES = {
    "h200_480p_waterfall.json": [],
    "h200_720p_waterfall.json": ["h200_720p_stages.json", "h200_480p_full_generation.json"],
}


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def stages_for(name: str) -> tuple[dict, list[str]]:
    record = load(name)
    stages, used = dict(record.get("stages") or {}), [name] if record.get("stages") else []
    for src in STAGE_SOURCES.get(name, []):
        other = load(src)
        extra = other.get("stages") or other
        new = {k: v for k, v in extra.items()
               if k not in stages and isinstance(v, float) and k != "process_s"}
        if new:
            stages.update(new)
            used.append(f"{src} ({', '.join(sorted(new))})")
    return stages, used


def waterfall_table(name: str) -> str:
    record = load(name)
    stages, used = stages_for(name)
    record["stages"] = stages
    for row in record["rows"]:
        if "error" not in row:
            row["projection"] = projection(row, row["options"], stages)
    return markdown(record) + f"\n\nsources: {name}; stage costs from {'; '.join(used)}"


def full_table() -> str:
    full = load("h200_480p_full_generation.json")["full"]
    run = full["runs"][-1]
    rep = load("h200_480p_repeat6.json")
    lines = ["| check | projected | measured | error |", "|---|---|---|---|",
             f"| 480p --fast (FA3) DiT time, 40 steps | {full['projected_dit_s']:.1f} s | "
             f"{full['measured_dit_s']:.1f} s "
             f"| {full['projection_error']:+.1%} |",
             f"| 480p --fast (FA3) whole video | {full['projected_video_s']:.1f} s | {run['total_s']:.1f} s | "
             f"{full['video_projection_error']:+.1%} |",
             "", "| repeat (480p, --fast, 4 steps) | "
             + " | ".join(f"run {i + 1}" for i in range(len(rep["runs"]))) + " |",
             "|---|" + "---|" * len(rep["runs"]),
             "| seconds | " + " | ".join(f"{r['total_s']:.2f}" for r in rep["runs"]) + " |",
             "| peak GB | " + " | ".join(f"{r['peak_gb']:.2f}" for r in rep["runs"]) + " |",
             "", "sources: h200_480p_full_generation.json, h200_480p_repeat6.json"]
    return "\n".join(lines)


# few-step runs: each file one fresh-process run (40-step --fast row, few-step videos, VAE stages)
FEWSTEP_FILES = ["h200_480p_fewstep.json", "h200_480p_fewstep_vae_bf16.json", "h200_720p_fewstep.json",
                 "h200_720p_fewstep_vae_bf16.json"]


def fewstep_table(name: str) -> str:
    return fewstep.markdown(load(name)) + f"\n\nsources: {name}"


# memory tiers (resident and block-streamed rows under emulated caps, one run each) and the fp8 tier
MEMORY_FILES = ["h200_720p_memory_tiers_48gb.json", "h200_720p_memory_tiers_24gb.json"]
FP8_FILES = ["h200_720p_fp8.json", "h200_480p_fp8_drift.json"]


def sourced(table, name: str) -> str:
    return table(load(name)) + f"\n\nsources: {name}"


# the 80 GB H100 (issue 18): rows of benchmarks.backlog, one machine session, in backlog/
H100_FILES = {"waterfall": "backlog/h100_waterfall_720p_fused.json", "cli": "backlog/h100_cli_720p_fast.json",
              "whole24": "backlog/h100_whole_720p_24gb.json", "tier": "backlog/h100_gpu_tier.json"}


def _clocks(gpu: list | dict) -> str:
    states = gpu if isinstance(gpu, list) else [gpu]
    mhz, watts = [g["sm_clock_mhz"] for g in states], [g["power_w"] for g in states]
    return f"SM {min(mhz):.0f}-{max(mhz):.0f} MHz, {min(watts):.0f}-{max(watts):.0f} W"


def _whole_run(run: dict) -> tuple[str, str]:
    first = run["runs"][0]
    st = first["stages"]
    dit = st.get("dit_high", 0) + st.get("dit_low", 0)
    return (f"{run['first_video_s']:.1f} s (text {st['text_encode']:.1f}, DiT {dit:.1f}, VAE {st['vae_decode']:.1f})",
            f"{first['peak_gb']:.1f} / {first['peak_reserved_gb']:.1f}")


def h100_tables() -> str:
    """Does 720p fit an 80 GB card: the --fast forward and the peer, whole runs through the plan, the GPU tier."""
    wf, cli, tier = load(H100_FILES["waterfall"]), load(H100_FILES["cli"]), load(H100_FILES["tier"])
    whole24 = load(H100_FILES["whole24"])["whole_run"]
    env = wf["env"]
    fast, peer = wf["rows"][0], wf["peer"]
    sp = fast["step_spread"]
    lines = [f"### {env['gpu']} (79.18 GiB), 720p, 81 frames, torch {env['torch']}, commit {env['git_commit']}",
             "| run | placement (plan) | time | peak GB allocated / reserved | notes |", "|---|---|---|---|---|",
             f"| --fast forward (FA3, compiled, batch-2 CFG), both experts built and resident | resident | "
             f"{fast['per_forward_s']:.3f} s per forward (step median {sp['median']:.2f}, min {sp['min']:.2f}, max "
             f"{sp['max']:.2f}, n {sp['n']}) | {fast['peak_gb']:.1f} / {fast['peak_reserved_gb']:.1f} | "
             f"{_clocks(fast['gpu'])} |",
             f"| peer: {peer['peer']}, one timed forward per batch size | - | "
             f"{peer['batch1']['per_sample_forward_s']:.3f} s (batch 1), "
             f"{peer['batch2']['per_sample_forward_s']:.3f} s per sample (batch 2) | "
             f"{peer['peak_gb']:.1f} / {peer['batch1']['peak_reserved_gb']:.1f} | {_clocks(peer['batch1']['gpu'])} |"]
    for label, run in ((f"whole --fast run as generate.py plans it ({cli['cli_plan']['free_gb']:.1f} GB free)", cli),
                       ("whole --fast run under `--max_gpu_memory 24`", whole24)):
        time_s, peak = _whole_run(run)
        lines.append(f"| {label}: T5, 4 Euler steps with CFG over both experts, VAE; first video, compile included | "
                     f"{run['memory_plan']} | {time_s} | {peak} | {_clocks(run['runs'][0]['gpu'])} |")
    t = {k.split("::")[1]: v for k, v in tier["tests"].items()}
    build, loaded = t["test_random_build_peak_is_the_bf16_model_plus_one_fp32_tensor"], \
        t["test_loader_peak_is_the_kept_weights_plus_one_fp32_tensor"]
    vae720, vae480 = t["test_band_order_decode_720p_bf16"], t["test_banded_decode_official_size_fp32[band]"]
    kernel = t["test_gpu_triton_kernel_at_a14b_width[bf16_w]"]
    ffn, stream = t["test_ffn_chunks_lower_the_peak_and_keep_the_output"], \
        t["test_block_streaming_copies_overlap_compute"]
    lines += ["", "| GPU test (`gpu_tier`) | measured |", "|---|---|",
              f"| build a 3-block A14B-width expert in bf16 (`materialize_random_`) | {build['kept_gb']:.2f} GB kept, "
              f"peak {build['extra_mb']:.0f} MB above it = one fp32 tensor (the largest, "
              f"{build['largest_fp32_mb']:.0f} MB) |",
              f"| load it from {loaded['shards']} fp32 shards into bf16 on the GPU | peak {loaded['extra_mb']:.0f} MB "
              "above the kept weights |",
              f"| VAE decode 1280x720x81 in bf16, 4 bands (band order) vs whole frames | peak "
              f"{vae720['whole_peak_gb']:.2f} -> {vae720['banded_peak_gb']:.2f} GB, {vae720['whole_s']:.2f} -> "
              f"{vae720['banded_s']:.2f} s; max abs {vae720['max_abs']:.1e} from the whole-frame bf16 video (PSNR "
              f"{vae720['psnr_db']:.1f} dB) |",
              f"| VAE decode 832x480x9 in fp32, band order vs whole frames | "
              f"{'bit exact' if vae480['bit_exact'] else 'max abs ' + format(vae480['max_abs'], '.1e')}; peak "
              f"{vae480['whole_peak_gib']:.2f} -> {vae480['banded_peak_gib']:.2f} GiB, {vae480['whole_s']:.2f} -> "
              f"{vae480['banded_s']:.2f} s |",
              f"| fused q/k RMSNorm + RoPE kernel, [2, 4096, 40, 128] bf16 | {kernel['fused_triton_ms']:.3f} ms vs "
              f"{kernel['unfused_compiled_ms']:.3f} ms compiled unfused ({kernel['unfused_eager_ms']:.2f} eager); "
              f"{kernel['mismatch_fraction']:.1e} of values differ, at most {kernel['max_pair_ulps']:.0f} bf16 ulps; "
              "a compiled block around it fails to build (InductorError) |",
              "| FFN in 4 token chunks, one compiled A14B block, 480p tokens, batch 2 | peak "
              f"{ffn['peak_gb']['4']:.2f} GB with chunks, {ffn['peak_gb']['0']:.2f} GB without; output within "
              f"{ffn['chunked_vs_whole']:.1e} |",
              f"| block streaming, 6 A14B blocks through 2 slots, 480p tokens | {100 * stream['covered_fraction']:.0f}%"
              f" of the block copies under compute; streamed forward {stream['ratio']:.3f}x resident |",
              "", "sources: " + ", ".join(H100_FILES.values())]
    return "\n".join(lines)


# the H100 again (issue 18's sections 3-6, issue 19's encode, issue 22's projection): one machine session at 7c9f08e
H100_BACKLOG = {"waterfall": "backlog/h100_waterfall_720p_h100.json", "stream16": "backlog/h100_stream_480p_16gb.json",
                "whole16": "backlog/h100_whole_480p_16gb.json", "fp8": "backlog/h100_fewstep_720p_fp8.json",
                "cache": "backlog/h100_cache_720p_projection.json", "encode": "backlog/h100_i2v_encode_720p.json"}


def _row_clocks(record: dict) -> str:
    """SM clock and board power sampled during each timed row (and the peer / whole run / videos)."""
    parts = [f"{r['label']}: {_clocks(r['gpu'])}" for r in record.get("rows", []) if "gpu" in r]
    peer = record.get("peer") or {}
    parts += [f"peer: {_clocks(peer['batch1']['gpu'])}"] if "batch1" in peer else []
    runs = [*(record.get("whole_run") or {}).get("runs", []), *(record.get("fewstep") or {}).get("runs", [])]
    for v in record.get("variants", []):
        runs += v.get("runs", [])
    parts += [f"videos: {_clocks([r['gpu'] for r in runs])}"] if runs else []
    return "clocks: " + "; ".join(parts)


def _encode_table(record: dict) -> str:
    enc, dec = record["vae_encode"], record["vae"]
    lines = ["| I2V condition, 1280x720: VAE encode of [image, 80 black frames] (one timed run each after a warm-up) "
             "| plain (the reference's) | --fast_encode | --fast_encode output | peak GB allocated / reserved | "
             "vs fp32 |", "|---|---|---|---|---|---|"]
    for name, e in enc.items():
        err = (f"max abs {e['max_abs_vs_fp32']:.1e}, rel {e['rel_vs_fp32']:.1e}" if "rel_vs_fp32" in e
               else "(reference)")
        lines.append(f"| encode, {name} | {e['encode_s']:.2f} s | {e['reuse_encode_s']:.2f} s | "
                     f"{'bit for bit the plain encode' if e['reuse_equal'] else 'DIFFERS from the plain encode'} | "
                     f"{e['peak_gb']:.1f} / {e['peak_reserved_gb']:.1f} | {err} |")
    for name, d in dec.items():
        err = f"PSNR {d['psnr_vs_fp32_db']:.1f} dB, max abs {d['max_abs_vs_fp32']:.1e}" if "psnr_vs_fp32_db" in d \
            else "(reference)"
        lines.append(f"| decode of 81 frames, {name} (whole frames) | {d['decode_s']:.2f} s | - | - | "
                     f"{d['peak_gb']:.1f} / {d['peak_reserved_gb']:.1f} | {err} |")
    return "\n".join(lines)


def h100_backlog_tables() -> str:
    """The backlog's rows measured on the H100 in one session: each benchmark's own table, clocks, source."""
    f, blocks = H100_BACKLOG, []
    for key, table in (("waterfall", markdown), ("stream16", memory_tiers.markdown),
                       ("whole16", memory_tiers.markdown), ("fp8", fewstep.markdown), ("cache", markdown)):
        record = load(f[key])
        blocks.append(f"{table(record)}\n\n{_row_clocks(record)}; source: {f[key]}")
    blocks.append(f"{_encode_table(load(f['encode']))}\n\nsource: {f['encode']}")
    return "\n\n".join(blocks)


def report() -> str:
    parts = [waterfall_table(n) for n in STAGE_SOURCES] + [full_table()] + [fewstep_table(n) for n in FEWSTEP_FILES]
    parts += [sourced(memory_tiers.markdown, n) for n in MEMORY_FILES]
    parts += [sourced(fp8.markdown, n) for n in FP8_FILES]
    parts += [h100_tables(), h100_backlog_tables()]
    return "\n\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--check", default=None, help="a markdown file that must contain these tables verbatim")
    args = p.parse_args(argv)
    text = report()
    if args.check:
        doc = Path(args.check).read_text()
        missing = [block for block in text.split("\n\n") if block.strip() and block not in doc]
        if missing:
            print(f"{args.check} lacks {len(missing)} block(s) of the report, first:\n{missing[0]}")
            return 1
        print(f"{args.check}: every table matches the committed results")
        return 0
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
