"""generate.py: bad input gets one line and a non-zero exit before any weight loads; the tiny task writes an mp4.

More bad inputs, as a table, in test_bad_inputs.py; here: the parser, its help and README, presets, LoRA and batch
plumbing (against a stand-in pipeline), signal handler hygiene.
"""
import dataclasses
import os
import re
import signal
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
    (["--task", "t2v-tiny", "--sample_steps", "0"], "--sample_steps must be between 1 and 1000"),
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
    # settings that only mean something with another flag (a step-cache setting needs its cache)
    needs = {"cache_thresh": ["--cache", "magcache"], "cache_max_skip": ["--cache", "magcache"],
             "cache_retention": ["--cache", "magcache"], "cache_ratios": ["--cache", "magcache"],
             "cache_warmup": ["--cache", "easycache"]}
    for f in dataclasses.fields(RuntimeOptions):
        assert f.name in flags, f"RuntimeOptions.{f.name} has no CLI flag"
        # each flag sets exactly its field
        value = {"bool": True, "bool | None": True, "int": 2, "int | None": 2, "float": 24.0, "float | None": 0.5,
                 "str": None, "str | None": "file.json"}[f.type]
        if f.type == "str":
            value = f.metadata["choices"][-1]
        argv = [f"--{f.name}", str(value), *needs.get(f.name, [])]
        opts = options_from_args(parser.parse_args(argv))
        assert getattr(opts, f.name) == value and set(opts.changed()) <= {f.name, "cache"}
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


