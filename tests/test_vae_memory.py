"""benchmarks/vae_memory.py: the live-tensor counter on known allocations, and the full-size VAE counted on the meta
device at a small size (320x192x9: latent 24 x 40, 3 latent frames), end to end through the CLI."""
import json

import torch
import torch.nn.functional as F

from benchmarks import vae_memory
from benchmarks.vae_memory import LiveBytes, count, measure


def test_counter_peak_of_known_allocations():
    counter = LiveBytes()
    with counter:
        a = torch.empty(1024, device="meta")  # 4 KiB
        b = torch.empty(2048, device="meta")  # 8 KiB
        view = b[:100]  # no new storage
        del a
        c = torch.empty(1024, device="meta")  # replaces a: still 12 KiB
        d = b + 1  # 20 KiB
        del b, view, c, d
        e = torch.empty(4096, device="meta")  # 16 KiB after the frees
        del e
    assert counter.peak == 20 * 1024


def test_fused_attention_stands_in_for_the_score_matrix():
    q = torch.empty(1, 1, 960, 384, device="meta")

    def attend():
        return F.scaled_dot_product_attention(q, q, q)

    fused, math = count(attend), count(attend, fused_attention=False)
    assert fused["peak_bytes"] == 960 * 384 * 4 + 960 * 4  # output + fp32 log-sum-exp
    assert math["peak_bytes"] >= 960 * 960 * 4  # the [L, L] scores
    assert fused["macs"] == math["macs"] == 2 * 960 * 960 * 384


def test_peaks_order_and_work_at_a_small_size():
    size = (320, 192, 9, "fp32")
    whole = measure(*size)
    frame = measure(*size, order="frame", split=2, bands=2)
    band = measure(*size, order="band", split=0, bands=2)
    assert band["peak_bytes"] < frame["peak_bytes"] < whole["peak_bytes"]
    out_bytes = 3 * 9 * 192 * 320 * 4
    assert band["peak_bytes"] > out_bytes  # the output alone is live at the end
    # extra rows cost work; band order crops each block's input, so split 0 stays below its frame-order cost
    frame0 = measure(*size, order="frame", split=0, bands=2)
    assert whole["macs"] < band["macs"] < frame0["macs"]
    assert frame0["rows_overhead"] == [1.0] * 4 and band["rows_overhead"][0] == 1.0
    assert band["rows_overhead"] == sorted(band["rows_overhead"], reverse=True)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "vae_memory.json"
    assert vae_memory.main(["--size", "320x192", "--frames", "5", "--dtype", "bf16", "--orders", "frame,band",
                            "--bands", "2", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    cases = [(r["order"], r["split"], r["bands"]) for r in rec["records"]]
    assert cases == [("whole", None, 1), ("frame", 2, 2), ("band", 0, 2)]
    assert rec["fused_attention"] and all(r["peak_bytes"] > 0 and r["macs"] > 0 for r in rec["records"])
    text = capsys.readouterr().out
    assert "live-tensor peaks" in text and "band       0      2" in text
