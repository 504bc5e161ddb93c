"""The sliding-window unit against a NumPy model of the window stream order."""

import json

import numpy as np
import pytest
from amaranth import signed, unsigned
from amaranth.back import verilog

from hwgen.errors import HwgenError
from hwgen.hw.streams import run_stream
from hwgen.hw.window import SlidingWindow
from hwgen.synth import synthesize


def window_model(x, kernel, stride, padding, lanes, repeats, schedule=None):
    """The window beats of one (C, H, W) image: per output pixel, ``repeats`` times, (kh, kw,
    group) with zero padding (repetition r: only its beats ``schedule[r]``); ``last`` on each
    repetition's final beat."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw)))
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    window = [(a, b, g) for a in range(kh) for b in range(kw) for g in range(c // lanes)]
    beats = []
    for oy in range(oh):
        for ox in range(ow):
            for r in range(repeats):
                taken = range(len(window)) if schedule is None else schedule[r]
                for n, (a, b, g) in enumerate((window[i] for i in taken), 1):
                    lanes_ = xp[g * lanes : (g + 1) * lanes, oy * sh + a, ox * sw + b]
                    beats.append({"data": lanes_.tolist(), "last": int(n == len(taken))})
    return beats


def run_window(
    c,
    h,
    w,
    kernel,
    stride,
    padding,
    lanes,
    repeats,
    *,
    images=2,
    bits=6,
    is_signed=True,
    stall_in=0.0,
    stall_out=0.0,
    seed=0,
    times=None,
    schedule=None,
):
    """Stream ``images`` random images through a SlidingWindow; assert it matches the model."""
    rng = np.random.default_rng(seed)
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if is_signed else (0, (1 << bits) - 1)
    xs = rng.integers(lo, hi, size=(images, c, h, w), endpoint=True)
    dut = SlidingWindow(
        channels=c,
        height=h,
        width=w,
        kernel=kernel,
        stride=stride,
        padding=padding,
        lanes=lanes,
        repeats=repeats,
        shape=signed(bits) if is_signed else unsigned(bits),
        schedule=schedule,
    )
    expected = [
        b for x in xs for b in window_model(x, kernel, stride, padding, lanes, repeats, schedule)
    ]
    beats_in = [b.tolist() for x in xs for b in x.transpose(1, 2, 0).reshape(-1, lanes)]
    got, cycles = run_stream(
        dut, beats_in, len(expected), stall_in, stall_out, seed, times=times,
        never=[dut.rw_collision],
    )  # fmt: skip
    for n, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"beat {n} of {len(expected)}: got {g}, expected {e}"
    return cycles


CASES = {
    # c, h, w, kernel, stride, padding, lanes, repeats
    "3x3_pad1": (2, 4, 5, (3, 3), (1, 1), (1, 1), 1, 1),
    "nonsquare_stride": (4, 5, 4, (2, 3), (2, 1), (1, 2), 2, 2),
    "dense_1x1_map": (6, 1, 1, (1, 1), (1, 1), (0, 0), 3, 3),
    "pool_2x2_s2_odd": (2, 5, 5, (2, 2), (2, 2), (0, 0), 1, 1),
    "1x1_stride_skips_rows": (2, 4, 6, (1, 1), (3, 2), (0, 0), 2, 1),
    "max_padding": (1, 4, 4, (3, 3), (1, 1), (2, 2), 1, 1),
    "1x1_pad1": (2, 3, 4, (1, 1), (1, 1), (1, 1), 1, 2),
    "3x3_pad3": (2, 4, 3, (3, 3), (1, 1), (3, 3), 2, 1),
    "pad_gt_kernel_stride": (1, 5, 5, (1, 2), (2, 3), (3, 4), 1, 1),
    "kernel_is_map": (4, 3, 2, (3, 2), (1, 1), (0, 0), 4, 2),
    "tall_kernel_stride_gt_kernel": (3, 7, 3, (2, 1), (3, 2), (1, 0), 3, 1),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("stalls", [(0.0, 0.0), (0.3, 0.3)], ids=["free", "stalls"])
def test_window_matches_model(case, stalls):
    run_window(*case, images=2, stall_in=stalls[0], stall_out=stalls[1], seed=sum(case[:3]))


def test_three_images_unsigned_with_heavy_backpressure():
    run_window(
        4,
        4,
        4,
        (3, 3),
        (1, 1),
        (1, 1),
        2,
        2,
        images=3,
        bits=5,
        is_signed=False,
        stall_in=0.1,
        stall_out=0.7,
        seed=5,
    )


def test_slow_input_bounds_output():
    run_window(2, 6, 6, (3, 3), (2, 2), (1, 1), 2, 1, images=2, stall_in=0.8, seed=6)


def _random_case(rng):
    kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    ph, pw = int(rng.integers(0, kh + 2)), int(rng.integers(0, kw + 2))
    h = int(rng.integers(max(1, kh - 2 * ph), 7))
    w = int(rng.integers(max(1, kw - 2 * pw), 7))
    lanes = int(rng.choice([1, 2, 3]))
    c = lanes * int(rng.integers(1, 4))
    stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    return c, h, w, (kh, kw), stride, (ph, pw), lanes, int(rng.integers(1, 4))


@pytest.mark.parametrize("seed", range(6))
def test_random_geometries(seed):
    rng = np.random.default_rng(100 + seed)
    run_window(*_random_case(rng), images=2, stall_in=0.3, stall_out=0.3, seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(300))
def test_random_geometries_campaign(seed):
    rng = np.random.default_rng(1000 + seed)
    stalls = rng.choice([0.0, 0.2, 0.6], size=2)
    run_window(
        *_random_case(rng),
        images=int(rng.integers(1, 4)),
        bits=int(rng.integers(2, 9)),
        is_signed=bool(rng.integers(2)),
        stall_in=float(stalls[0]),
        stall_out=float(stalls[1]),
        seed=seed,
    )


def _random_schedule(rng, beats, repeats):
    """Per repetition a random subset of the window's beats (at least one), ascending."""
    return tuple(
        tuple(sorted(int(v) for v in rng.choice(beats, int(rng.integers(1, beats + 1)), False)))
        for _ in range(repeats)
    )


