"""Output naming and safe mp4 writing (wan/utils/video.py)."""
import os
import subprocess
import sys
from datetime import datetime

import imageio.v2 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import torch

from wan.utils import video as V
from wan.utils.video import OutputPathError, check_output_path, default_save_name, save_video


def _video(t=9, h=32, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, t, h, w, generator=g) * 2 - 1  # [3,T,H,W] in [-1,1]


def _read(path):
    r = iio.get_reader(str(path), format="FFMPEG")
    try:
        return np.stack([f for f in r.iter_data()])  # list(r) trips on len(r) == inf
    finally:
        r.close()


def test_roundtrip(tmp_path):
    vid = _video()
    path = tmp_path / "out.mp4"
    assert save_video(vid, path) == path
    assert path.is_file()
    assert imageio_ffmpeg.count_frames_and_secs(str(path)) == (9, 0.56)  # 9 frames at 16 fps
    frames = _read(path)
    assert frames.shape == (9, 32, 48, 3)
    written = V._to_frames(vid).astype(np.float64).mean()
    assert abs(frames.astype(np.float64).mean() - written) < 3
    assert os.listdir(tmp_path) == ["out.mp4"]  # temp file gone


def test_frames_truncate_like_reference():
    v = torch.tensor([0.999, -1.5, 2.0, 0.0, -1.0]).view(1, 1, 1, 5).expand(3, 1, 1, 5)
    f = V._to_frames(v)
    assert f.shape == (1, 1, 5, 3) and f.dtype == np.uint8
    assert f[0, 0, :, 0].tolist() == [254, 0, 255, 127, 0]  # 254.87 -> 254, 127.5 -> 127


