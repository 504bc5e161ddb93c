"""Weight ROMs: the weight code layout, the per-PE word contents, and the ROM component.

Weight codes (one per weight, ``code_bits(fmt)`` wide):

- ``Fixed(bits, frac)``: the weight in two's complement, ``bits`` wide.
- ``Pow2(bits, emax)``, bits >= 3: ``[zero | sign | shift]``, ``bits`` wide. ``shift`` =
  ``e - emin`` in the ``bits - 2`` LSBs (the integer weight is ``±2**shift``), ``sign`` (1 =
  negative) above it, the ``zero`` flag in the MSB. A zero weight is ``zero=1, sign=0,
  shift=0``.
- ternary (``Pow2(2, emax)``, weights ``{0, ±1}``): ``[zero | sign]``, 2 bits.
- binary (``Pow2(1, emax)``, weights ``±1``): ``[sign]``, 1 bit.
- ``Codebook(entries, frac)``: the weight's index into ``entries``, ``bits`` wide. The
  folded engine's lanes decode it to the entry's shift-add terms (``entry_terms``), so
  every entry must be 0, ``±2**k`` or ``±2**j ± 2**k``; a build refuses any other entry
  (the unrolled engine, whose weights are constants, takes any integer).
- ``Planes(scales, frac)``: ``M`` sign bits, bit ``i`` the sign of plane ``i`` (1 = -1), so
  that the weight of channel ``c`` is ``Σ_i m_ic·(1 - 2·bit_i)``. Of the codes with that
  sum, the lowest (any is exact: the engine computes ``Σ_i m_ic·Σ_j b_ij·a_j``).

One ROM per layer, shared by its PEs (they all read the same address in the same cycle):
``depth = KH*KW*Cin/SIMD * Cout/PE`` words of ``PE * SIMD * code_bits`` bits. PE ``k``'s
codes are the slice ``[k*SIMD*code_bits, (k+1)*SIMD*code_bits)``, and in it lane ``l``
(input channel ``g*SIMD + l`` of the group ``g``) is at ``[l*code_bits, (l+1)*code_bits)``:
PE 0 lane 0 at the LSB. Address order: for each neuron fold ``nf`` (output channel
``nf*PE + k``), for ``kh``, for ``kw``, for channel group ``g`` — the order the
sliding-window unit emits. A dense layer is ``KH = KW = 1``, Cin = in_features.
Zero-block skipping (hwgen.hw.sparse): the words of a fold's beats whose blocks are zero in
all its PEs are left out (a fold of zeros keeps its first word); the others keep this order,
so the depth is the beats of the schedule, ``KH*KW*Cin/SIMD * Cout/PE`` when none is zero.
The biases are not in the ROM: they are constants of the MAC array (see hwgen.hw.mac).

One wide word instead of one ROM per PE packs the bits into as few memory blocks as the
read width allows (``bram_blocks``); a shallow ROM (``rom_storage``) is put in logic
instead, where it costs no block and a few LUTs per bit.

The ``.hex`` form (``hex_lines``) has one word per line, most significant digit first,
``ceil(width/4)`` hex digits, address 0 first: the format of Verilog's ``$readmemh``.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np
from amaranth import Array, Cat, ClockSignal, Instance, Module, Signal, Value, unsigned
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from hwgen.errors import HwgenError
from hwgen.hw.cmvm import csd
from hwgen.hw.fanout import copies, slices
from hwgen.hw.sparse import fold_schedule, rom_addresses, window_beats
from hwgen.ir import Codebook, Conv2d, Fixed, Linear, Planes, WeightFormat

ROM_STYLES = ("inline", "file")


def code_bits(fmt: WeightFormat) -> int:
    """Width of one weight code in the ROM."""
    # Fixed: two's complement; Pow2: [zero|sign|shift], [zero|sign] or [sign]; Codebook: index;
    # Planes: a sign bit per plane
    return fmt.bits


def entry_terms(fmt: Codebook, layer: str = "") -> list[list[tuple[int, bool]]]:
    """Each entry's canonical signed digits ``[(shift, negative), ...]`` (highest first, at
    most two); an entry with more is refused, naming ``layer``."""
    terms = []
    for e in fmt.entries:
        digits = csd(e)[::-1]
        if len(digits) > 2:
            where = f"layer {layer}: " if layer else ""
            raise HwgenError(
                f"{where}codebook entry {e} is not 0, ±2^k or ±2^j ± 2^k (it has "
                f"{len(digits)} signed digits), which a shift-add lane cannot multiply by; "
                "use --engine unrolled for this layer or a codebook of such entries"
            )
        terms.append(digits)
    return terms


def encode_weights(fmt: WeightFormat, w: np.ndarray) -> np.ndarray:
    """Integer weights (on the format's grid; for Planes, output channel first) to their
    unsigned ROM codes, same shape."""
    w = np.asarray(w, dtype=np.int64)
    if isinstance(fmt, Fixed):
        return w & ((1 << fmt.bits) - 1)
    if isinstance(fmt, Codebook):
        return fmt.indices(w)
    if isinstance(fmt, Planes):
        return _plane_codes(fmt, w)
    sign = (w < 0).astype(np.int64)
    if fmt.bits == 1:
        return sign
    zero = (w == 0).astype(np.int64)
    if fmt.bits == 2:
        return (zero << 1) | sign
    sb = fmt.bits - 2
    mag = np.abs(w)
    shift = np.zeros_like(mag)
    for k in range(1, fmt.max_shift + 1):
        shift[mag == (1 << k)] = k
    return (zero << (sb + 1)) | (sign << sb) | shift


def _plane_codes(fmt: Planes, w: np.ndarray) -> np.ndarray:
    """Each weight's lowest sign code (output channel first); a weight no code gives is
    refused, naming its channel."""
    values = fmt.values()
    rows = w.reshape(fmt.channels, -1)
    codes = np.full(rows.shape, -1, np.int64)
    for code in range(values.shape[1] - 1, -1, -1):  # downwards: the lowest code wins
        codes[rows == values[:, code, None]] = code
    bad = np.argwhere(codes < 0)
    if bad.size:
        c, j = (int(i) for i in bad[0])
        raise HwgenError(
            f"weight {rows[c, j]} of channel {c} is no signed sum of its plane scales "
            f"{list(fmt.scales[c])}"
        )
    return codes.reshape(w.shape)


def decode_weights(fmt: WeightFormat, codes: np.ndarray) -> np.ndarray:
    """ROM codes back to integer weights (the inverse of ``encode_weights``; for Planes,
    output channel first)."""
    c = np.asarray(codes, dtype=np.int64)
    if isinstance(fmt, Fixed):
        return np.where(c >> (fmt.bits - 1), c - (1 << fmt.bits), c)
    if isinstance(fmt, Codebook):
        return np.asarray(fmt.entries, np.int64)[c]
    if isinstance(fmt, Planes):
        values = fmt.values()
        return np.take_along_axis(values, c.reshape(fmt.channels, -1), axis=1).reshape(c.shape)
    if fmt.bits == 1:
        return np.where(c & 1, -1, 1)
    if fmt.bits == 2:
        return np.where(c & 2, 0, np.where(c & 1, -1, 1))
    sb = fmt.bits - 2
    mag = np.left_shift(1, c & ((1 << sb) - 1))
    return np.where((c >> (sb + 1)) & 1, 0, np.where((c >> sb) & 1, -mag, mag))


def weight_matrix(layer: Conv2d | Linear) -> np.ndarray:
    """Weights as (Cout, KH, KW, Cin): the window unit's (kh, kw, channel) order per neuron."""
    if isinstance(layer, Linear):
        return layer.weight[:, None, None, :]
    return layer.weight.transpose(0, 2, 3, 1)


def rom_width(layer: Conv2d | Linear, pe: int, simd: int) -> int:
    """Bits per word of the layer's ROM: every PE's SIMD codes."""
    return pe * simd * code_bits(layer.weight_format)


def rom_words(layer: Conv2d | Linear, pe: int, simd: int) -> np.ndarray:
    """The layer's ROM contents in address order (see the module docstring).

    Words are ``uint64`` when ``rom_width`` is at most 64 bits, else Python ints (dtype
    object).
    """
    if isinstance(layer.weight_format, Codebook):
        entry_terms(layer.weight_format, layer.name)
    cb = code_bits(layer.weight_format)
    w = weight_matrix(layer)
    cout = w.shape[0]
    codes = encode_weights(layer.weight_format, w).reshape(cout // pe, pe, -1, simd)
    # (nf, addr in fold, k, lane): a word's codes, PE 0 lane 0 first.
    codes = codes.transpose(0, 2, 1, 3).reshape(-1, pe * simd)
    codes = codes[rom_addresses(fold_schedule(layer, pe, simd), window_beats(layer, simd))]
    if pe * simd * cb <= 64:
        shifts = np.arange(pe * simd, dtype=np.uint64) * np.uint64(cb)
        return np.bitwise_or.reduce(codes.astype(np.uint64) << shifts, axis=1)
    # Wide words: pack 60-bit chunks with numpy, join them as Python ints.
    per = max(1, 60 // cb)
    chunks = []
    for lo in range(0, pe * simd, per):
        part = codes[:, lo : lo + per].astype(np.uint64)
        shifts = np.arange(part.shape[1], dtype=np.uint64) * np.uint64(cb)
        chunks.append((lo * cb, np.bitwise_or.reduce(part << shifts, axis=1)))
    words = np.zeros(len(codes), dtype=object)
    for offset, values in chunks:
        words += np.array([int(v) << offset for v in values], dtype=object)
    return words


# DP16KD (ECP5): 18 kbit, width x depth; 36 wide only as a one-read-port PDPW16KD, which
# is all a ROM needs. SB_RAM40_4K (iCE40): 4 kbit.
BRAM_SHAPES = {
    "ecp5": ((36, 512), (18, 1024), (9, 2048), (4, 4096), (2, 8192), (1, 16384)),
    "ice40": ((16, 256), (8, 512), (4, 1024), (2, 2048)),
}
LOGIC_MAX_DEPTH = 128  # shallower ROMs go in logic: a block would hold mostly nothing


def bram_blocks(width: int, depth: int, family: str = "ecp5") -> int:
    """Block RAMs a ``width`` x ``depth`` memory takes in the family's best configuration
    (one configuration per memory, tiled in width and depth, as Yosys maps it)."""
    if width <= 0 or depth <= 0:
        return 0
    return min(-(-width // w) * -(-depth // d) for w, d in BRAM_SHAPES[family])


# Words of a bank of a ROM in logic: an ECP5 slice's two LUT4s and its PFUMX make one LUT5,
# so a bank's read is one LUT level before its register.
LOGIC_BANK_DEPTH = 32


def rom_banks(width: int, depth: int, storage: str) -> list[int]:
    """Depths of a ROM's (or a StreamFIFO's) banks, address 0 first: in block RAM one bank
    per block-RAM row of the ECP5 configuration that ``bram_blocks`` counts (so banking
    costs no block); in logic banks of ``LOGIC_BANK_DEPTH`` words. Every bank but the last
    is a power of two deep."""
    if storage == "logic":
        rows = LOGIC_BANK_DEPTH
    else:
        _, rows = min(
            BRAM_SHAPES["ecp5"], key=lambda s: (-(-width // s[0]) * -(-depth // s[1]), -s[1])
        )
    return [min(rows, depth - base) for base in range(0, depth, rows)]


def rom_storage(width: int, depth: int) -> str:
    """``"logic"`` for a shallow ROM (LUTs decode it), else ``"block"`` (block RAM)."""
    return "logic" if depth <= LOGIC_MAX_DEPTH else "block"


def hex_lines(words: np.ndarray, width: int) -> str:
    """A ROM's contents as ``$readmemh`` text: one fixed-width hex word per line."""
    digits = max(1, -(-width // 4))
    return "".join(f"{int(v):0{digits}x}\n" for v in words)


def rom_file(layer_name: str) -> str:
    """Relative path of the layer's hex file, as the ``file`` ROM style loads it."""
    return str(PurePosixPath("rom") / f"{layer_name}.hex")


def bank_files(init_file: str, banks: int) -> list[str]:
    """The hex file of each bank: ``init_file`` itself for one bank, else ``<stem>.<k>.hex``."""
    if banks == 1:
        return [init_file]
    p = PurePosixPath(init_file)
    return [str(p.with_name(f"{p.stem}.{k}{p.suffix}")) for k in range(banks)]


def rom_images(layer_name: str, words: np.ndarray, width: int) -> dict[str, str]:
    """The ``file`` style's hex files of a layer's ROM, ``{path: text}``, one per bank."""
    depths = rom_banks(width, len(words), rom_storage(width, len(words)))
    starts = np.cumsum([0, *depths])
    names = bank_files(rom_file(layer_name), len(depths))
    return {
        name: hex_lines(words[lo:hi], width)
        for name, lo, hi in zip(names, starts[:-1], starts[1:], strict=True)
    }


def rom_latency(storage: str) -> int:
    """Cycles from a ROM's address to its data (see ``WeightROM``): 2 in logic, 3 in block
    RAM."""
    return 2 if storage == "logic" else 3


class WeightROM(wiring.Component):
    """A read-only memory with a synchronous read port: data ``latency`` cycles after the
    address.

    The ROM is split into ``rom_banks`` and the bank select (delayed to match) picks among
    the banks' registered read data, its last register copied for each column slice
    (``hwgen.hw.fanout.slices``) of the word. In logic, ``latency`` is 2: a bank is 32
    words, one LUT5 per bit before its read register (one ROM decoded as a whole put three
    LUT levels and the routing of an address bit fanning out to every bit between two
    registers: ResNet-20's critical path at 65.7 MHz), and each column slice of a bank is
    read at its own registered copy of the address (one address register driving every
    bank's LUTs, 200-430 loads a bit, was ResNet-20's critical path at 80 MHz). In block
    RAM it is 3: each bank's read data is
    registered twice before the bank select. The first register becomes the block RAM's
    own output register on ECP5 (hwgen.netlist: without it, a block RAM's 5.6 ns
    clock-to-out had set ResNet-20's Fmax at 64 MHz, and the digits network's); the second
    is a fabric register the placer puts anywhere on the way to the bank mux, since a
    large ROM's blocks lie across the chip (8.7 ns of routing from one of them to its bank
    mux, 44 tiles away, held ResNet-20 at 87.3 MHz).

    Parameters
    ----------
    width, depth : int
        Word width in bits and number of words.
    init : sequence of int
        The contents, address 0 first.
    style : ``"inline"`` or ``"file"``
        ``inline``: an ``amaranth.lib.memory.Memory`` whose contents are written into the
        Verilog. ``file``: an instance of ``hwgen_rom`` (``hwgen/rtl_templates/hwgen_rom.v``)
        that loads ``init_file`` with ``$readmemh`` at elaboration, so weights can be swapped
        without regenerating the RTL. Both have the same timing.
    init_file : str
        Relative path of the hex file (``file`` style only); a ROM of several banks loads
        one file per bank (``bank_files``).
    storage : ``"block"``, ``"logic"`` or None
        Where synthesis puts it (the ``rom_style`` attribute Yosys reads); None chooses
        with ``rom_storage``.

    Members
    -------
    addr : In(max(1, ceil(log2(depth))))
    data : Out(width)
    """

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        init: object,
        style: str = "inline",
        init_file: str = "",
        storage: str | None = None,
    ) -> None:
        self.width, self.depth, self.style, self.init_file = width, depth, style, init_file
        self.storage = storage or rom_storage(width, depth)
        self.init = [int(v) for v in init]
        error = None
        if style not in ROM_STYLES:
            error = f"ROM style must be one of {', '.join(ROM_STYLES)}, not {style!r}"
        elif style == "file" and (not init_file or PurePosixPath(init_file).is_absolute()):
            error = f"ROM init file must be a relative path, not {init_file!r}"
        elif len(self.init) != depth:
            error = f"ROM init has {len(self.init)} words, expected {depth}"
        elif self.storage not in ("block", "logic"):
            error = f"ROM storage must be block or logic, not {self.storage!r}"
        if error:
            self._MustUse__silence = True  # a rejected component is not an unused one
            raise HwgenError(error)
        super().__init__(
            {
                "addr": In(max(1, (depth - 1).bit_length())),
                "data": Out(width),
            }
        )

    @property
    def latency(self) -> int:
        """Cycles from an address to its data."""
        return rom_latency(self.storage)

    def _bank(
        self,
        m: Module,
        name: str,
        base: int,
        depth: int,
        cols: tuple[int, int],
        file: str,
        addr: Value,
    ) -> Value:
        """Columns ``[lo, hi)`` of the bank of words ``base`` to ``base + depth - 1``, read
        at ``addr`` (a synchronous read): its data."""
        lo, hi = cols
        data = Signal(hi - lo, name=f"{name}_data")
        if self.style == "file":
            m.submodules[name] = Instance(
                "hwgen_rom",
                p_DEPTH=depth,
                p_WIDTH=hi - lo,
                p_INIT_FILE=file,
                p_LOGIC=int(self.storage == "logic"),
                p_WORD=self.width,
                p_LSB=lo,
                i_clk=ClockSignal("sync"),
                i_addr=addr[: max(1, (depth - 1).bit_length())],
                o_data=data,
            )
            return data
        mask = (1 << (hi - lo)) - 1
        m.submodules[name] = mem = memory.Memory(
            shape=unsigned(hi - lo),
            depth=depth,
            init=[(v >> lo) & mask for v in self.init[base : base + depth]],
            attrs={"rom_style": self.storage},
        )
        rd = mem.read_port()
        m.d.comb += [rd.addr.eq(addr), data.eq(rd.data)]
        return data

    def elaborate(self, platform: object) -> Module:
        m = Module()
        depths = rom_banks(self.width, self.depth, self.storage)
        files = (
            bank_files(self.init_file, len(depths)) if self.style == "file" else [""] * len(depths)
        )
        rows = depths[0]  # a power of two when there are several banks
        low = max(1, (rows - 1).bit_length())
        cols = slices(self.width)
        held = []  # per bank, its data in column slices
        for k, depth in enumerate(depths):
            if self.storage == "logic":  # each slice reads at its own copy of the address
                bits = max(1, (depth - 1).bit_length())
                addrs = copies(m, self.addr[:bits], len(cols), f"bank{k}_addr")
                held.append(
                    [
                        self._bank(m, f"bank{k}_{j}", k * rows, depth, c, files[k], a)
                        for j, (c, a) in enumerate(zip(cols, addrs, strict=True))
                    ]
                )
                continue
            whole = (0, self.width)
            data = self._bank(m, f"bank{k}", k * rows, depth, whole, files[k], self.addr[:low])
            reg = Signal(self.width, name=f"bank{k}_reg", reset_less=True)
            hop = Signal(self.width, name=f"bank{k}_hop", reset_less=True)
            m.d.sync += [reg.eq(data), hop.eq(reg)]
            held.append([hop[lo:hi] for lo, hi in cols])
        if len(held) == 1:
            m.d.comb += self.data.eq(Cat(*held[0]))
            return m
        # The select waits as long as the banks' data; its last register has a copy per slice.
        sel = self.addr[low:]
        for j in range(self.latency - 1):
            reg = Signal(range(len(held)), name=f"bank_sel{j + 1}", reset_less=True)
            m.d.sync += reg.eq(sel)
            sel = reg
        last = copies(m, sel, len(cols), f"bank_sel{self.latency}")
        for j, (lo, hi) in enumerate(cols):
            m.d.comb += self.data[lo:hi].eq(Array(bank[j] for bank in held)[last[j]])
        return m