SCHEDULES = {
    # case, schedule: a skipped tail, one beat per repetition, a skipped head and middle
    "3x3_first_beats": ("3x3_pad1", ((0, 1, 2, 3, 4),)),
    "single_beats": ("nonsquare_stride", ((11,), (0,))),
    "dense_1x1_map": ("dense_1x1_map", ((1,), (0, 1), (1,))),
    "3x3_pad3_middle": ("3x3_pad3", ((4,),)),
    "kernel_is_map": ("kernel_is_map", ((1, 3, 5), (0, 2, 4))),
}


@pytest.mark.parametrize(("case", "schedule"), SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("stalls", [(0.0, 0.0), (0.3, 0.3)], ids=["free", "stalls"])
def test_scheduled_window_emits_only_its_beats(case, schedule, stalls):
    c = CASES[case]
    run_window(*c, schedule=schedule, stall_in=stalls[0], stall_out=stalls[1], seed=len(case))


@pytest.mark.parametrize("seed", range(4))
def test_random_schedules(seed):
    rng = np.random.default_rng(200 + seed)
    c, h, w, kernel, stride, padding, lanes, repeats = _random_case(rng)
    schedule = _random_schedule(rng, kernel[0] * kernel[1] * c // lanes, repeats)
    run_window(
        c, h, w, kernel, stride, padding, lanes, repeats,
        schedule=schedule, stall_in=0.3, stall_out=0.3, seed=seed,
    )  # fmt: skip


def test_scheduled_window_keeps_one_beat_per_cycle():
    """Once full, a scheduled window emits a beat every cycle, as the dense one does."""
    times = []
    schedule = ((0, 5, 17, 35), (8,), (3, 4))
    run_window(16, 16, 16, (3, 3), (1, 1), (1, 1), 4, 3, images=1, times=times, schedule=schedule)
    assert times[-1] - times[0] + 1 == len(times) == 16 * 16 * 7


def test_a_full_schedule_builds_the_dense_unit():
    full = tuple(tuple(range(18)) for _ in range(2))
    dut = SlidingWindow(**{**WINDOW, "repeats": 2, "schedule": full})
    assert dut.schedule is None


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (((0,),), "each of the 2 repetitions"),
        (((0,), ()), r"at least one, not \(\(0,\), \(\)\)"),
        (((0, 0), (1,)), "distinct beats in \\[0, 18\\)"),
        (((18,), (1,)), "distinct beats in \\[0, 18\\)"),
        (5, "not 5"),
    ],
)
def test_rejects_bad_schedules(schedule, message):
    with pytest.raises(HwgenError, match="^sliding window: schedule must give .*" + message):
        SlidingWindow(**{**WINDOW, "repeats": 2, "schedule": schedule})


