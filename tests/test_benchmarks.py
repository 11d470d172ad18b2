"""The benchmark tools on CPU with the tiny model: the waterfall runs end to end, the report matches the committed
results and OPTIMIZATION.md, and the comparison tool's metrics are right."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import compare, report, scaling, waterfall

ROOT = Path(__file__).resolve().parents[1]


def test_waterfall_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "wf.json"
    code = waterfall.main(["--res", "tiny", "--frame_num", "5", "--rows", "0,3,4", "--original_attn", "sdpa",
                           "--stages", "--out", str(out), "--deadline", "300"])
    assert code == 0
    rec = json.loads(out.read_text())
    rows = rec["rows"]
    assert [r["label"] for r in rows] == [waterfall.WATERFALL[i][0] for i in (0, 3, 4)]
    assert all("error" not in r for r in rows), rows
    # cumulative options, and the fast rows really ran the fast paths
    assert rows[2]["options"]["fast_rope"] and rows[2]["options"]["fast_time_embedding"]
    assert rows[2]["rope"].startswith("fast") and rows[0]["rope"].startswith("reference")
    # same seed, same weights: the exact switches change the prediction only by fp32 rounding on CPU
    assert rows[2]["pred_rel_diff"] < 1e-5
    proj = rows[0]["projection"]
    assert math.isclose(proj["dit_s"], 40 * rows[0]["per_step_s"])
    assert math.isclose(proj["video_s"], proj["dit_s"] + proj["text_s"] + proj["vae_s"] + proj["offload_s"])
    assert proj["offload_s"] > 0 and rows[1]["projection"]["offload_s"] == 0  # row 3 has experts resident
    assert "| original path" in capsys.readouterr().out


def test_report_reproduces_optimization_md():
    assert report.main(["--check", str(ROOT / "OPTIMIZATION.md")]) == 0


def test_compare_metrics(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(3, 32, 48, 3), dtype=np.uint8)
    same = compare.compare_videos(a, a)
    assert same["max_abs_diff"] == 0 and same["ssim_min"] == pytest.approx(1.0) and math.isinf(same["psnr_min_db"])
    b = np.clip(a.astype(int) + 2, 0, 255).astype(np.uint8)
    r = compare.compare_videos(a, b)
    mse = ((a.astype(float) - b.astype(float)) ** 2).reshape(3, -1).mean(1)
    assert r["psnr_min_db"] == pytest.approx(float((10 * np.log10(255**2 / mse)).min()))
    assert 0.9 < r["ssim_mean"] < 1.0
    torch.save({"latent": torch.ones(4)}, tmp_path / "a.pt")
    torch.save(torch.ones(4) * 1.5, tmp_path / "b.pt")
    t = compare.compare_tensors(compare.load_tensor(str(tmp_path / "a.pt")),
                                compare.load_tensor(str(tmp_path / "b.pt")))
    assert t["max_abs_diff"] == pytest.approx(0.5) and t["rel_l2_diff"] == pytest.approx(1 / 3)
    assert compare.main([str(tmp_path / "a.pt"), str(tmp_path / "x.mp4")]) == 2


def test_scaling_two_processes_cpu(tmp_path):
    out = tmp_path / "scaling.json"
    opts = json.dumps({"offload_model": False, "fast_rope": True, "fast_time_embedding": True})
    assert scaling.main(["--res", "tiny", "--frame_num", "5", "--nproc", "1,2", "--options", opts,
                         "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all("error" not in r for r in rows), rows
    assert [r["world_size"] for r in rows] == [1, 2] and rows[1]["options"]["ulysses_size"] == 2
    assert rows[1]["pred_rel_diff"] < 1e-5  # Ulysses on 2 ranks computes the single-process prediction
    assert scaling.options_for(4, "cfg", {})["ulysses_size"] == 2


def test_projection_counts_the_t5_down_copy_only_where_the_placement_makes_it():
    """Resident encodes from a temporary copy of pinned host weights (no copy back); the reference's offload copies
    T5 up and back down."""
    stages = {"t5_encode_s": 1.0, "t5_to_gpu_s": 2.0, "t5_to_cpu_s": 8.0, "vae_decode_s": 6.0}
    row = {"per_step_s": 1.0}
    resident = waterfall.projection(row, {"offload_model": False}, stages)
    offload = waterfall.projection(row, {}, stages)
    assert resident["text_s"] == 3.0 and offload["text_s"] == 11.0


def test_fewstep_variant_is_compared_with_the_baseline_video(tmp_path, capsys):
    from benchmarks import fewstep

    out = tmp_path / "few.json"
    code = fewstep.main(["--res", "tiny", "--frame_num", "5", "--skip", "row,stages", "--repeat", "0", "--lora_rank",
                         "4", "--options", "{}", "--variant", 'fast rope={"fast_rope": true}', "--out", str(out),
                         "--deadline", "300"])
    assert code == 0
    rec = json.loads(out.read_text())
    base, (var,) = rec["fewstep"], rec["variants"]
    assert "error" not in base and "error" not in var, (base, var)
    assert var["name"] == "fast rope" and var["options"].get("fast_rope") and not base["options"].get("fast_rope")
    err = var["video_vs_ref"]  # same weights, LoRAs, seed and prompt: only fp32 rounding apart on CPU
    assert var["latent_rel_diff"] < 1e-4 and err["psnr_min_db"] > 40 and err["frames"] == 5
    assert "| 4 steps, fast rope |" in capsys.readouterr().out


def test_fewstep_variant_must_be_name_and_json():
    from benchmarks import fewstep

    assert fewstep.parse_variant('fp8={"fp8_linear": "all"}') == ("fp8", {"fp8_linear": "all"})
    for bad in ("fp8", "={}", 'fp8=["all"]', "fp8={oops"):
        with pytest.raises(Exception, match="--variant"):
            fewstep.parse_variant(bad)


def test_copy_overlap_counts_only_block_copies_under_kernels():
    from types import SimpleNamespace as NS

    from benchmarks.overlap import copy_overlap, covered

    assert covered((0, 10), [(2, 4), (3, 6), (8, 20)]) == 6  # union: 2..6 and 8..10
    cuda = NS(name="CUDA")

    def ev(name, a, b):
        return NS(name=name, time_range=NS(start=a, end=b), device_type=cuda)

    events = [ev("Memcpy HtoD (Pinned -> Device)", 0, 4000), ev("Memcpy HtoD (Pinned -> Device)", 5000, 5100),
              ev("gemm", 1000, 3000), ev("Memset (Device)", 0, 4000), ev("Memcpy HtoD (Pinned -> Device)", 6000, 8000)]
    ov = copy_overlap(events)  # the 100 us upload is not a block copy; memsets and copies are not compute
    assert ov["block_copies"] == 2 and ov["copy_ms"] == [4.0, 2.0] and ov["covered_fraction"] == 2000 / 6000
    assert copy_overlap([])["covered_fraction"] is None


def test_memory_tiers_tiny_cpu(tmp_path, capsys):
    """The tier rows run end to end on the CPU (no cap there: the streaming machinery with synchronous copies):
    resident, streamed, and streamed with the FFN in token chunks, all timed and labelled."""
    from benchmarks import memory_tiers

    out = tmp_path / "tiers.json"
    code = memory_tiers.main(["--res", "tiny", "--frame_num", "5", "--caps", "8", "--ffn_chunks", "2", "--steps",
                              "2", "--out", str(out), "--deadline", "300"])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["options"].get("stream_blocks", 0) for r in rows] == [0, 2, 2], rows
    assert all("error" not in r and r["per_forward_s"] > 0 for r in rows), rows
    assert rows[2]["options"]["ffn_chunks"] == 2 and rows[2]["backends"]["ffn"] == "2 token chunks"
    assert "FFN in 2 token chunks" in capsys.readouterr().out


def test_emulated_card_caps_the_process_and_reports_its_free_memory(monkeypatch):
    """WAN_EMULATE_GPU_GIB=79.18 on a 141 GB card holding 0.5 GB of context: the allocator may reserve the rest of
    the 79.18 GiB, and mem_get_info reports that free out of 79.18 GiB (what the CLI's --fast plan reads)."""
    import torch

    from benchmarks import emulate

    total, held = 143.8 * 2**30, 0.5 * 2**30
    fractions = []
    monkeypatch.setenv(emulate.ENV, "79.18")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(total - held), int(total)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i=None: fractions.append(f))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H200")
    record = emulate.emulate_card(torch.device("cuda:0"))
    assert record["gib"] == 79.18 and record["on"] == "NVIDIA H200"
    assert abs(fractions[0] * total - (79.18 * 2**30 - held)) < 1
    free, size = torch.cuda.mem_get_info(0)
    assert size == int(79.18 * 2**30) and abs(free - (79.18 * 2**30 - held)) < 2
    monkeypatch.setenv(emulate.ENV, "200")
    with pytest.raises(SystemExit, match="emulate a smaller size"):
        emulate.emulate_card(torch.device("cuda:0"))


