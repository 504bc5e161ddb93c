"""Weight codes, ROM contents and order, and the ROM component (inline and file styles)."""

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.sim import Simulator

from hwgen.emit import BuildOptions, build
from hwgen.errors import HwgenError
from hwgen.hw.rom import (
    WeightROM,
    bank_files,
    bram_blocks,
    code_bits,
    decode_weights,
    encode_weights,
    hex_lines,
    rom_banks,
    rom_file,
    rom_images,
    rom_latency,
    rom_storage,
    rom_width,
    rom_words,
)
from hwgen.ir import ActFormat, Codebook, Conv2d, Fixed, Linear, Network, Planes, Pow2


def grid(fmt) -> np.ndarray:
    vals = np.arange(fmt.lo, fmt.hi + 1)
    return vals[fmt.on_grid(vals)]


@pytest.mark.parametrize(
    "fmt",
    [
        Fixed(2, 0),
        Fixed(8, 3),
        Fixed(16, 0),
        Pow2(1, 0),
        Pow2(2, 0),
        Pow2(3, 0),
        Pow2(4, 2),
        Pow2(5, 0),
        Codebook((-64, -33, 0, 3, 96), 5),
        Codebook((-1, 1), 0),
    ],
    ids=str,
)
def test_codes_round_trip(fmt):
    w = grid(fmt)
    codes = encode_weights(fmt, w)
    assert codes.min() >= 0 and codes.max() < 1 << code_bits(fmt)
    assert len(set(codes.tolist())) == len(w)
    assert np.array_equal(decode_weights(fmt, codes), w)


def test_code_layouts():
    # Pow2 4 bits: [zero | sign | shift(2)]
    assert encode_weights(Pow2(4, 0), np.array([1, 8, -4, 0])).tolist() == [
        0b0000,
        0b0011,
        0b0110,
        0b1000,
    ]
    assert encode_weights(Pow2(2, 0), np.array([1, -1, 0])).tolist() == [0b00, 0b01, 0b10]
    assert encode_weights(Pow2(1, 0), np.array([1, -1])).tolist() == [0, 1]
    assert encode_weights(Fixed(4, 0), np.array([-8, -1, 7])).tolist() == [0x8, 0xF, 0x7]
    assert code_bits(Pow2(7, 0)) == 7 and code_bits(Pow2(2, 0)) == 2
    # Codebook: the index, ceil(log2(entries)) bits
    cb = Codebook((-64, -33, 0, 3, 96), 5)
    assert encode_weights(cb, np.array([96, -64, 0, 3])).tolist() == [4, 0, 2, 3]
    assert (code_bits(cb), code_bits(Codebook((0, 1), 0))) == (3, 1)


def test_plane_codes_are_sign_bits_lowest_first_per_channel():
    fmt = Planes(((3, 1), (2, 2), (4, -4)), 0)
    w = np.array([[4, 2, -2, -4], [0, 4, -4, 0], [0, 8, -8, 0]])
    codes = encode_weights(fmt, w)
    # bit i = plane i's sign (1 = -1); 0 = 2 - 2 = -2 + 2 and 0 = 4 - 4 = -4 + 4: the lowest
    assert codes.tolist() == [[0, 2, 1, 3], [1, 0, 3, 1], [0, 2, 1, 0]]
    assert np.array_equal(decode_weights(fmt, codes), w)
    assert code_bits(fmt) == 2 and code_bits(Planes(((1,) * 4,), 0)) == 4
    rng = np.random.default_rng(1)
    big = Planes(tuple(map(tuple, rng.integers(-99, 99, (5, 4)).tolist())), 0)
    w = np.take_along_axis(big.values(), rng.integers(0, 16, (5, 30)), axis=1).reshape(5, 3, 10)
    assert np.array_equal(decode_weights(big, encode_weights(big, w)), w)
    with pytest.raises(HwgenError) as e:
        encode_weights(fmt, np.array([[4], [1], [0]]))
    assert str(e.value) == "weight 1 of channel 1 is no signed sum of its plane scales [2, 2]"


def test_rom_words_refuse_a_codebook_entry_beyond_two_signed_digits():
    cb = Codebook((-7, 0, 3, 21), 0)  # 21 = 16 + 4 + 1; -7 = -8 + 1 and 3 = 4 - 1 are fine
    w = np.array(cb.entries)[np.arange(8).reshape(2, 4) % 4]
    layer = Linear("fc", 4, 2, cb, ActFormat(8, 0), w, np.zeros(2, int))
    with pytest.raises(HwgenError, match=r"^layer fc: codebook entry 21 is not 0, ±2\^k or ±2\^j"):
        rom_words(layer, 1, 1)
    ok = Codebook((-7, 0, 3, 20), 0)
    words = rom_words(
        Linear("fc", 4, 2, ok, ActFormat(8, 0), w * (w != 21) + 20 * (w == 21), np.zeros(2, int)),
        1,
        4,
    )
    assert [int(v) for v in words] == [0b11100100, 0b11100100]