@pytest.mark.parametrize("repeats", [4, 1])
def test_throughput_one_beat_per_cycle_once_full(repeats):
    """16x16, 3x3 pad 1, 16 channels, lanes 4: after the first window, one beat every cycle
    (this is the MAC's ideal: OH*OW*K*K*Cin*Cout/(PE*SIMD) beats with PE = 16/repeats)."""
    times = []
    cycles = run_window(16, 16, 16, (3, 3), (1, 1), (1, 1), 4, repeats, images=1, times=times)
    n = 16 * 16 * 9 * 4 * repeats
    fill = times[0]  # the first input beat is taken in cycle 1
    assert fill == 2 * 16 * 4 + 4  # two input rows (K - P), the input slice, read + 2 registers
    assert times[-1] - times[0] + 1 == n  # no bubble at all once full
    assert cycles == fill + n - 1


def test_back_to_back_images_have_no_bubble():
    times = []
    run_window(2, 4, 4, (3, 3), (1, 1), (1, 1), 1, 1, images=3, times=times)
    assert times[-1] - times[0] + 1 == len(times)


WINDOW = dict(
    channels=4, height=4, width=4, kernel=(3, 3), stride=(1, 1), padding=(1, 1), lanes=2,
    shape=signed(8),
)  # fmt: skip


def test_buffer_is_rows_not_images():
    dut = SlidingWindow(
        channels=16,
        height=64,
        width=64,
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        lanes=4,
        shape=signed(8),
    )
    assert dut.depth == (3 + 1) * 64 * 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lanes=3), "lanes 3 must divide channels 4"),
        (dict(kernel=(3, 7)), r"kernel 7 is larger than the padded input 6 \(columns\)"),
        (dict(stride=(0, 1)), r"stride must be a pair of integers >= 1, not \(0, 1\)"),
        (dict(repeats=0), "repeats must be a positive integer, not 0"),
    ],
)
def test_rejects_bad_parameters(kwargs, message):
    with pytest.raises(HwgenError, match=message):
        SlidingWindow(**{**WINDOW, "repeats": 1, **kwargs})


def test_input_ready_is_a_flip_flop(tmp_path):
    """After synthesis i.ready comes straight from a flip-flop: the stream before the
    window (perhaps across the chip) sees no logic behind it."""
    src = tmp_path / "top.v"
    src.write_text(verilog.convert(SlidingWindow(**WINDOW), name="top", emit_src=False))
    synthesize([src], "top", place_route=False, workdir=tmp_path / "work")
    module = json.loads((tmp_path / "work" / "netlist.json").read_text())["modules"]["top"]
    ready = module["ports"]["i__ready"]["bits"]
    cells = module["cells"].values()
    drivers = {c["type"] for c in cells for b in c["connections"].get("Q", []) if b in ready}
    assert drivers == {"TRELLIS_FF"}
