"""The image-to-video command line: how image files are read (the reference's convert("RGB"), and what we decide for
EXIF orientation, 16-bit and alpha), --image / --image_file plumbing into WanI2V.generate (a stand-in pipeline), the
video size logged before loading, and the tiny task end to end. Refusals are rows of test_bad_inputs.py."""
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import generate  # noqa: E402
from wan.utils.image import load_image  # noqa: E402


def png16(path, arr):
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3] uint16), written by hand: Pillow does not write 16-bit RGB."""
    h, w = arr.shape[:2]
    color = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def rgb(w=40, h=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- reading image files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_ordinary_images_are_what_the_reference_reads(tmp_path, fmt):
    path = tmp_path / f"a.{fmt}"
    Image.fromarray(rgb()).save(path)
    loaded = load_image(path)
    assert loaded.notes == [] and loaded.image.mode == "RGB" and loaded.size == (40, 24)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(Image.open(path).convert("RGB")))


def test_grey_and_palette_images_convert_as_the_reference(tmp_path):
    for mode in ("L", "P", "CMYK"):
        path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.fromarray(rgb()).convert(mode).save(path)
        loaded = load_image(path)
        assert loaded.notes == [] and np.array_equal(np.asarray(loaded.image),
                                                     np.asarray(Image.open(path).convert("RGB")))


def test_16_bit_images_keep_their_high_byte(tmp_path):
    grey = np.random.default_rng(1).integers(0, 65536, (24, 40)).astype(np.uint16)
    loaded = load_image(png16(tmp_path / "g16.png", grey))
    assert "16-bit" in loaded.notes[0] and loaded.image.mode == "RGB"
    assert np.array_equal(np.asarray(loaded.image)[..., 0], (grey >> 8).astype(np.uint8))
    # the reference's convert("RGB") clips a 16-bit grey image at 255: nearly white
    assert (np.asarray(Image.open(tmp_path / "g16.png").convert("RGB")) == 255).mean() > 0.9
    colour = np.random.default_rng(2).integers(0, 65536, (24, 40, 3)).astype(np.uint16)
    loaded = load_image(png16(tmp_path / "c16.png", colour))  # Pillow itself reads 16-bit RGB as its high bytes
    assert loaded.notes == [] and np.array_equal(np.asarray(loaded.image), (colour >> 8).astype(np.uint8))


def test_alpha_is_dropped_as_the_reference_does(tmp_path):
    rgba = np.concatenate([rgb(), np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None].repeat(24, 0)], -1)
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    loaded = load_image(path)
    assert "alpha channel ignored" in loaded.notes[0]
    assert np.array_equal(np.asarray(loaded.image), rgba[..., :3])


def test_exif_orientation_turns_the_image_upright(tmp_path):
    img = Image.fromarray(rgb(40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (24, 40) and "EXIF orientation 6" in loaded.notes[0]
    stored = Image.open(path).convert("RGB")
    assert np.array_equal(np.asarray(loaded.image), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))


# ---- generate.py with a stand-in pipeline ----------------------------------------------------------------------------
class FakeI2V:
    calls: list = []

    def __init__(self, cfg, ckpt_dir, **kwargs):
        FakeI2V.calls.append(("init", cfg.name, kwargs))
        self.last_result = None

    def generate(self, prompt, img, **kwargs):
        import torch

        from wan.image_condition import i2v_geometry

        FakeI2V.calls.append(("generate", prompt, img.size, kwargs))
        if prompt == "boom":
            raise RuntimeError("injected failure")
        geo = i2v_geometry(*img.size, kwargs["max_area"])
        return torch.zeros(3, kwargs["frame_num"], geo.height, geo.width)


@pytest.fixture
def fake_i2v(monkeypatch):
    import wan.image2video as i2v

    FakeI2V.calls = []
    monkeypatch.setattr(i2v, "WanI2V", FakeI2V)
    return FakeI2V


def _argv(ckpt, *extra):
    return ["--task", "i2v-tiny", "--ckpt_dir", str(ckpt), "--device", "cpu", "--size", "64*64", "--frame_num", "5",
            *map(str, extra)]


def test_image_reaches_generate_with_the_reference_arguments(tmp_path, tiny_i2v_ckpt, fake_i2v, capsys, caplog):
    Image.fromarray(rgb(120, 90)).save(tmp_path / "f.png")
    with caplog.at_level("INFO", logger="wan"):
        code = generate.main(_argv(tiny_i2v_ckpt, "--image", tmp_path / "f.png", "--prompt", "a cat", "--save_file",
                                   tmp_path / "v.mp4"))
    out = caplog.text
    assert code == 0, capsys.readouterr().err
    (_, task, init), (_, prompt, size, gen) = fake_i2v.calls
    assert task == "i2v-tiny" and init["plan_for"] == (64, 48, 5) and prompt == "a cat" and size == (120, 90)
    assert gen["max_area"] == 64 * 64 and (gen["shift"], gen["sampling_steps"], gen["guide_scale"]) == (5.0, 8,
                                                                                                     (3.5, 3.5))
    assert "offload_model" not in gen and (tmp_path / "v.mp4").is_file()
    # the video size is logged before the pipeline is built
    assert out.index("video 64x48, 5 frames, from") < out.index("task i2v-tiny")


def test_batch_pairs_images_with_prompt_lines_and_skips_bad_ones(tmp_path, tiny_i2v_ckpt, fake_i2v, capsys, caplog):
    for i, (w, h) in enumerate(((64, 64), (120, 60), (40, 80))):
        Image.fromarray(rgb(w, h, seed=i)).save(tmp_path / f"{i}.png")
    (tmp_path / "p.txt").write_text("one\n\u200b\nboom\n# skip\ntwo\nthree\n")
    (tmp_path / "i.txt").write_text(f"{tmp_path}/0.png\n# a comment\n{tmp_path}/1.png\n{tmp_path}/1.png\n"
                                    f"{tmp_path}/2.png\n{tmp_path}/missing.png\n")
    out = tmp_path / "out"
    out.mkdir()
    with caplog.at_level("INFO", logger="wan"):
        code = generate.main(_argv(tiny_i2v_ckpt, "--prompt_file", tmp_path / "p.txt", "--image_file",
                                   tmp_path / "i.txt", "--save_dir", out))
    log, err = caplog.text, capsys.readouterr().err
    assert code == 1 and "3 of 5 prompts failed (lines 2, 3, 6 of" in err.strip().splitlines()[-1]
    gens = [c for c in fake_i2v.calls if c[0] == "generate"]
    assert [(c[1], c[2]) for c in gens] == [("one", (64, 64)), ("boom", (120, 60)), ("two", (40, 80))]
    assert fake_i2v.calls[0][2]["plan_for"] == (64, 64, 5)  # the largest video of the batch (64x64, 80x32, 32x80)
    assert "missing.png does not exist; skipped" in log and "line 3: video 80x32" in log
    assert log.index("line 5: video 32x80") < log.index("task i2v-tiny")
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and "_0000_one_" in names[0] and "_0003_two_" in names[1]


def test_one_image_serves_every_prompt_of_a_batch(tmp_path, tiny_i2v_ckpt, fake_i2v, capsys):
    Image.fromarray(rgb()).save(tmp_path / "f.png")
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    code = generate.main(_argv(tiny_i2v_ckpt, "--prompt_file", tmp_path / "p.txt", "--image", tmp_path / "f.png",
                               "--save_dir", tmp_path))
    assert code == 0, capsys.readouterr().err
    assert [c[2] for c in fake_i2v.calls if c[0] == "generate"] == [(40, 24), (40, 24)]


def test_tiny_i2v_writes_a_playable_mp4(tmp_path, capsys):
    import imageio_ffmpeg

    Image.fromarray(rgb(60, 40)).save(tmp_path / "f.png")
    out = tmp_path / "tiny.mp4"
    code = generate.main(_argv(tmp_path / "ckpt", "--image", tmp_path / "f.png", "--sample_steps", "2",
                               "--base_seed", "7", "--save_file", out))
    assert code == 0, capsys.readouterr().err
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames == 5 and (tmp_path / "ckpt" / "high_noise_model" / "config.json").is_file()
