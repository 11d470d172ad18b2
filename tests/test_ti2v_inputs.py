"""TI2V-5B's image-mode inputs against the independent re-computation (tests/ti2v_reference.py, from the facts file):
the output geometry over a sweep of image sizes and areas, the resized and cropped first frame, the latent constraint
(frame 0 = z by the mask formula, per-token timesteps with 0 on frame 0) and the factored timesteps' rows."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from ti2v_reference import ref_best_output_size, ref_first_frame, ref_timesteps
from wan.latent_constraint import NO_CONSTRAINT, FirstFrameLatent
from wan.modules.token_timesteps import TokenTimesteps, time_rows
from wan.ti2v_inputs import best_output_size, first_frame, seq_len_for, ti2v_geometry

AREAS = (1280 * 704, 704 * 1280, 128 * 128, 64 * 64, 160 * 96, 832 * 480)


def test_geometry_table_from_the_facts():
    """i2v_ti2v_facts.md §1.3's TI2V column (run on the reference): image w x h -> video w x h at 1280*704."""
    for (w, h), want in (((1280, 720), (1248, 704)), ((832, 1104), (800, 1088)), ((1024, 1024), (960, 928))):
        assert best_output_size(w, h, 32, 32, 1280 * 704) == want
        geo = ti2v_geometry(w, h, 704 * 1280)  # only the area counts
        assert (geo.width, geo.height, geo.lat_w, geo.lat_h) == (*want, want[0] // 16, want[1] // 16)


def test_geometry_sweep_matches_the_reference_formula():
    sides = sorted({1 + 37 * i for i in range(108)} | {16, 32, 64, 128, 480, 704, 720, 832, 1024, 1280, 4000})
    n = 0
    for w, h in itertools.product(sides, sides):
        for area in AREAS:
            try:
                want = ref_best_output_size(w, h, 32, 32, area)
            except ZeroDivisionError:  # the reference fails (a side floors to 0): we refuse in one line
                with pytest.raises(ValueError, match="crop the image"):
                    best_output_size(w, h, 32, 32, area)
                continue
            got = best_output_size(w, h, 32, 32, area)
            assert got == want, (w, h, area)
            assert got[0] % 32 == 0 and got[1] % 32 == 0 and got[0] * got[1] <= area
            n += 1
    assert n > 50_000


def test_extreme_aspect_is_refused_in_one_line():
    with pytest.raises(ValueError, match="crop the image") as err:
        ti2v_geometry(4000, 16, 64 * 64)
    assert "\n" not in str(err.value)


def image(w, h, seed=0):
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (3 + c) + c) * np.cos(yy / (4 + c)) for c in range(3)], -1) * 100 + 128
    return Image.fromarray(np.clip(base + g.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("w,h,area", [(50, 30, 64 * 96), (40, 90, 128 * 128), (301, 217, 160 * 96),
                                      (1280, 720, 1280 * 704), (97, 97, 64 * 64)])
def test_first_frame_matches_the_reference(w, h, area):
    img = image(w, h, seed=w)
    geo = ti2v_geometry(w, h, area)
    got = first_frame(img, geo)
    want = ref_first_frame(img, geo.width, geo.height)
    assert got.shape == (3, 1, geo.height, geo.width) and got.dtype == torch.float32
    assert torch.equal(got, want) and got.min() >= -1 and got.max() <= 1 and got.std() > 0.1


def test_seq_len():
    assert seq_len_for(121, 44, 80) == 27280  # 1280x704, 121 frames (facts §2)
    assert seq_len_for(121, 44, 80, sp_size=8) == 27280 and seq_len_for(5, 2, 6, sp_size=4) == 8


def test_first_frame_constraint_is_the_mask_formula_and_the_reference_timesteps():
    g = torch.Generator().manual_seed(0)
    shape, seq_len = (48, 3, 4, 6), 20  # 18 real tokens, 2 padding (e.g. Ulysses)
    z = torch.randn(48, 1, 4, 6, generator=g)
    c = FirstFrameLatent(z, shape, seq_len)
    x = torch.randn(*shape, generator=g)
    mask = torch.ones(shape)
    mask[:, 0] = 0
    got = c.apply(x)
    assert torch.equal(got, (1.0 - mask) * z + mask * x)
    assert torch.equal(got[:, :1], z) and torch.equal(got[:, 1:], x[:, 1:])
    for t in (torch.tensor([999]), torch.tensor([937.5]), torch.tensor([0])):
        tt = c.timesteps(t)
        want = ref_timesteps(t, 3, 4, 6, seq_len, image=True)
        assert isinstance(tt, TokenTimesteps) and tt.dense().dtype == torch.float32
        assert torch.equal(tt.dense(), want) and torch.equal(tt.expand(2).dense(), want.expand(2, -1))
    assert (c.index[:6] == 1).all() and (c.index[6:] == 0).all()  # frame 0 = the first (4/2)*(6/2) tokens
    assert NO_CONSTRAINT.apply(x) is x and torch.equal(NO_CONSTRAINT.timesteps(t), t)
    with pytest.raises(ValueError, match="first frame"):
        FirstFrameLatent(torch.zeros(48, 1, 4, 5), shape, seq_len)


def test_text_mode_timesteps_are_t_itself():
    """§2 t2v: all-ones mask * t, padded with t: every token has t, so [1] is the same input."""
    t = torch.tensor([971])
    dense = ref_timesteps(t, 3, 4, 6, 20, image=False)
    assert torch.equal(dense, t.float().expand(1, 20))


def test_time_rows_forms():
    t, idx = torch.tensor([900.0]), torch.tensor([1, 1, 0, 0, 0])
    tt = TokenTimesteps(torch.tensor([[900.0, 0.0]]), idx)
    rows, index = time_rows(tt, 1, 5, per_sample=True)
    assert torch.equal(rows, tt.values) and index is idx
    rows, index = time_rows(tt, 1, 5, per_sample=False)
    assert index is None and torch.equal(rows, torch.tensor([[0.0, 0.0, 900.0, 900.0, 900.0]]))
    assert time_rows(t, 2, 5, per_sample=True)[0].shape == (2, 1)
    assert time_rows(t, 2, 5, per_sample=False)[0].shape == (2, 5)
    with pytest.raises(ValueError, match="cover 5 tokens"):
        time_rows(tt, 1, 6, per_sample=True)
