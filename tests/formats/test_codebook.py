import torch

from lowbit.formats import get_format

# bitsandbytes' published NF4 table (functional.py), copied from its source as the reference.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def test_nf4_levels_match_published_table():
    fmt = get_format("nf4")
    assert fmt.decode(torch.arange(16)).tolist() == torch.tensor(PUBLISHED_NF4).tolist()


def test_nf4_levels_are_normal_quantiles():
    """Rebuild NF4 from its definition: quantiles of N(0,1) (QLoRA, offset 0.9677083), scaled to [-1, 1]."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.sort(torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)])).values
    levels = levels / levels.max()
    assert torch.allclose(get_format("nf4").values().double(), levels, atol=2e-7)


def test_nearest_level_with_midpoint_going_down():
    fmt = get_format("nf4")
    lv = torch.tensor(PUBLISHED_NF4)
    x = torch.linspace(-1.2, 1.2, 10001)
    nearest = (x[:, None] - lv[None, :]).abs().argmin(1)
    assert torch.equal(fmt.encode(x).long(), nearest)
    mid = (lv[8] + lv[9]) / 2
    assert fmt.encode(mid.reshape(1)).item() == 8


def test_bnb_fp4_levels_and_ternary():
    fp4 = get_format("bnb_fp4")
    assert fp4.decode(torch.tensor([3, 11])).tolist() == [1.0, -1.0]
    assert fp4.encode(torch.tensor([0.0])).item() == 0
    t = get_format("ternary")
    assert t.round(torch.tensor([-0.7, -0.2, 0.4, 0.6, 3.0])).tolist() == [-1.0, 0.0, 0.0, 1.0, 1.0]