# ---- image-to-video rows (--task i2v) ------------------------------------------------------------------------------
def test_waterfall_i2v_tiny_cpu_beside_t2v(tmp_path, capsys):
    """An I2V row (36-channel experts, y with every forward) and the T2V row beside it at the same token count."""
    out = tmp_path / "wf.json"
    code = waterfall.main(["--task", "i2v", "--res", "tiny", "--frame_num", "5", "--rows", "4", "--original_attn",
                           "sdpa", "--beside_t2v", "--steps", "2", "--out", str(out), "--deadline", "300"])
    assert code == 0
    rec = json.loads(out.read_text())
    (row,), beside = rec["rows"], rec["t2v_beside"]
    assert rec["task"] == "i2v" and "error" not in row and "error" not in beside, (row, beside)
    assert row["task"] == "i2v" and beside["task"] == "t2v" and beside["options"] == row["options"]
    assert row["seq_len"] == beside["seq_len"] and row["options"]["fast_rope"]  # the same tokens, the same options
    assert "image-to-video" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        waterfall.main(["--beside_t2v"])  # needs --task i2v


def test_fewstep_i2v_tiny_cpu(tmp_path, capsys):
    """The 4-step I2V video with a Lightning-layout LoRA pair through the benchmark's child process."""
    from benchmarks import fewstep

    out = tmp_path / "few.json"
    code = fewstep.main(["--task", "i2v", "--res", "tiny", "--frame_num", "5", "--skip", "row,stages", "--repeat",
                         "0", "--lora_rank", "4", "--out", str(out), "--deadline", "300", "--options", "{}"])
    assert code == 0
    few = json.loads(out.read_text())["fewstep"]
    assert "error" not in few and few["task"] == "i2v" and few["sampling_steps"] == 4, few
    assert few["runs"][0]["expert_trace"] == ["high", "high", "low", "low"] and "vae_encode" in few["runs"][0]["stages"]
    assert set(few["backends"]["loras"]) == {"high", "low"} and "image-to-video" in capsys.readouterr().out


