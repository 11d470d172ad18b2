"""The text-image-to-video command line (--task ti2v-5B / ti2v-tiny): the image optional, --image / --image_file
plumbing into WanTI2V.generate (a stand-in pipeline) with the reference's arguments, the task's sizes and defaults,
the video size logged before loading, and the tiny task end to end (24 fps). Refusals are rows of
test_bad_inputs.py."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import generate  # noqa: E402


def rgb(w=40, h=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


class FakeTI2V:
    calls: list = []

    def __init__(self, cfg, ckpt_dir, **kwargs):
        FakeTI2V.calls.append(("init", cfg.name, kwargs))
        self.last_result = None

    def generate(self, prompt, img=None, **kwargs):
        import torch

        from wan.ti2v_inputs import ti2v_geometry

        FakeTI2V.calls.append(("generate", prompt, None if img is None else img.size, kwargs))
        w, h = kwargs["size"] if img is None else (lambda g: (g.width, g.height))(ti2v_geometry(*img.size,
                                                                                              kwargs["max_area"]))
        return torch.zeros(3, kwargs["frame_num"], h, w)


@pytest.fixture
def fake_ti2v(monkeypatch):
    import wan.textimage2video as ti2v

    FakeTI2V.calls = []
    monkeypatch.setattr(ti2v, "WanTI2V", FakeTI2V)
    return FakeTI2V


def _argv(ckpt, *extra):
    return ["--task", "ti2v-tiny", "--ckpt_dir", str(ckpt), "--device", "cpu", "--frame_num", "5", *map(str, extra)]


def test_without_an_image_it_is_text_to_video_at_the_task_size(tmp_path, tiny_ti2v_ckpt, fake_ti2v, capsys):
    code = generate.main(_argv(tiny_ti2v_ckpt, "--size", "96*160", "--prompt", "a cat", "--save_file",
                               tmp_path / "v.mp4"))
    assert code == 0, capsys.readouterr().err
    (_, task, init), (_, prompt, img, gen) = fake_ti2v.calls
    assert task == "ti2v-tiny" and init["plan_for"] == (96, 160, 5) and img is None and gen["size"] == (96, 160)
    assert (gen["shift"], gen["sampling_steps"], gen["guide_scale"], gen["frame_num"]) == (5.0, 8, (5.0, 5.0), 5)
    assert "max_area" not in gen and "offload_model" not in gen


def test_image_reaches_generate_with_the_reference_arguments(tmp_path, tiny_ti2v_ckpt, fake_ti2v, capsys, caplog):
    Image.fromarray(rgb(120, 90)).save(tmp_path / "f.png")
    with caplog.at_level("INFO", logger="wan"):
        code = generate.main(_argv(tiny_ti2v_ckpt, "--image", tmp_path / "f.png", "--save_file",
                                   tmp_path / "v.mp4"))
    assert code == 0, capsys.readouterr().err
    (_, _, init), (_, _, size, gen) = fake_ti2v.calls
    assert size == (120, 90) and gen["max_area"] == 128 * 128 and init["plan_for"] == (160, 96, 5)
    assert caplog.text.index("video 160x96, 5 frames, from") < caplog.text.index("task ti2v-tiny")


def test_batch_with_an_image_per_line(tmp_path, tiny_ti2v_ckpt, fake_ti2v, capsys):
    for i, (w, h) in enumerate(((64, 64), (40, 80))):
        Image.fromarray(rgb(w, h, seed=i)).save(tmp_path / f"{i}.png")
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    (tmp_path / "i.txt").write_text(f"{tmp_path}/0.png\n{tmp_path}/1.png\n")
    code = generate.main(_argv(tiny_ti2v_ckpt, "--prompt_file", tmp_path / "p.txt", "--image_file",
                               tmp_path / "i.txt", "--save_dir", tmp_path, "--size", "64*64"))
    assert code == 0, capsys.readouterr().err
    assert [(c[1], c[2]) for c in fake_ti2v.calls if c[0] == "generate"] == [("one", (64, 64)), ("two", (40, 80))]


def test_ti2v_5b_takes_its_own_default_size():
    """The reference's default --size 1280*720 is not a TI2V size: --size defaults to the task's 1280*704."""
    from wan.cli import build_parser, validate_args

    args = build_parser().parse_args(["--task", "ti2v-5B", "--ckpt_dir", "x", "--device", "cpu"])
    validate_args(args)
    assert (args.size, args.frame_num, args.sample_steps, args.sample_shift) == ("1280*704", 121, 50, 5.0)
    assert args.options.ulysses_size == 1


def test_tiny_ti2v_writes_a_playable_24_fps_mp4_both_modes(tmp_path, capsys):
    import imageio_ffmpeg

    Image.fromarray(rgb(60, 40)).save(tmp_path / "f.png")
    for name, extra in (("text.mp4", ()), ("image.mp4", ("--image", tmp_path / "f.png"))):
        out = tmp_path / name
        code = generate.main(_argv(tmp_path / "ckpt", "--size", "64*64", "--sample_steps", "2", "--base_seed", "7",
                                   "--save_file", out, *extra))
        assert code == 0, capsys.readouterr().err
        frames, secs = imageio_ffmpeg.count_frames_and_secs(str(out))
        assert frames == 5 and abs(secs - 5 / 24) < 0.02
    assert (tmp_path / "ckpt" / "config.json").is_file() and (tmp_path / "ckpt" / "Wan2.2_VAE.pth").is_file()
