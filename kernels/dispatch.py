"""Which implementation runs a merged matmul, and which strategy a per-sequence prefill takes.

Three decisions live here, all cheap:

- **backend**: the Triton kernels or the torch reference. `MOE_MERGE_KERNELS` chooses: `auto` (the
  default) runs Triton on CUDA tensors of a dtype the kernels cover, the native half-precision path
  (`native.py`) on other half-precision tensors where an op has one, and the reference on anything else;
  `triton` forces the kernels (on CPU tensors only under `TRITON_INTERPRET=1`); `torch` forces the
  reference. Nothing here imports triton unless the kernels are about to run.
- **strategy** for one weight vector per sequence: K-concatenation (expand the weights to every token)
  or materialize-then-GEMM (form W_s = W0 + Σ_e w_se Δ_e once per sequence, then a batched GEMM).
  `choose_strategy` decides for a device: the per-sequence copies must fit `MATERIALIZE_BUDGET_BYTES`,
  then `crossover_tokens` is the cost model, with the device's `RATES` (measured by `benchmarks/kernels.py`).
- **kept decode weights**: whether decode steps run on each sequence's merged weight, formed once at the first
  step and kept with the KV cache (`keep_decode_weights`), rather than on the experts' weights every step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

ENV_VAR = "MOE_MERGE_KERNELS"
Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[Backend, ...] = ("auto", "triton", "torch")
Strategy = Literal["kconcat", "materialize"]
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton kernels take


def backend() -> Backend:
    """The backend `MOE_MERGE_KERNELS` asks for (read on every call, so it can change between calls)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a kernel backend; set it to one of "
            f"{', '.join(BACKENDS)} (or unset it for auto)"
        )
    return value  # type: ignore[return-value]


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on these tensors (None entries ignored) runs the Triton kernels.

    Raises when the kernels are required but cannot run: `triton` forced on CPU tensors without the
    interpreter, or triton not installed where the kernels are chosen (no silent fallback).
    """
    mode = backend()
    if mode == "torch":
        return False
    given = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in given)
    if mode == "auto" and not (on_cuda and given[0].dtype in SUPPORTED_DTYPES):
        return False
    try:
        import triton
    except ImportError as err:
        raise ImportError(
            f"the Triton kernels need triton ({err}); `pip install 'moe-merge[triton]'`, "
            f"or set {ENV_VAR}=torch to run the torch reference"
        ) from err
    if not on_cuda and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            f"{ENV_VAR}=triton got tensors on {given[0].device}; the kernels run on CUDA tensors, or on "
            "CPU under the Triton interpreter: set TRITON_INTERPRET=1 before moe_merge's kernels are "
            f"first used, or set {ENV_VAR}=auto"
        )
    return True


def use_native(x: torch.Tensor) -> bool:
    """Whether a call the Triton kernels do not take runs `native.py`: half-precision tensors off CUDA, in `auto`."""
    return backend() == "auto" and not x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DeviceRates:
    """The two device figures the strategy depends on, both measured (never a spec-sheet peak)."""

    bandwidth: float  # bytes/s: device-to-device copy
    matmul_flops: float  # flop/s: dense GEMM (bf16 on CUDA, fp32 on CPU)
    source: str = ""  # where the figures come from


# Per device type, as `benchmarks/kernels.py` measures and prints them (copy bandwidth, dense GEMM rate).
RATES: dict[str, DeviceRates] = {
    # Provisional until a GPU run of the benchmark replaces them: H100 figures, 3.0 TB/s measured copy
    # bandwidth and a ridge of ~267 flop/byte.
    "cuda": DeviceRates(bandwidth=3.0e12, matmul_flops=8.0e14, source="provisional: H100 figures"),
    # The torch reference on 2 cores of an AMD EPYC, fp32: medians of 8 runs of the benchmark's own measurement
    # (64 MiB copy, 512² GEMM) on 2026-12-01; they ranged over 3.7-5.9e10 B/s and 1.2-1.9e11 flop/s (ridge 3.0-3.9).
    "cpu": DeviceRates(bandwidth=4.1e10, matmul_flops=1.4e11, source="measured: 2-core AMD EPYC, 2026-12-01"),
}


def rates_for(device: torch.device | str) -> DeviceRates:
    """The rates of `device`'s type; a device type not measured yet takes the (provisional) CUDA figures."""
    return RATES.get(torch.device(device).type, RATES["cuda"])