def test_stages_time_the_condition_encode_in_fp32_and_bf16(capsys):
    from benchmarks import fewstep, rows

    assert rows.main(["stages", "--task", "i2v", "--res", "tiny", "--frame_num", "5", "--vae_dtypes", "fp32,bf16",
                      "--device", "cpu"]) == 0
    st = json.loads(capsys.readouterr().out.split("RESULT ", 1)[1])
    enc = st["vae_encode"]
    assert st["vae_encode_s"] == enc["fp32"]["encode_s"] > 0 and 0 < enc["bf16"]["rel_vs_fp32"] < 0.1  # approximate
    text = fewstep.markdown({"env": {"torch": "x", "git_commit": "y"}, "task": "i2v", "res": "tiny", "frame_num": 5,
                             "stages": st})
    assert "VAE encode of the condition, bf16" in text and "rel" in text
    assert enc["fp32"]["reuse_equal"] and enc["bf16"]["reuse_equal"] and "fp32, --fast_encode" in text


# ---- step caching: the whole-video A/B and the cost of a reused step -----------------------------------------------
def test_full_cache_variant_and_row_cache_cost_tiny_cpu(capsys):
    """`rows full --cache_variant`: the cached videos on the same pipeline beside the uncached ones, with the error
    against them; `rows row --cache_cost`: a reused step's seconds through the real loop, MagCache's projection."""
    from benchmarks import rows

    assert rows.main(["full", "--res", "tiny", "--frame_num", "5", "--sampling_steps", "12", "--repeat", "0",
                      "--warmup_steps", "1", "--options", '{"offload_model": false}', "--cache_variant",
                      '{"cache": "magcache"}', "--device", "cpu"]) == 0
    full = json.loads(capsys.readouterr().out.split("RESULT ", 1)[1])
    ab = full["cache_ab"]
    assert full["warmup_s"] > 0 and "cache" not in full["runs"][0] and ab["options"] == {"cache": "magcache"}
    assert ab["cache"]["reused_steps"] == [3, 4, 6, 7, 10] and ab["runs"][0]["cache"]["computed_calls"] == 14
    assert 0 < ab["latent_rel_diff"] < 0.5 and 10 < ab["video_vs_uncached"]["psnr_mean_db"] < 100
    assert ab["dit_s"]["cached"] > 0 and ab["video_ratio"] > 0
    assert rows.main(["row", "--res", "tiny", "--frame_num", "5", "--steps", "1", "--options",
                      '{"offload_model": false, "batched_cfg": true}', "--cache_cost", "magcache,easycache",
                      "--device", "cpu"]) == 0
    cost = json.loads(capsys.readouterr().out.split("RESULT ", 1)[1])["cache_cost"]
    assert cost["magcache"]["computed"] == [True, False, False] and cost["easycache"]["computed"][2:] == [False] * 2
    mag = cost["magcache"]
    assert len(mag["schedule_reused_steps"]) == 14 and mag["reused_step_s"] > 0
    assert mag["projected_dit_s"] == pytest.approx(26 * mag["computed_step_s"] + 14 * mag["reused_step_s"])
    text = waterfall.markdown({"env": {"torch": "x", "git_commit": "y"}, "res": "tiny", "frame_num": 5,
                               "rows": [{"label": "r", "per_forward_s": 1, "per_step_s": 1, "tflops": 0,
                                         "peak_gb": 0, "resident_experts": 2, "backend": "sdpa", "cache_cost": cost,
                                         "projection": waterfall.projection({"per_step_s": 1, "cache_cost": cost},
                                                                            {}, None)}]})
    assert "--cache magcache: a reused step" in text and "projected from these and the schedule (26 of 40" in text