# ---- help text and README ------------------------------------------------------------------------------------------
def _readme_flags() -> set[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Flags"):]
    section = section[:section.index("\n## ", 1)]
    flags = set()
    for line in section.splitlines():
        if line.startswith("| `--"):
            flags |= set(re.findall(r"`(--[a-z0-9_]+)", line.split(" | ")[0]))
    return flags


def test_every_flag_documented_in_readme_and_no_stale_one():
    parser_flags = {o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    documented = _readme_flags()
    assert parser_flags - documented == set(), "flags missing from README's tables"
    assert documented - parser_flags == set(), "README documents flags that --help does not have"


def test_help_says_what_the_defaults_are():
    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text
    assert "turns offload_model OFF" in text
    assert "default: true on one GPU, false with several" in text
    assert "81 for t2v-A14B, 17 for t2v-tiny" in text and "40 for t2v-A14B, 8 for t2v-tiny" in text
    assert "{unipc,dpm++,euler}" in text


def _parsed(argv):
    from wan.cli import validate_args

    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def _lora_dir(tmp_path):
    d = tmp_path / "lightning"
    d.mkdir()
    for name in ("high_noise_model.safetensors", "low_noise_model.safetensors"):
        _safetensors(d / name)
    return d


def _safetensors(path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))
    return path


def test_distilled_preset_and_explicit_flags_win(tmp_path):
    d = _lora_dir(tmp_path)
    args = _parsed(["--task", "t2v-tiny", "--distilled", "--lora_dir", str(d)])
    assert (args.sample_solver, args.sample_steps, args.sample_shift, args.sample_guide_scale) == ("euler", 4, 5.0, 1.0)
    args = _parsed(["--task", "t2v-tiny", "--distilled", "--lora_dir", str(d), "--sample_steps", "8",
                    "--sample_solver", "unipc", "--sample_guide_scale", "2"])
    assert (args.sample_solver, args.sample_steps, args.sample_shift, args.sample_guide_scale) == ("unipc", 8, 5.0, 2.0)
    args = _parsed(["--task", "t2v-tiny"])
    assert (args.sample_solver, args.sample_steps, args.sample_shift, args.sample_guide_scale) == ("unipc", 8, 12.0,
                                                                                                  None)


def test_lora_files_explicit_win_and_strength_pairs(tmp_path):
    d = _lora_dir(tmp_path)
    mine = _safetensors(tmp_path / "mine.safetensors")
    args = _parsed(["--task", "t2v-tiny", "--lora_dir", str(d), "--lora_low", str(mine), "--lora_strength", "0.8"])
    assert args.lora_high == d / "high_noise_model.safetensors" and args.lora_low == mine
    assert args.lora_strength == (0.8, 0.8)
    args = _parsed(["--task", "t2v-tiny", "--lora_high", str(mine), "--lora_strength", "1.0", "0.5"])
    assert (args.lora_high, args.lora_low, args.lora_strength) == (mine, None, (1.0, 0.5))
    args = _parsed(["--task", "t2v-tiny"])
    assert (args.lora_high, args.lora_low, args.lora_strength) == (None, None, (1.0, 1.0))


def test_prompt_file_parsing(tmp_path):
    from wan.cli import read_prompt_file

    f = tmp_path / "p.txt"
    f.write_text("\ufeff# header\n\n  first prompt  \r\n\u200b\n\x01\x02\nsecond\u2028part\n   # indented comment\n",
                 encoding="utf-8")
    prompts, bad = read_prompt_file(str(f))
    assert [(p.index, p.lineno, p.text) for p in prompts] == [(0, 3, "first prompt"), (3, 6, "second\u2028part")]
    assert [n for n, _ in bad] == [4, 5] and all("empty" in reason for _, reason in bad)


@pytest.mark.parametrize("text,blank", [("", True), (" \t\n", True), ("\u200b\u200c\u200d\ufeff", True),
                                        ("\x00\x1b[0m", False), ("\x00\x1b", True), ("\u3164\u2800", True),
                                        ("\u0301", True), ("a", False), ("\U0001f431", False), ("猫", False)])
def test_is_blank_prompt(text, blank):
    from wan.cli import is_blank_prompt

    assert is_blank_prompt(text) is blank


# ---- the pipeline API as generate.py calls it (a stand-in pipeline: fast) -----------------------------------------
class FakePipe:
    calls: list = []

    def __init__(self, cfg, ckpt_dir, **kwargs):
        FakePipe.calls.append(("init", kwargs))
        self.last_result = None

    def generate(self, prompt, **kwargs):
        import torch

        FakePipe.calls.append(("generate", prompt, kwargs))
        if prompt == "boom":
            raise RuntimeError("injected failure")
        self.last_result = type("R", (), {"seed": kwargs["seed"], "timings": {"dit_high": 0.1}})()
        w, h = kwargs["size"]
        return torch.zeros(3, kwargs["frame_num"], h, w)


@pytest.fixture
def fake_pipe(monkeypatch):
    import wan.text2video as t2v

    FakePipe.calls = []
    monkeypatch.setattr(t2v, "WanT2V", FakePipe)
    return FakePipe


def test_pipeline_gets_loras_and_no_offload_flag(tmp_path, tiny_ckpt, fake_pipe, capsys):
    d = _lora_dir(tmp_path)
    code = generate.main(["--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt), "--device", "cpu", "--size", "64*64",
                          "--frame_num", "5", "--distilled", "--lora_dir", str(d), "--lora_strength", "1.0", "0.5",
                          "--save_file", str(tmp_path / "v.mp4"), "--prompt", "a cat"])
    assert code == 0, capsys.readouterr().err
    (_, init), (_, prompt, gen) = fake_pipe.calls
    assert init["lora_high"] == d / "high_noise_model.safetensors"
    assert init["lora_low"] == d / "low_noise_model.safetensors"
    assert init["lora_strength"] == (1.0, 0.5) and init["options"] == RuntimeOptions()
    assert "offload_model" not in gen and prompt == "a cat"
    assert (gen["sample_solver"], gen["sampling_steps"], gen["shift"], gen["guide_scale"]) == ("euler", 4, 5.0, 1.0)
    assert gen["size"] == (64, 64) and gen["frame_num"] == 5
    assert (tmp_path / "v.mp4").is_file()


def test_batch_mode_runs_every_good_line_and_counts_failures(tmp_path, tiny_ckpt, fake_pipe, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n\u200b\nboom\n# skip\ntwo\n")
    out = tmp_path / "out"
    out.mkdir()
    code = generate.main(["--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt), "--device", "cpu", "--size", "64*64",
                          "--frame_num", "5", "--prompt_file", str(prompts), "--save_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: 2 of 4 prompts failed (lines 2, 3 of") and "2 videos" in err[-1]
    assert [c[0] for c in fake_pipe.calls] == ["init", "generate", "generate", "generate"]  # loaded once
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and "_0000_one_" in names[0] and "_0003_two_" in names[1]


def test_batch_mode_all_good_exits_zero(tmp_path, tiny_ckpt, fake_pipe, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    code = generate.main(["--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt), "--device", "cpu", "--size", "64*64",
                          "--frame_num", "5", "--prompt_file", str(prompts), "--save_dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert len(list(tmp_path.glob("*.mp4"))) == 2


# ---- signals -------------------------------------------------------------------------------------------------------
def test_main_restores_signal_handlers(capsys, tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert generate.main(["--task", "t2v-tiny", "--sample_shift", "nan"]) == 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_signal_becomes_interrupted_with_its_exit_code():
    from wan.utils.interrupt import Interrupted, handle_signals

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        with handle_signals() as state:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert info.value.exit_code == 143 and info.value.name == "SIGTERM" and state.signum == signal.SIGTERM
    assert isinstance(info.value, KeyboardInterrupt)  # not swallowed by `except Exception`
    assert signal.getsignal(signal.SIGTERM) == before


def test_preflight_knows_the_tiny_marker():
    from wan.preflight import TINY_MARKER
    from wan.testing.tiny import MARKER

    assert TINY_MARKER == MARKER
