"""Where and how the numbers are computed: the device, the precision, threads and determinism.

One place for what the trainer, the ``Detector`` (evaluation, inference, export) and the benchmarks
all need: ``resolve_device`` (``device=auto|cpu|cuda|cuda:N``; under torchrun a CUDA device is this
process's GPU), ``native_bf16`` (does the device compute bf16 in hardware?), ``precision_setup``
(``trainer.precision`` -> autocast dtype and GradScaler), ``autocast`` and ``process_settings``.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from retinanet import distributed
from retinanet.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("32", "16-mixed", "bf16-mixed", "auto")


def resolve_device(name: str | torch.device) -> torch.device:
    """``device`` config -> torch device; under torchrun, srun or submitit a CUDA device is this process's GPU."""
    if isinstance(name, torch.device):
        return name
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a device name (auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available on this machine; use device=cpu")
    if device.type == "cuda" and distributed.info().enabled:
        device = torch.device("cuda", distributed.cuda_index(distributed.info().local_rank))
    return device


def native_bf16(device: torch.device) -> bool:
    """Does ``device`` compute bf16 in hardware (CPU: AVX512-BF16 or AMX; CUDA: Ampere or newer)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(check() for check in checks if check is not None)
    return False


def precision_setup(precision: str, device: torch.device, quiet: bool = False):
    """``trainer.precision`` -> ``(autocast dtype or None, GradScaler or None)`` on ``device``."""
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of {list(PRECISIONS)}")
    say = log.debug if quiet else log.info
    if precision == "auto":
        native = native_bf16(device)
        say("trainer.precision=auto: %s", "bf16-mixed (this %s computes bf16 natively)" % device.type if native
            else "32 (no native bf16 on this %s: bf16 would be emulated, slower than fp32)" % device.type)
        precision = "bf16-mixed" if native else "32"
    if precision == "32":
        return None, None
    if precision == "16-mixed":
        if device.type != "cuda":
            raise ConfigError("trainer.precision=16-mixed needs CUDA; on CPU use bf16-mixed or 32")
        say("fp16 autocast with a dynamic loss scale (GradScaler); loss computed in fp32")
        return torch.float16, torch.amp.GradScaler("cuda")
    if device.type == "cpu":
        say("trainer.precision=bf16-mixed on CPU: bf16 autocast (loss computed in fp32)")
    else:
        say("bf16 autocast (loss computed in fp32, no loss scaling needed)")
    return torch.bfloat16, None


def chunk_elements(device: torch.device) -> int:
    """Elements per step of the chunked loops (focal loss, matcher): on a CPU the temporaries of a step stay
    in the cache (2^18); on a GPU a step is a few large kernels (2^25: one or two chunks for a COCO batch, so
    the loops' few host synchronisations stay few)."""
    return 2**18 if device.type == "cpu" else 2**25


INFERENCE_PRECISIONS = ("auto", "32", "bf16", "fp16", "bf16-mixed", "16-mixed")  # the trainer's names work too


def inference_dtype(precision, device: torch.device, trained="32", quiet: bool = False) -> torch.dtype | None:
    """``precision=`` of evaluation / inference -> the autocast dtype (None: fp32) on ``device``.

    ``auto`` is chosen for this device, never copied from training: a checkpoint trained in fp32 (``trained="32"``)
    runs in fp32; one trained in mixed precision (``16-mixed``, ``bf16-mixed``, ``auto``) runs in the reduced
    precision this device computes natively: on a GPU the trained one where it computes it (``16-mixed`` -> fp16;
    ``bf16-mixed`` -> bf16 on Ampere or newer, else fp32; ``auto`` -> bf16 where native, else fp32), on a CPU bf16
    where it is native (AVX512-BF16 or AMX), else fp32 (emulated bf16 is slower than fp32; CPUs emulate fp16).
    An explicit ``32``, ``bf16`` (``bf16-mixed``) or ``fp16`` (``16-mixed``) is what runs: bf16 where the device
    emulates it with a warning (slower than fp32, the same numbers as native bf16 up to bf16 rounding), fp16 on
    CUDA only (``ConfigError``). ``quiet``: the choice is logged at debug level, not info / warning."""
    precision, trained = str(precision), str(trained)
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {list(INFERENCE_PRECISIONS)}")
    if trained not in PRECISIONS:
        raise ConfigError(f"the checkpoint's trainer.precision={trained!r} is not one of {list(PRECISIONS)}")
    say = log.debug if quiet else log.info
    if precision == "auto":
        native = native_bf16(device)
        if trained == "32":
            precision, why = "32", "trained in fp32"
        elif device.type == "cuda" and trained == "16-mixed":
            precision, why = "fp16", "trained with 16-mixed, which this GPU computes"
        elif native:
            precision, why = "bf16", f"trained with {trained}; this {device.type} computes bf16 natively"
        else:
            precision, why = "32", (f"trained with {trained}; this {device.type} has no native bf16 (emulated, bf16 "
                                    "is slower than fp32)")
        say("precision=auto: inference in %s (%s)", precision, why)
    precision = {"bf16-mixed": "bf16", "16-mixed": "fp16"}.get(precision, precision)
    if precision == "32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"precision=fp16 needs a CUDA device (device={device}: CPUs compute fp16 by emulation, "
                              "slower than fp32). Use precision=32, or precision=bf16")
        return torch.float16
    if not native_bf16(device):
        say = log.debug if quiet else log.warning
        say("precision=bf16 on a %s without native bf16: emulated, slower than fp32", device.type)
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device`` (a no-op context for full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def process_settings(threads: int | None = None, deterministic: bool = False):
    """Torch intra-op threads and deterministic algorithms for a run, restored afterwards (``run`` may be
    called many times in one process: tests, sweeps)."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    try:
        if threads:
            torch.set_num_threads(threads)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark = saved[3]
