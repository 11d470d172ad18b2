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


def report() -> str:
    parts = [waterfall_table(n) for n in STAGE_SOURCES] + [full_table()] + [fewstep_table(n) for n in FEWSTEP_FILES]
    parts += [sourced(memory_tiers.markdown, n) for n in MEMORY_FILES]
    parts += [sourced(fp8.markdown, n) for n in FP8_FILES]
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
