"""TI2V on two CPU ranks with gloo: Ulysses over the 4 heads of the tiny model in image mode (the per-token timesteps
and their gathered time-embedding rows are sharded with the tokens; 9 real tokens, so one padded token takes t),
against one process; and the parallel layout for TI2V-5B's 24 heads."""
import numpy as np
import pytest
import torch
from PIL import Image

from test_distributed import PIPE_TOL, rel, run_ranks


def _argv(ckpt, image, save_file, *extra):
    return ["--task", "ti2v-tiny", "--ckpt_dir", str(ckpt), "--device", "cpu", "--size", "64*64", "--frame_num", "9",
            "--sample_steps", "2", "--base_seed", "42", "--prompt", "two cats box on a stage", "--image", str(image),
            "--save_file", str(save_file), *extra]


def _capture(out_file):
    import wan.textimage2video as ti2v

    orig = ti2v.WanTI2V.generate

    def generate(self, *args, **kwargs):
        video = orig(self, *args, **kwargs)
        torch.save({"latent": self.last_result.latent, "video": video, "sp_size": self.sp_size}, out_file)
        return video

    ti2v.WanTI2V.generate = generate
    return orig


def _worker(rank, world, out_dir, argv):
    import generate

    _capture(out_dir / f"gen{rank}.pt")
    (out_dir / f"code{rank}").write_text(str(generate.main(argv)))


@pytest.mark.parametrize("fast", [False, True], ids=["original", "fast_time_embedding"])
def test_ti2v_ulysses_matches_single_process(tmp_path, tiny_ti2v_ckpt, fast):
    import generate
    import wan.textimage2video as ti2v

    image = tmp_path / "frame.png"  # 3:1 -> a 96x32 video: 3 tokens a latent frame, 9 in all, padded to 10
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 90, 3), dtype=np.uint8)).save(image)
    extra = ("--fast_time_embedding",) if fast else ()
    orig = _capture(tmp_path / "single.pt")
    try:
        assert generate.main(_argv(tiny_ti2v_ckpt, image, tmp_path / "single.mp4", *extra)) == 0
    finally:
        ti2v.WanTI2V.generate = orig
    ref = torch.load(tmp_path / "single.pt")
    out = tmp_path / "ranks"
    out.mkdir()
    codes, errors = run_ranks(_worker, 2, out, _argv(tiny_ti2v_ckpt, image, out / "v.mp4", "--ulysses_size", "2",
                                                     *extra))
    assert codes == [0, 0] and [(out / f"code{r}").read_text() for r in range(2)] == ["0", "0"], errors
    runs = [torch.load(out / f"gen{r}.pt") for r in range(2)]
    assert all(r["sp_size"] == 2 and torch.equal(r["latent"], runs[0]["latent"]) for r in runs)
    assert ref["latent"].shape == (48, 3, 2, 6) and ref["latent"].abs().mean() > 0.1
    assert rel(runs[0]["latent"], ref["latent"]) <= PIPE_TOL and rel(runs[0]["video"], ref["video"]) <= PIPE_TOL


@pytest.mark.parametrize("size,ok", [(2, True), (3, True), (4, True), (6, True), (8, True), (12, True), (5, False),
                                     (16, False)])
def test_parallel_layout_for_24_heads(size, ok):
    from wan.configs import WAN_CONFIGS
    from wan.options import RuntimeOptions, check_parallel_layout

    heads = WAN_CONFIGS["ti2v-5B"].arch.num_heads
    if ok:
        check_parallel_layout(RuntimeOptions(ulysses_size=size), size, num_heads=heads)
        return
    with pytest.raises(ValueError) as err:
        check_parallel_layout(RuntimeOptions(ulysses_size=size), size, num_heads=heads)
    assert "must divide the 24 attention heads (1, 2, 3, 4, 6, 8, 12, 24)" in str(err.value)