def _conv(rng, fmt, cout, cin, k):
    w = rng.integers(fmt.lo, fmt.hi, size=(cout, cin, *k), endpoint=True)
    w[w == 0] = 1  # no zero block, no word skipped (skipping: tests/test_hw_sparse.py)
    return Conv2d("conv1", cin, cout, k, fmt, ActFormat(8, 0), w, np.zeros(cout, int))


@pytest.mark.parametrize(("pe", "simd"), [(1, 1), (2, 3), (4, 6), (4, 3)])
def test_rom_order(pe, simd):
    """Word (nf, kh, kw, g), PE k's slice, lane l: weight[nf*PE + k, g*SIMD + l, kh, kw]."""
    fmt = Fixed(5, 0)
    layer = _conv(np.random.default_rng(pe), fmt, 4, 6, (2, 3))
    words = rom_words(layer, pe, simd)
    assert rom_width(layer, pe, simd) == pe * simd * 5
    assert len(words) == 2 * 3 * 6 // simd * 4 // pe
    assert words.dtype == (object if pe * simd * 5 > 64 else np.uint64)
    addr = 0
    for nf in range(4 // pe):
        for kh in range(2):
            for kw in range(3):
                for g in range(6 // simd):
                    word = int(words[addr])
                    for k in range(pe):
                        for lane in range(simd):
                            code = (word >> ((k * simd + lane) * 5)) & 31
                            w = layer.weight[nf * pe + k, g * simd + lane, kh, kw]
                            assert decode_weights(fmt, np.array([code]))[0] == w
                    addr += 1
    assert word >> (pe * simd * 5) == 0


def test_wide_words_are_python_ints():
    fmt = Fixed(16, 0)
    w = np.full((1, 8), -1)
    layer = Linear("fc", 8, 1, fmt, ActFormat(8, 0), w, np.zeros(1, int))
    words = rom_words(layer, 1, 8)
    assert words.dtype == object and int(words[0]) == (1 << 128) - 1
    assert hex_lines(words, 128) == "f" * 32 + "\n"


def test_hex_lines_and_file_names():
    assert hex_lines(np.array([1, 0x2AB], dtype=np.uint64), 10) == "001\n2ab\n"
    assert rom_file("conv1") == "rom/conv1.hex"


@pytest.mark.parametrize(
    ("width", "depth", "blocks"),
    [
        (160, 72, 5),  # 36x512: 5 wide
        (40, 1152, 5),  # 9x2048: 5 wide, one deep (36x512 would take 2x3)
        (160, 1152, 15),  # 36x512: 5 x 3 (18x1024: 9 x 2, 9x2048: 18)
        (36, 512, 1),
        (37, 512, 2),
        (18, 1024, 1),
        (1, 16384, 1),
        (1, 16385, 2),
        (8, 4096, 2),  # 4x4096: 2 wide; 9x2048: 2 deep
        (64, 256, 2),
        (0, 10, 0),
    ],
)
def test_bram_blocks_ecp5(width, depth, blocks):
    assert bram_blocks(width, depth) == blocks


def test_bram_blocks_ice40_and_storage():
    assert bram_blocks(16, 256, "ice40") == 1 and bram_blocks(20, 300, "ice40") == 3
    assert rom_storage(160, 128) == "logic" and rom_storage(160, 129) == "block"


def test_inline_rom_reads_at_its_latency():
    init = [(i * 37) % 251 for i in range(13)]
    dut = WeightROM(width=8, depth=13, init=init)
    assert dut.latency == 2  # in logic: the address copies, then the read register
    addrs = [*range(13), 5, 5, 0]
    assert read_rom(dut, addrs) == [init[a] for a in addrs]


@pytest.mark.parametrize(
    ("width", "depth", "storage", "banks"),
    [
        (160, 1100, "block", [512, 512, 76]),  # 36x512, 5 wide
        (40, 1152, "block", [1152]),  # 9x2048: one row of 5 blocks
        (160, 512, "block", [512]),
        (160, 1100, "logic", [32] * 34 + [12]),  # LUT5 banks
        (160, 72, "logic", [32, 32, 8]),
        (8, 13, "logic", [13]),
        (16, 3000, "block", [1024, 1024, 952]),  # 18x1024
    ],
)
def test_rom_banks_cost_no_block(width, depth, storage, banks):
    assert rom_banks(width, depth, storage) == banks
    if storage == "block":
        assert sum(bram_blocks(width, d) for d in banks) == bram_blocks(width, depth)


def read_rom(dut: WeightROM, addrs: list[int]) -> list[int]:
    """The ROM's data ``dut.latency`` cycles after each address (one address per cycle)."""
    got = []

    async def bench(ctx):
        for k in range(len(addrs) + dut.latency):
            if k < len(addrs):
                ctx.set(dut.addr, addrs[k])
            await ctx.tick()
            if k >= dut.latency - 1 and len(got) < len(addrs):
                got.append(ctx.get(dut.data))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return got


@pytest.mark.parametrize(
    ("depth", "storage", "edges", "latency"),
    [(1100, "block", [511, 512, 1023, 1024], 3), (72, "logic", [31, 32, 63, 64], 2)],
)
def test_banked_rom_reads_every_bank(depth, storage, edges, latency):
    rng = np.random.default_rng(3)
    init = [int(v) for v in rng.integers(0, 1 << 40, depth)]
    wide = [v | (v << 40) | (v << 80) | (v << 120) for v in init]  # 160 bits
    dut = WeightROM(width=160, depth=depth, init=wide, storage=storage)
    assert dut.latency == rom_latency(storage) == latency
    addrs = [0, *edges, depth - 1, *rng.integers(0, depth, 40).tolist(), 7, depth - 5, 40]
    assert read_rom(dut, addrs) == [wide[a] for a in addrs]


def test_file_rom_has_one_hex_file_per_bank():
    words = np.arange(1100, dtype=object) * (1 << 100)
    images = rom_images("c", words, 160)
    assert list(images) == ["rom/c.0.hex", "rom/c.1.hex", "rom/c.2.hex"]
    assert [len(t.splitlines()) for t in images.values()] == [512, 512, 76]
    assert images["rom/c.1.hex"].splitlines()[0] == hex_lines(words[512:513], 160).strip()
    assert list(rom_images("d", words[:32], 160)) == ["rom/d.hex"]
    assert list(rom_images("d", words[:100], 160)) == [f"rom/d.{k}.hex" for k in range(4)]
    assert bank_files("rom/c.hex", 1) == ["rom/c.hex"]
    dut = WeightROM(width=160, depth=1100, init=words, style="file", init_file="rom/c.hex")
    text = verilog.convert(dut, name="top", emit_src=False)
    for k, depth in enumerate([512, 512, 76]):
        assert f'.INIT_FILE("rom/c.{k}.hex")' in text and f".DEPTH(32'd{depth})" in text


def test_file_rom_instantiates_hwgen_rom_with_a_relative_path():
    dut = WeightROM(width=12, depth=5, init=[0] * 5, style="file", init_file="rom/c.hex")
    text = verilog.convert(dut, name="top", emit_src=False)
    assert "hwgen_rom #(" in text
    assert '.INIT_FILE("rom/c.hex")' in text
    assert ".DEPTH(32'd5)" in text and ".WIDTH(32'd12)" in text and ".LOGIC(32'd1)" in text


@pytest.mark.parametrize(("depth", "style"), [(128, "logic"), (129, "block")])
def test_inline_rom_carries_its_storage_attribute(depth, style):
    dut = WeightROM(width=4, depth=depth, init=[1] * depth)
    text = verilog.convert(dut, name="top", emit_src=False)
    assert f'(* rom_style = "{style}" *)' in text


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        (dict(style="bram"), "ROM style must be one of inline, file, not 'bram'"),
        (dict(style="file", init_file="/abs/x.hex"), "relative path, not '/abs/x.hex'"),
        (dict(init=[1, 2]), "ROM init has 2 words, expected 4"),
        (dict(storage="lutram"), "ROM storage must be block or logic, not 'lutram'"),
    ],
)
def test_bad_parameters(kwargs, msg):
    args = dict(width=4, depth=4, init=[0] * 4) | kwargs
    with pytest.raises(HwgenError, match=msg.replace("(", r"\(")):
        WeightROM(**args)


def test_build_refuses_a_three_digit_codebook_entry_and_writes_nothing(tmp_path):
    """``hwgen build`` of a folded layer whose codebook has 11 = 8 + 2 + 1: one line naming
    the layer and the entry, no build folder; the unrolled engine builds it, and the
    manifest lists the entries the codes index."""
    cb = Codebook((-9, 0, 11, 64), 5)
    w = np.array(cb.entries)[np.arange(24).reshape(3, 8) % 4]
    net = Network((8,), ActFormat(8, 0), (Linear("fc", 8, 3, cb, ActFormat(8, 0), w, [1, 2, 3]),))
    out = tmp_path / "build"
    with pytest.raises(HwgenError, match=r"^layer fc: codebook entry 11 is not 0, ±2\^k") as e:
        build(net, out, BuildOptions(vectors=1))
    assert "\n" not in str(e.value) and not out.exists()
    manifest = build(net, out, BuildOptions(vectors=1, engines={"fc": "unrolled"}))
    entry = manifest["layers"][0]
    assert entry["weight_format"] == "codebook4[-9,0,11,64].f5"
    assert entry["weight_entries"] == [-9, 0, 11, 64]
