"""formats: our round-to-nearest-even casts, bit for bit against ml_dtypes and PyTorch's casts.

Where the references disagree with each other (measured with torch 2.13, ml_dtypes 0.6), the tests
pin down which one we follow:

* finite values and infinities: both, except that torch 2.13's float8_e4m3fn cast saturates on
  overflow (inf included) where ml_dtypes and the OCP definition give NaN; we follow ml_dtypes and
  reproduce torch with ``saturate=True``;
* NaN: we keep sign and payload with the quiet bit set (torch's float16 cast, x86 hardware);
  ml_dtypes canonicalises bfloat16 and e5m2 NaNs and keeps float16 NaNs signalling, torch returns
  0xFFFF for every bfloat16 NaN and 0x7F/0xFF for every e5m2 NaN, so against those we check only
  that the result is a NaN of the right sign (torch bfloat16: only that it is a NaN);
* float64 inputs: torch (every format) and ml_dtypes (bfloat16, float8_e4m3fn, float8_e5m2)
  round through float32 first,
  which double-rounds near ties; we round once and check that against the definition.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from deeplinear import arithmetic as ar
from deeplinear import formats as fm
from deeplinear.arithmetic import FORMATS, Semantics

NARROW = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
ML = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
      "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
      "float32": np.float32}
NP_UINT = {8: np.uint8, 16: np.uint16, 32: np.uint32}
TORCH_INT = {8: torch.uint8, 16: torch.int16, 32: torch.int32}


def ml_bits(x: torch.Tensor, name: str) -> torch.Tensor:
    with np.errstate(all="ignore"):
        out = x.numpy().astype(ML[name]).view(NP_UINT[FORMATS[name].bits])
    return torch.from_numpy(out.astype(np.int64))


def torch_bits(x: torch.Tensor, name: str) -> torch.Tensor:
    fmt = FORMATS[name]
    return x.to(fmt.dtype).view(TORCH_INT[fmt.bits]).to(torch.int64) & ((1 << fmt.bits) - 1)


def is_nan_bits(bits: torch.Tensor, name: str) -> torch.Tensor:
    fmt = FORMATS[name]
    stored = fmt.precision - 1
    field, mant = (bits >> stored) & ((1 << fmt.exponent_bits) - 1), bits & ((1 << stored) - 1)
    top = field == (1 << fmt.exponent_bits) - 1
    return top & (mant != 0) if fmt.has_inf else top & (mant == (1 << stored) - 1)


def sign_bit(bits: torch.Tensor, name: str) -> torch.Tensor:
    return (bits >> (FORMATS[name].bits - 1)) & 1


def torch_e4m3fn_saturates() -> bool:
    return not torch.tensor(1000.0).to(torch.float8_e4m3fn).float().isnan().item()


def assert_matches(mine: torch.Tensor, ref: torch.Tensor, name: str, *, nan_payload: bool,
                   nan_sign: bool = True) -> None:
    """Bit-identical where the reference is not NaN; NaN (of the same sign) where it is."""
    ref_nan = is_nan_bits(ref, name)
    assert torch.equal(is_nan_bits(mine, name), ref_nan)
    keep = ~ref_nan if not nan_payload else torch.ones_like(ref_nan)
    bad = (mine != ref) & keep
    assert not bad.any(), list(zip(mine[bad][:5].tolist(), ref[bad][:5].tolist(), strict=True))
    if nan_sign:
        assert torch.equal(sign_bit(mine[ref_nan], name), sign_bit(ref[ref_nan], name))


def every_pattern(name: str) -> torch.Tensor:
    return torch.arange(1 << FORMATS[name].bits, dtype=torch.int64)


def beyond_max(name: str) -> float:
    """The value after max if the exponent range went on: the other end of the overflow tie."""
    fmt = FORMATS[name]
    return fmt.max + 2.0 ** (fmt.max_exp - fmt.precision + 1)


def finite_values(name: str) -> torch.Tensor:
    """Every finite non-negative value of the format, ascending, then :func:`beyond_max`."""
    v = fm.from_bits(every_pattern(name), name)
    v = v[torch.isfinite(v) & (v >= 0)].unique()
    return torch.cat([v, torch.tensor([beyond_max(name)], dtype=torch.float64)])


def tie_inputs(name: str) -> torch.Tensor:
    """Every midpoint between neighbours (0 and max's successor too), +-1 float32 ulp, signed."""
    v = finite_values(name)
    mid64 = (v[:-1] + v[1:]) / 2
    mid = mid64.float()
    assert torch.equal(mid.double(), mid64)  # p + 1 <= 24 bits: every tie is a float32
    xs = torch.cat([mid, torch.nextafter(mid, torch.tensor(math.inf)),
                    torch.nextafter(mid, torch.tensor(-math.inf))])
    return torch.cat([xs, -xs])


def edge_inputs(name: str) -> torch.Tensor:
    fmt = FORMATS[name]
    boundary = (fmt.max + beyond_max(name)) / 2  # the rounding boundary to overflow
    e = [0.0, -0.0, math.inf, -math.inf, math.nan, fmt.max, fmt.min_normal, fmt.min_subnormal,
         fmt.min_subnormal / 2, fmt.tiny_threshold, boundary, beyond_max(name), 1.0]
    x = torch.tensor(e, dtype=torch.float32)
    x = torch.cat([x, torch.nextafter(x, torch.tensor(math.inf)),
                   torch.nextafter(x, torch.tensor(-math.inf))])
    return torch.cat([x, -x])


def random_inputs(name: str, n: int, seed: int) -> torch.Tensor:
    """n float32: random bit patterns (NaN, inf, all exponents), log-uniform magnitudes over the
    format's range and beyond, and exact ties between random neighbours."""
    g = torch.Generator().manual_seed(seed)
    fmt = FORMATS[name]
    b = torch.randint(-(1 << 31), 1 << 31, (n // 4,), generator=g, dtype=torch.int64)
    bits = b.to(torch.int32).view(torch.float32)
    lo = math.log2(fmt.min_subnormal) - 2
    hi = min(math.log2(fmt.max) + 2, 127.9)
    e = torch.empty(n // 2, dtype=torch.float64).uniform_(lo, hi, generator=g)
    sign = torch.randint(0, 2, (n // 2,), generator=g) * 2 - 1
    logu = (sign * torch.exp2(e)).float()
    parts = [bits, logu]
    if fmt.precision < 24:
        v = finite_values(name)
        i = torch.randint(0, len(v) - 1, (n - n // 4 - n // 2,), generator=g)
        parts.append(((v[i] + v[i + 1]) / 2).float())
    return torch.cat([*parts, edge_inputs(name)])


# --- constants -----------------------------------------------------------------------------------

def test_float8_formats_match_ml_dtypes_finfo() -> None:
    for name in ("float8_e4m3fn", "float8_e5m2"):
        fmt, fi = FORMATS[name], ml_dtypes.finfo(ML[name])
        assert fmt.max == float(fi.max) and fmt.min_normal == float(fi.smallest_normal)
        assert fmt.min_subnormal == float(fi.smallest_subnormal)
        assert fmt.precision == fi.nmant + 1 and fmt.exponent_bits == fi.nexp
    e4, e5 = FORMATS["float8_e4m3fn"], FORMATS["float8_e5m2"]
    assert (e4.has_inf, e4.overflow, e4.max, e4.min_exp) == (False, "nan", 448.0, -6)
    assert (e5.has_inf, e5.overflow, e5.max, e5.min_exp) == (True, "inf", 57344.0, -14)
    assert (FORMATS["float32"].min_exp, FORMATS["float32"].exponent_bits) == (-126, 8)


# --- every pattern -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NARROW)
def test_decode_every_pattern(name: str) -> None:
    fmt = FORMATS[name]
    b = every_pattern(name)
    mine = fm.from_bits(b, name)
    signed = b - ((b >> (fmt.bits - 1)) << fmt.bits) if fmt.bits > 8 else b
    ref_t = signed.to(TORCH_INT[fmt.bits]).view(fmt.dtype).double()
    with np.errstate(all="ignore"):
        ref_m = torch.from_numpy(b.numpy().astype(NP_UINT[fmt.bits]).view(ML[name])
                                 .astype(np.float64))
    for ref in (ref_t, ref_m):
        assert torch.equal(mine.isnan(), ref.isnan())
        ok = ~mine.isnan()
        assert torch.equal(mine[ok], ref[ok])
        assert torch.equal(torch.signbit(mine), torch.signbit(ref))


@pytest.mark.parametrize("name", NARROW)
def test_every_value_round_trips_and_matches_both_references(name: str) -> None:
    b = every_pattern(name)
    x = fm.from_bits(b, name).float()  # exact: every value is a float32
    mine = fm.to_bits(x, name)
    nan = x.isnan()
    assert torch.equal(mine[~nan], b[~nan])
    quiet = 1 << (FORMATS[name].precision - 2)
    assert torch.equal(mine[nan], b[nan] | (quiet if FORMATS[name].has_inf else 0))
    assert_matches(mine, ml_bits(x, name), name, nan_payload=False)
    assert_matches(mine, torch_bits(x, name), name, nan_payload=name == "float16",
                   nan_sign=name != "bfloat16")
    assert torch.equal(fm.cast(x, name).view(TORCH_INT[FORMATS[name].bits]).to(torch.int64)
                       & ((1 << FORMATS[name].bits) - 1), mine)


@pytest.mark.parametrize("name", NARROW)
def test_every_tie_and_its_neighbours(name: str) -> None:
    """All midpoints of the format (exhaustive): ties to even, and the boundary to overflow."""
    x = tie_inputs(name)
    mine = fm.to_bits(x, name)
    assert_matches(mine, ml_bits(x, name), name, nan_payload=True)
    sat = name == "float8_e4m3fn" and torch_e4m3fn_saturates()
    assert_matches(fm.to_bits(x, name, saturate=sat), torch_bits(x, name), name, nan_payload=True)
    # ties went to the even encoding
    v = finite_values(name)
    mid = ((v[:-2] + v[1:-1]) / 2).float()
    assert (fm.to_bits(mid, name) & 1 == 0).all()


# --- a million random inputs ---------------------------------------------------------------------

@pytest.mark.parametrize("name", (*NARROW, "float32"))
def test_random_float32_inputs(name: str) -> None:
    x = random_inputs(name, 1 << 20 if name != "float32" else 1 << 18, seed=len(name))
    mine = fm.to_bits(x, name)
    assert_matches(mine, ml_bits(x, name), name, nan_payload=name == "float32")
    sat = name == "float8_e4m3fn" and torch_e4m3fn_saturates()
    assert_matches(fm.to_bits(x, name, saturate=True) if sat else mine, torch_bits(x, name), name,
                   nan_payload=name in ("float16", "float32"), nan_sign=name != "bfloat16")


def test_nan_rule_keeps_sign_and_payload_and_quiets() -> None:
    x = torch.tensor([0x7F812345, 0x7FC00000, -1], dtype=torch.int32).view(torch.float32)
    # float16 keeps the top 10 payload bits of the 23 with the quiet bit set
    assert fm.to_bits(x, "float16").tolist() == [0x7E00 | (0x012345 >> 13), 0x7E00, 0xFFFF]
    assert fm.to_bits(x, "float8_e5m2").tolist() == [0x7E, 0x7E, 0xFF]
    assert fm.to_bits(x, "float8_e4m3fn").tolist() == [0x7F, 0x7F, 0xFF]
    assert fm.to_bits(x, "float32").tolist() == [0x7F812345, 0x7FC00000, 0xFFFFFFFF]  # as is


# --- float64 inputs ------------------------------------------------------------------------------

def float64_inputs(name: str, n: int, seed: int) -> torch.Tensor:
    """Random float64 up to max, exact ties between neighbours of the format, and as many
    within 2^-40 (relative) of a tie (where rounding through float32 first goes wrong)."""
    g = torch.Generator().manual_seed(seed)
    fmt = FORMATS[name]
    lo, hi = math.log2(fmt.min_subnormal) - 1, math.log2(fmt.max)
    x = torch.exp2(torch.empty(n, dtype=torch.float64).uniform_(lo, hi, generator=g))
    bits = fm.to_bits(torch.exp2(torch.empty(n, dtype=torch.float64).uniform_(lo, hi - 1,
                                                                             generator=g)), name)
    mid = (fm.from_bits(bits, name) + fm.from_bits(bits + 1, name)) / 2
    near = mid * (1 + torch.randn(n, generator=g, dtype=torch.float64) * 2.0**-40)
    sign = torch.randint(0, 2, (3 * n,), generator=g) * 2 - 1
    return torch.cat([x, mid, near]) * sign


@pytest.mark.parametrize("name", (*NARROW, "float32"))
def test_float64_inputs_round_once_to_nearest_even(name: str) -> None:
    fmt = FORMATS[name]
    x = float64_inputs(name, 1 << 15, seed=7)
    b = fm.to_bits(x, name)
    r = fm.from_bits(b, name)
    mag = b & ((1 << (fmt.bits - 1)) - 1)
    up = fm.from_bits(mag + 1, name).nan_to_num(nan=beyond_max(name), posinf=beyond_max(name))
    down = fm.from_bits((mag - 1).clamp_min(0), name)
    d, du, dd = (x.abs() - r.abs()).abs(), (x.abs() - up).abs(), (x.abs() - down).abs()
    assert (d <= du).all() and (d <= dd).all()
    tie = (d == du) | ((d == dd) & (mag > 0))
    assert (mag[tie] & 1 == 0).all()
    assert torch.equal(torch.signbit(r), torch.signbit(x))
    if name in ("float16", "float32"):  # numpy converts float64 directly to these: bit-identical
        with np.errstate(all="ignore"):
            ref = x.numpy().astype(ML[name]).view(NP_UINT[fmt.bits]).astype(np.int64)
        assert torch.equal(b, torch.from_numpy(ref))
    if name == "float32":
        assert torch.equal(fm.round_to(x, name), x.float().double())


# --- saturation, FTZ, the Semantics hook ---------------------------------------------------------

@pytest.mark.parametrize("name", (*NARROW, "float32"))
def test_saturate_is_clamp_then_cast(name: str) -> None:
    fmt = FORMATS[name]
    x = random_inputs(name, 1 << 16, seed=3)
    clamped = x.clamp(-fmt.max, fmt.max)
    assert torch.equal(fm.to_bits(x, name, saturate=True), fm.to_bits(clamped, name))
    r = fm.round_to(torch.tensor([math.inf, -math.inf, math.nan]), name, saturate=True)
    assert r[:2].tolist() == [fmt.max, -fmt.max] and r[2].isnan()


def test_float64_to_float32_ftz_matches_x86_hardware() -> None:
    """The tiny-after-rounding rule, against the CPU: float64 -> float32 with FTZ set."""
    g = torch.Generator().manual_seed(11)
    mn = FORMATS["float32"].min_normal
    x = (torch.rand(1 << 18, generator=g, dtype=torch.float64) * 2 - 1) * mn * 1.5
    ties = torch.tensor([mn * (1 - 2.0**-25), mn * (1 - 2.0**-24), mn * (1 - 2.0**-26)],
                        dtype=torch.float64)
    x = torch.cat([x, ties, -ties, torch.nextafter(ties, torch.tensor(0.0, dtype=torch.float64))])
    hw = ar.run_with_hardware_ftz(lambda: x.float())
    mine = fm.cast(x, "float32", ftz=True)
    assert torch.equal(mine.view(torch.int32), hw.view(torch.int32))
    assert (hw == 0).any() and ((hw != 0) & (hw.abs() <= mn)).any()


@pytest.mark.parametrize("name", NARROW)
def test_ftz_agrees_with_arithmetic_ftz_rule(name: str) -> None:
    """Our ``a < tiny_threshold`` against arithmetic.ftz's ``r < min or (r == min and exact <
    threshold)`` applied to the reference's IEEE cast."""
    fmt = FORMATS[name]
    x = random_inputs(name, 1 << 16, seed=5)
    x = torch.cat([x, x * 0 + fmt.tiny_threshold, tie_inputs(name)])
    ref = fm.from_bits(ml_bits(x, name), name)
    flushed = ar.ftz(ref, lambda: x.double(), Semantics(name, "ftz"))
    mine = fm.round_to(x, name, ftz=True).double()
    same = (mine == flushed) & (torch.signbit(mine) == torch.signbit(flushed))
    assert (same | (mine.isnan() & flushed.isnan())).all()


def test_quantize_reads_the_semantics() -> None:
    x = torch.tensor([1e-6, 1e5, -70000.0, 3.3])
    sem = Semantics("float16", "ftz", overflow="saturate")
    assert torch.equal(fm.quantize(x, sem), fm.round_to(x, "float16", ftz=True, saturate=True))
    assert fm.quantize(x, sem).tolist() == [0.0, 65504.0, -65504.0, 3.30078125]
    tiny = torch.tensor([2.0**-130])  # a float32 subnormal: the preset's name reads as its rule
    assert fm.quantize(tiny, "TF_GPU").item() == 0 and fm.quantize(tiny, "IEEE").item() > 0


# --- arithmetic in the new formats ---------------------------------------------------------------

@pytest.mark.parametrize("name", NARROW)
def test_arithmetic_ops_round_once_in_any_format(name: str) -> None:
    g = torch.Generator().manual_seed(2)
    fmt = FORMATS[name]
    a = fm.cast(torch.randn(4096, generator=g) * fmt.max / 8, name)
    b = fm.cast(torch.randn(4096, generator=g) * fmt.max / 8, name)
    for op, tf in [(ar.add, torch.add), (ar.mul, torch.mul), (ar.div, torch.div)]:
        for sem in (Semantics(name), Semantics(name, "ftz"), Semantics(name, overflow="saturate")):
            got = op(a, b, sem)
            assert got.dtype == fmt.dtype
            want = fm.round_to(tf(a.double(), b.double()), name, ftz=sem.flushes,
                               saturate=sem.saturates)
            assert torch.equal(got.double().nan_to_num(7.0), want.nan_to_num(7.0))
    if name in ("float16", "bfloat16"):  # unchanged from the torch-cast implementation
        want = (a.double() * b.double()).to(fmt.dtype)
        assert torch.equal(ar.mul(a, b, Semantics(name)).double().nan_to_num(7.0),
                           want.double().nan_to_num(7.0))


def test_e4m3fn_overflow_is_nan_unless_saturating() -> None:
    a = torch.tensor([448.0, -448.0]).to(torch.float8_e4m3fn)
    assert ar.mul(a, 2.0, Semantics("float8_e4m3fn")).float().isnan().all()
    assert ar.mul(a, 2.0, Semantics("float8_e4m3fn", overflow="saturate")).float().tolist() == [
        448.0, -448.0]
    big = torch.tensor([3e38, -3e38])
    assert ar.mul(big, 2.0, ar.IEEE).isinf().all()
    sat = ar.mul(big, 2.0, Semantics("float32", overflow="saturate"))
    assert sat.tolist() == [FORMATS["float32"].max, -FORMATS["float32"].max]


def test_bad_input_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="floating-point tensor"):
        fm.round_to(torch.arange(3), "float16")
    with pytest.raises(ValueError, match="unknown format"):
        fm.cast(torch.ones(2), "float7")
    with pytest.raises(ValueError, match="up to 32 bits"):
        fm.to_bits(torch.ones(2), "float64")
    with pytest.raises(ValueError, match=r"\[0, 2\*\*8\)"):
        fm.from_bits(torch.tensor([256]), "float8_e5m2")
    with pytest.raises(ValueError, match=r"must be integers, got torch\.float32"):  # read 1.5 as 1
        fm.from_bits(torch.tensor([1.5]), "float16")
    with pytest.raises(ValueError, match="unknown overflow"):
        Semantics("float32", overflow="wrap")  # type: ignore[arg-type]


def test_a_float64_signalling_nan_stays_a_quiet_nan_in_every_format():
    """float32 sNaNs are quieted by hardware on the way to float64 before the code sees them;
    a float64 sNaN reaches the code as is, and its payload must not read as infinity."""
    x = torch.tensor([0x7FF0000000000001], dtype=torch.int64).view(torch.float64)
    assert fm.to_bits(x, "float16").item() == 0x7E00
    assert fm.to_bits(x, "float32").item() == 0x7FC00000
    assert fm.to_bits(x, "float8_e5m2").item() == 0x7E
    assert fm.cast(x, "bfloat16").isnan().all()


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_round_precision_is_the_cast_without_its_range_at_any_scale(name):
    """Inside the normal range it is the format's own cast (here torch's, round to nearest even);
    and it commutes with powers of two, far outside any format's range."""
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1 << 14, generator=g, dtype=torch.float64) * 4
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0, 1 + 2.0**-fmt.precision])])  # a tie
    normal = (x.abs() >= fmt.min_normal) | (x == 0)
    r = fm.round_precision(x, fmt)
    assert torch.equal(r[normal], x[normal].to(fmt.dtype).double())
    for e in (-1000, -300, -140, 90, 300):  # Python's 2.0**e (torch < 2.5's ldexp: float32)
        assert torch.equal(fm.round_precision(x * 2.0**e, fmt), r * 2.0**e)


@pytest.mark.parametrize("name", list(FORMATS))
def test_round_precision_at_float64s_extremes(name):
    """Float64 subnormals of a few significant bits stay (the result's 2**e leaves float64's
    normal range there: it is built in two halves), the largest float64 rounds up to 2**1024 =
    inf unless the format keeps 53 bits, zeros keep their sign, inf and NaN pass."""
    fmt = FORMATS[name]
    tiny = [0.0, -0.0, 2.0**-1074, -3 * 2.0**-1074, 2.0**-1022, 5 * 2.0**-1060]
    x = torch.tensor([*tiny, math.inf, -math.inf, math.nan], dtype=torch.float64)
    r = fm.round_precision(x, fmt)
    assert torch.equal(r[:len(tiny)].view(torch.int64), x[:len(tiny)].view(torch.int64))
    assert r[len(tiny):-1].tolist() == [math.inf, -math.inf] and r[-1].isnan()
    top = fm.round_precision(torch.tensor([-1.7976931348623157e308], dtype=torch.float64), fmt)
    assert top.item() == (-1.7976931348623157e308 if fmt.precision >= 53 else -math.inf)


def test_round_precision_passes_inf_whatever_exponent_frexp_gives_it(monkeypatch):
    """C's frexp (and CUDA's) leaves the exponent of inf and NaN unspecified; glibc's 0 must not
    be what keeps inf an inf."""
    frexp = torch.frexp

    def odd_frexp(x):
        m, e = frexp(x)
        return m, torch.where(torch.isfinite(x), e, -2022)  # 2**-1023 halves: 0 bits
    monkeypatch.setattr(torch, "frexp", odd_frexp)
    x = torch.tensor([math.inf, -math.inf, math.nan, 1.5], dtype=torch.float64)
    r = fm.round_precision(x, "float32")
    assert r[:2].tolist() == [math.inf, -math.inf] and r[2].isnan() and r[3].item() == 1.5