def crossover_tokens(
    sequences: int, experts: int, has_base: bool = True, element_size: int = 2, rates: DeviceRates | None = None
) -> float:
    """Tokens per sequence beyond which materialize-then-GEMM beats K-concatenation.

    With G = E + has_base weight segments of P elements each, S sequences of T tokens, b bytes per
    element, copy bandwidth BW and GEMM rate F (prefill is compute-bound for K-concat):
    - K-concatenation: 2·S·T·P·G flops, its weights read once;
    - materialize: read G·P, write S·P and read them back in the GEMM, (G + 2S)·P·b bytes, then
      2·S·T·P flops.
    They cost the same at T* = (F / BW)·b·(G + 2S) / (2·S·(G − 1)); with one segment (G = 1) there is
    nothing to merge and materializing never pays (infinity). `rates` default to the (provisional) CUDA ones.
    """
    rates = rates or RATES["cuda"]
    segments = experts + int(has_base)
    if segments <= 1:
        return math.inf
    ridge = rates.matmul_flops / rates.bandwidth  # flop/byte
    return ridge * element_size * (segments + 2 * sequences) / (2 * sequences * (segments - 1))


# Above this, the per-sequence weight copies cost more memory than they save time.
MATERIALIZE_BUDGET_BYTES = 256 * 2**20


def choose_strategy(
    tokens: int,
    sequences: int,
    experts: int,
    has_base: bool = True,
    element_size: int = 2,
    device: torch.device | str = "cuda",
    weight_bytes: int = 0,
) -> Strategy:
    """`materialize` when each sequence is longer than `crossover_tokens` with `device`'s rates, else `kconcat`.

    `weight_bytes` is what the S per-sequence weight copies would take; above `MATERIALIZE_BUDGET_BYTES` it is
    always `kconcat`. So is decode (one token per sequence): a copy used for one token costs more flops and
    bytes than reading every weight once for the batch, whatever the rates (`crossover_tokens` leaves out the
    merge's own flops, which decide it there).
    """
    if tokens < 2 or weight_bytes > MATERIALIZE_BUDGET_BYTES:
        return "kconcat"
    crossover = crossover_tokens(sequences, experts, has_base, element_size, rates_for(device))
    return "materialize" if tokens > crossover else "kconcat"


# Kept decode weights (`keep_decode_weights`):
KEEP_HORIZON = 32  # decode steps a kept weight is taken to serve: a layer does not know generate's length
OP_SECONDS = 1e-5  # one op's fixed cost beyond its bytes and flops: ~10 µs to dispatch a small op on 2 CPU cores
FORM_OPS = 5  # ops of a merged linear's decode step on its own tensors (kernels/reference.py), against one kept


@dataclass(frozen=True)
class Cost:
    """What one step of work reads and computes, and in how many ops."""

    bytes: float
    flops: float
    ops: int = 1

    def seconds(self, rates: DeviceRates) -> float:
        return max(self.bytes / rates.bandwidth, self.flops / rates.matmul_flops) + self.ops * OP_SECONDS


def keep_decode_weights(kept: Cost, form: Cost, forming: Cost, device: torch.device | str = "cuda") -> bool:
    """Whether decode steps should run on kept per-sequence weights (`kept`: one step on them) rather than on the
    form's own tensors (`form`: one step), forming them once first (`forming`), with `device`'s rates: keep when
    forming them plus KEEP_HORIZON steps on them cost less than those steps on the form. In practice one or a few
    sequences keep theirs (their copies read less than W0 and E dense deltas, in one op, not five); a batch does
    not. The copies must fit `MATERIALIZE_BUDGET_BYTES`."""
    if kept.bytes > MATERIALIZE_BUDGET_BYTES:
        return False
    rates = rates_for(device)
    return forming.seconds(rates) + KEEP_HORIZON * kept.seconds(rates) < KEEP_HORIZON * form.seconds(rates)