# ---- TI2V-5B rows (--task ti2v) ------------------------------------------------------------------------------------
def test_waterfall_ti2v_tiny_cpu(tmp_path, capsys):
    """TI2V rows: one 48-channel model in image mode (frame 0 fixed, per-token timesteps), the original path and a
    switch, compared; the projection is for the task's 50 steps."""
    out = tmp_path / "wf.json"
    code = waterfall.main(["--task", "ti2v", "--res", "tiny", "--frame_num", "5", "--rows", "0,3", "--original_attn",
                           "sdpa", "--steps", "1", "--out", str(out), "--deadline", "300"])
    assert code == 0
    rec = json.loads(out.read_text())
    assert rec["task"] == "ti2v" and [("error" in r) for r in rec["rows"]] == [False, False], rec["rows"]
    base, fast = rec["rows"]
    assert base["ti2v_mode"] == "image" and base["seq_len"] == 2 * 2 * 2 and base["resident_experts"] == 1
    assert fast["options"]["fast_time_embedding"] and fast["pred_rel_diff"] < 1e-5  # two rows gathered: exact
    assert base["projection"]["steps"] == 50
    assert "TI2V-5B image mode" in capsys.readouterr().out


def test_stages_ti2v_wan22_decode_in_fp32_bf16_and_bands(capsys):
    from benchmarks import rows

    assert rows.main(["stages", "--task", "ti2v", "--res", "tiny", "--frame_num", "5", "--vae_dtypes", "fp32,bf16",
                      "--vae_bands", "2", "--vae_only", "--device", "cpu"]) == 0
    st = json.loads(capsys.readouterr().out.split("RESULT ", 1)[1])
    assert st["task"] == "ti2v" and st["frame_num"] == 5 and st["size"] == [64, 64]
    vae = st["vae"]
    assert vae["fp32"]["banded"]["max_abs_vs_whole"] < 1e-5 and vae["bf16"]["max_abs_vs_fp32"] > 0
    assert "reuse_equal" not in st["vae_encode"]["fp32"] and st["vae_encode"]["bf16"]["rel_vs_fp32"] < 0.1
    assert st["vae_encode_s"] > 0 and "t5_encode_s" not in st  # --vae_only
