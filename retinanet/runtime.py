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


INFERENCE_PRECISIONS = ("auto", "32", "bf16", "fp16")


def inference_dtype(precision, device: torch.device, default: torch.dtype | None = None) -> torch.dtype | None:
    """``precision=`` of inference -> the autocast dtype (None: fp32). ``auto``: ``default`` (the checkpoint's own
    ``trainer.precision``, as resolved by ``precision_setup``). bf16 and fp16 only where the device computes them
    natively (``native_bf16``; fp16: CUDA), else a ``ConfigError``: emulated, they would be slower than fp32."""
    precision = str(precision)
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {list(INFERENCE_PRECISIONS)}")
    if precision == "auto":
        return default
    if precision == "32":
        return None
    if precision == "bf16" and not native_bf16(device):
        what = "AVX512-BF16 or AMX" if device.type == "cpu" else "an Ampere or newer GPU"
        raise ConfigError(f"precision=bf16: this {device.type} does not compute bf16 natively (that needs {what}); "
                          "emulated it is slower than fp32. Use precision=32")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision=fp16 needs a CUDA device (device={device}: CPUs compute fp16 by emulation, slower "
                          "than fp32). Use precision=32, or precision=bf16 on a CPU with native bf16")
    dtype, _ = precision_setup("bf16-mixed" if precision == "bf16" else "16-mixed", device, quiet=True)
    return dtype


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