def test_no_overwrite_then_overwrite(tmp_path):
    path = tmp_path / "out.mp4"
    save_video(_video(), path)
    before = path.read_bytes()
    with pytest.raises(OutputPathError, match="--overwrite"):
        save_video(_video(seed=1), path)
    assert path.read_bytes() == before
    save_video(_video(t=5, seed=1), path, overwrite=True)
    assert imageio_ffmpeg.count_frames_and_secs(str(path))[0] == 5
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_target_appears_during_write_is_not_clobbered(tmp_path, monkeypatch):
    # Another process creates the target after the up-front check: os.link must refuse.
    path = tmp_path / "out.mp4"
    real = V._get_writer

    def racing_writer(tmp, fps, mbs):
        w = real(tmp, fps, mbs)
        close = w.close

        def close_and_race():
            close()
            path.write_bytes(b"other")
        w.close = close_and_race
        return w

    monkeypatch.setattr(V, "_get_writer", racing_writer)
    with pytest.raises(V.OutputRaceError, match="appeared while the video was being written"):
        save_video(_video(), path)
    assert path.read_bytes() == b"other"
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_bad_paths(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for bad in (f / "out.mp4", tmp_path / "missing" / "out.mp4", tmp_path / "out.avi"):
        with pytest.raises(OutputPathError):
            check_output_path(bad, overwrite=True)
        with pytest.raises(OutputPathError):
            save_video(_video(t=1), bad, overwrite=True)
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(OutputPathError):
        check_output_path(tmp_path / "d.mp4", overwrite=True)
    assert check_output_path(tmp_path / "new.mp4", overwrite=False) == tmp_path / "new.mp4"
    assert sorted(os.listdir(tmp_path)) == ["d.mp4", "file"]


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    real = V._get_writer
    seen = {}

    def failing_writer(tmp, fps, mbs):
        w = real(tmp, fps, mbs)
        append, close, n = w.append_data, w.close, [0]

        def append_then_fail(frame):
            if n[0] == 3:
                raise RuntimeError("boom")
            n[0] += 1
            append(frame)

        def close_and_look():
            close()  # ffmpeg finalizes a partial temp file here
            seen["tmp_existed"] = os.path.exists(tmp)
        w.append_data, w.close = append_then_fail, close_and_look
        return w

    monkeypatch.setattr(V, "_get_writer", failing_writer)
    with pytest.raises(RuntimeError, match="boom"):
        save_video(_video(), tmp_path / "out.mp4")
    assert seen["tmp_existed"]
    assert os.listdir(tmp_path) == []


def test_missing_imageio_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import -> ImportError
    with pytest.raises(ImportError, match="pip install imageio-ffmpeg"):
        save_video(_video(t=1), tmp_path / "out.mp4")
    assert os.listdir(tmp_path) == []


def test_import_does_not_need_imageio_ffmpeg():
    code = "import sys, wan.utils.video; assert 'imageio_ffmpeg' not in sys.modules"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


@pytest.mark.skipif(sys.platform == "win32", reason="'*' becomes 'x' on Windows")
def test_default_save_name():
    prompt = "Two cats / boxing gear and bright gloves fight intensely on a spotlighted stage."
    name = default_save_name("t2v-A14B", "1280*720", 1, prompt, now=datetime(2025, 7, 28, 9, 5, 3))
    assert name == "t2v-A14B_1280*720_1_Two_cats___boxing_gear_and_bright_gloves_fight_int_20250728_090503.mp4"


def test_no_hardlink_filesystem_fallback(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(V.os, "link", no_link)
    path = tmp_path / "out.mp4"
    save_video(_video(), path)
    assert imageio_ffmpeg.count_frames_and_secs(str(path)) == (9, 0.56)
    before = path.read_bytes()
    with pytest.raises(OutputPathError, match="--overwrite"):
        V._publish_no_clobber(tmp_path / "x.mp4", path)  # target exists -> refused
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["out.mp4"]


def test_default_save_name_is_safe_and_bounded():
    now = datetime(2025, 7, 28, 9, 5, 3)
    name = default_save_name("t2v-A14B", "1280*720", 1, "\U0001f431" * 300, now=now)
    assert len(os.fsencode(name)) < 160  # + the 18 bytes of the temporary name: far below 255
    name = default_save_name("t2v-A14B", "1280*720", 1, "a/b\\c\td\ne\x00f\x1bg\u200bh\u202ei", now=now)
    assert "_a_b_c_d_e" in name and "f" in name and not any(ch in name for ch in "/\\\t\n\x00\x1b\u200b\u202e")
    assert default_save_name("t2v-tiny", "64*64", 1, "two cats", now=now, index=7).startswith(
        "t2v-tiny_64*64_0007_two_cats_20250728_090503")
    assert V.safe_name_part("é" * 80) == "é" * 50  # the reference's 50 characters, 100 bytes
    assert len(V.safe_name_part("\U0001f431" * 80).encode()) == 100


def test_temp_name_has_a_fixed_length(tmp_path):
    names = {V.temp_name(tmp_path / "out.mp4").name for _ in range(20)}
    assert len(names) == 20 and {len(n) for n in names} == {len(".out.mp4.") + 8 + len(".tmp.mp4")}
    assert all(n.startswith(".out.mp4.") and n.endswith(".tmp.mp4") for n in names)
    probe = V.temp_name(tmp_path / "out.mp4", "prb").name  # the probe: same length, never taken for the video
    assert len(probe) == len(names.pop()) and probe.endswith(".prb.mp4")


def test_symlinks_resolved_and_dangling_counts_as_existing(tmp_path):
    real = tmp_path / "real.mp4"
    real.write_bytes(b"r")
    link = tmp_path / "link.mp4"
    link.symlink_to(real)
    dangling = tmp_path / "dangling.mp4"
    dangling.symlink_to(tmp_path / "gone.mp4")
    for p in (link, dangling):
        with pytest.raises(OutputPathError, match="symlink"):
            check_output_path(p)
    assert check_output_path(link, overwrite=True) == real  # writes go to the real file, next to it
    assert check_output_path(dangling, overwrite=True) == tmp_path / "gone.mp4"
    save_video(_video(t=1), link, overwrite=True)
    assert link.is_symlink() and real.read_bytes() != b"r"
    d = tmp_path / "sub"
    d.mkdir()
    (tmp_path / "dirlink").symlink_to(d)
    assert check_output_path(tmp_path / "dirlink" / "v.mp4") == d / "v.mp4"
    assert sorted(os.listdir(tmp_path)) == ["dangling.mp4", "dirlink", "link.mp4", "real.mp4", "sub"]


def test_probe_catches_names_too_long_for_the_filesystem(tmp_path):
    ok = tmp_path / ("a" * 200 + ".mp4")
    assert check_output_path(ok) == ok
    too_long = tmp_path / ("a" * 248 + ".mp4")  # 252 bytes: fine itself, but its temporary name is 270
    with pytest.raises(OutputPathError, match="too long"):
        check_output_path(too_long)
    with pytest.raises(OutputPathError, match="not a usable path"):
        check_output_path(str(tmp_path / "a\x00b.mp4"))
    with pytest.raises(OutputPathError, match="empty"):
        check_output_path("")
    assert os.listdir(tmp_path) == []


def test_probe_catches_os_refusals(tmp_path, monkeypatch):
    import errno

    real_open = V.os.open

    def refuse(path, flags, *a):
        if str(path).endswith(".prb.mp4"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *a)

    monkeypatch.setattr(V.os, "open", refuse)
    with pytest.raises(OutputPathError, match="read-only"):
        check_output_path(tmp_path / "v.mp4")


def test_interrupt_during_write_leaves_nothing(tmp_path, monkeypatch):
    from wan.utils.interrupt import Interrupted

    real = V._get_writer
    seen = {}

    def interrupted_writer(tmp, fps, mbs):
        w = real(tmp, fps, mbs)
        append, n = w.append_data, [0]

        def append_then_signal(frame):
            append(frame)
            n[0] += 1
            if n[0] == 2:
                seen["live"] = set(V._LIVE_TEMP_FILES)
                raise Interrupted(2)
        w.append_data = append_then_signal
        return w

    monkeypatch.setattr(V, "_get_writer", interrupted_writer)
    with pytest.raises(Interrupted):
        save_video(_video(), tmp_path / "out.mp4")
    assert len(seen["live"]) == 1 and not V._LIVE_TEMP_FILES
    assert os.listdir(tmp_path) == []


def test_remove_temp_files(tmp_path):
    tmp = tmp_path / ".x.mp4.00000000.tmp.mp4"
    tmp.write_bytes(b"partial")
    V._LIVE_TEMP_FILES.add(tmp)
    V.remove_temp_files()
    assert not tmp.exists() and not V._LIVE_TEMP_FILES
