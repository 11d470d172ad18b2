"""generate.py: bad input gets one line and a non-zero exit before any weight loads; the tiny task writes an mp4."""
import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import generate  # noqa: E402
from wan.cli import build_parser, options_from_args  # noqa: E402
from wan.options import FAST_PRESET, RuntimeOptions  # noqa: E402


def run(argv, capsys):
    code = generate.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv,needle", [
    (["--task", "t2v-5B"], "unknown task"),
    (["--task", "t2v-A14B", "--size", "1024*1024", "--ckpt_dir", "x"], "WIDTH*HEIGHT"),
    (["--task", "t2v-A14B", "--frame_num", "80", "--ckpt_dir", "x"], "4n+1 (e.g. 77 or 81)"),
    (["--task", "t2v-A14B"], "--ckpt_dir is required"),
    (["--task", "t2v-tiny", "--prompt", "   "], "prompt is empty"),
    (["--task", "t2v-tiny", "--sample_steps", "0"], "--sample_steps must be >= 1"),
    (["--task", "t2v-tiny", "--save_file", "out.avi"], ".mp4"),
    (["--task", "t2v-tiny", "--ulysses_size", "2"], "torchrun"),
    (["--task", "t2v-tiny", "--use_prompt_extend"], "not supported"),
])
def test_bad_input_one_line_nonzero(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(argv, capsys)
    assert code == 2
    assert needle in err and err.startswith("error:") and "\n" not in err


def test_unwritable_output_and_no_clobber(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run(["--task", "t2v-tiny", "--save_file", str(blocker / "v.mp4")], capsys)
    assert code == 2 and "\n" not in err
    existing = tmp_path / "v.mp4"
    existing.write_bytes(b"keep")
    code, err = run(["--task", "t2v-tiny", "--save_file", str(existing)], capsys)
    assert code == 2 and "--overwrite" in err and existing.read_bytes() == b"keep"


def test_missing_checkpoint_file_named(capsys, tmp_path):
    (tmp_path / "ckpt").mkdir()
    code, err = run(["--task", "t2v-A14B", "--ckpt_dir", str(tmp_path / "ckpt"), "--save_file",
                     str(tmp_path / "o.mp4"), "--device", "cpu"], capsys)
    assert code == 1 and "models_t5_umt5-xxl-enc-bf16.pth" in err and "\n" not in err


def test_options_and_cli_are_one_to_one():
    parser = build_parser()
    flags = {a.dest for a in parser._actions}
    for f in dataclasses.fields(RuntimeOptions):
        assert f.name in flags, f"RuntimeOptions.{f.name} has no CLI flag"
        # each flag sets exactly its field
        value = {"bool": True, "bool | None": True, "int": 2, "str": None}[f.type]
        if f.type == "str":
            value = f.metadata["choices"][-1]
        argv = [f"--{f.name}", str(value)]
        opts = options_from_args(parser.parse_args(argv))
        assert getattr(opts, f.name) == value and set(opts.changed()) <= {f.name}
    fast = options_from_args(parser.parse_args(["--fast", "--compile", "false"]))
    assert fast.compile is False  # explicit flags override the preset
    assert all(getattr(fast, k) == v for k, v in FAST_PRESET.items() if k != "compile")


def test_tiny_generate_writes_playable_mp4(tmp_path, capsys):
    import imageio_ffmpeg

    out = tmp_path / "tiny.mp4"
    code = generate.main(["--task", "t2v-tiny", "--ckpt_dir", str(tmp_path / "ckpt"), "--size", "64*64",
                          "--frame_num", "9", "--sample_steps", "3", "--base_seed", "7", "--device", "cpu",
                          "--save_file", str(out)])
    assert code == 0, capsys.readouterr().err
    frames, secs = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert (frames, round(secs, 2)) == (9, 0.56)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp.mp4")]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_asked_but_absent(capsys, tmp_path):
    code, err = run(["--task", "t2v-tiny", "--device", "cuda", "--save_file", str(tmp_path / "o.mp4")], capsys)
    assert code == 2 and "CUDA is not available" in err and "\n" not in err
