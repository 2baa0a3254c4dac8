"""torch-fidelity, used safely: validated options, an explicit device, checked local weights, strict FP32.

torch-fidelity 0.4.0 ignores unknown keyword arguments, defaults to CUDA, downloads weights on demand (so it
fails late and offline), and caches features under a key that ignores the weights file (spec_eval.md §1).
Everything in this package reaches it through the helpers here:

* :func:`fidelity_kwargs` validates every option against ``torch_fidelity.defaults.DEFAULTS`` and always sets
  ``cuda``, ``verbose=False`` and ``cache=False``;
* :func:`resolve_weights` finds and hashes an extractor's weights file *before* any work is spent;
* :class:`FeatureExtractor` builds a registered extractor and runs it over uint8 images with a progress bar,
  TF32 disabled.  torch-fidelity's own extractors unpickle a weights path with ``weights_only=False`` (a
  crafted file runs code), so they never get one: :func:`weights_for_fidelity` reads the file with
  ``weights_only=True`` and hands over an in-memory copy of its tensors.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import DataLoader, Dataset, Subset
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor
from tqdm import tqdm

from var.checkpoints import read_checkpoint_file
from var.utils import atomic_write, sha256_of

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SHA256_PREFIX = "6726825d"
DOWNLOADING_EXTRACTORS = ("vgg16", "clip-", "dinov2-")  # torch-fidelity built-ins that fetch weights when run
SMALL_HOST_CPUS = 8  # below this, torch-fidelity runs without DataLoader workers and with the low-RAM P/R path


def small_host() -> bool:
    return (os.cpu_count() or 1) < SMALL_HOST_CPUS


def fidelity_kwargs(cuda: bool, **options) -> dict:
    """Options for a torch-fidelity call: unknown names raise (torch-fidelity would silently ignore them).

    ``cuda`` is always explicit (its default is True and there is no ``device`` option); progress output,
    its feature cache (whose key ignores the weights file) and DataLoader workers on small hosts are off
    unless asked for.
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        hints = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, DEFAULTS, 1))
                 else name for name in unknown]
        raise ValueError(f"unknown torch-fidelity option(s): {', '.join(hints)}")
    settings = {"cuda": bool(cuda), "verbose": False, "cache": False, "save_cpu_ram": small_host(),
                "datasets_download": False}
    settings.update(options)
    return settings


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """Run convolutions and matmuls in full FP32 (PyTorch enables TF32 for cuDNN convs by default)."""
    if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):
        knobs = [(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
                 (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    else:  # torch < 2.9: the legacy flags (mixing both APIs is an error in newer torch)
        knobs = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    saved = [getattr(owner, name) for owner, name, _ in knobs]
    for owner, name, value in knobs:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(knobs, saved, strict=True):
            setattr(owner, name, value)


@dataclass(frozen=True)
class ExtractorWeights:
    """The weights file an extractor runs with (None for a weight-free extractor) and its sha256."""

    path: str | None
    sha256: str | None


def default_inception_path() -> Path:
    """Where torch-fidelity looks for the FID Inception weights: ``$TORCH_HOME/hub/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def resolve_inception_weights(path: str | os.PathLike | None = None, allow_mismatch: bool = False) -> ExtractorWeights:
    """Find the FID Inception weights (given path, else the torch hub cache) and check their sha256 prefix.

    Raises FileNotFoundError saying where to put the file when it is absent (torch-fidelity would try to
    download it, which fails offline), and ValueError when its hash is not the FID network's, unless
    ``allow_mismatch`` (for test weights), which only warns.
    """
    candidate = Path(path) if path is not None else default_inception_path()
    if not candidate.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {candidate}: download {INCEPTION_URL} and put it at "
            f"{default_inception_path()} (or pass --inception-weights PATH)"
        )
    digest = sha256_of(candidate)
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        message = (f"{candidate} has sha256 {digest[:12]}..., not the FID Inception weights "
                   f"(sha256 {INCEPTION_SHA256_PREFIX}...); its numbers are not comparable with published FID")
        if not allow_mismatch:
            raise ValueError(f"{message}; pass --allow-weights-mismatch to use it anyway (test weights)")
        warnings.warn(message, stacklevel=2)
    return ExtractorWeights(str(candidate), digest)


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> None:
    """The FID Inception architecture with random (Kaiming) weights, saved in fp16 (spec_eval.md 1.5).

    For tests and timing jobs where the real weights cannot be downloaded: speed does not depend on weight
    values, and the pipeline runs end to end (use with ``--allow-weights-mismatch``; its numbers are not FID).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random initialisation
            return None

    torch.manual_seed(seed)
    network = RandomInit(INCEPTION, ["2048"], feature_extractor_weights_path=_in_memory({}))
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):  # default init makes activations vanish: FID ~ 0 for anything
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.nn.init.normal_(network.fc.weight, std=0.05)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in network.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(weights, tmp))


def _in_memory(state_dict: dict) -> io.BytesIO:
    """A state dict serialised into memory: what torch-fidelity's ``torch.load`` gets instead of a path."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return buffer


def weights_for_fidelity(name: str, path: str | None) -> str | io.BytesIO | None:
    """The weights argument for extractor ``name``: our own extractors (with a resolver) read their file safely
    themselves; torch-fidelity's get the tensors of ``path`` read with ``weights_only=True``, in memory."""
    if path is None or name in WEIGHT_RESOLVERS:
        return path
    state = read_checkpoint_file(Path(path))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors, so it cannot be the weights of extractor '{name}'")
    return _in_memory(state)


# extractor name -> function(path or None) -> ExtractorWeights, for extractors that need a weights file
WEIGHT_RESOLVERS: dict[str, Callable[[str | None], ExtractorWeights]] = {}


def register_extractor(
    name: str, cls: type, resolve: Callable[[str | None], ExtractorWeights] | None = None
) -> None:
    """Register a torch-fidelity feature extractor once per process (registering twice raises in torch-fidelity)."""
    registered = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if registered is None:
        register_feature_extractor(name, cls)
    elif registered is not cls:
        raise ValueError(f"feature extractor '{name}' is already registered as {registered.__name__}")
    if resolve is not None:
        WEIGHT_RESOLVERS[name] = resolve


def resolve_weights(name: str, path: str | None = None, allow_mismatch: bool = False) -> ExtractorWeights:
    """The weights of extractor ``name``, checked before any sampling or extraction is spent."""
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"unknown feature extractor '{name}'; choose one of {', '.join(FEATURE_EXTRACTORS_REGISTRY)}")
    if name == INCEPTION:
        return resolve_inception_weights(path, allow_mismatch)
    if name in WEIGHT_RESOLVERS:
        return WEIGHT_RESOLVERS[name](path)
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"weights file {path} for extractor '{name}' not found")
        return ExtractorWeights(str(path), sha256_of(path))
    if name.startswith(DOWNLOADING_EXTRACTORS):
        raise ValueError(f"extractor '{name}' downloads its weights, which fails offline; pass its file with "
                         "--extractor-weights, or use inception-v3-compat")
    return ExtractorWeights(None, None)  # a weight-free extractor


def check_uint8_images(images: torch.Tensor, what: str = "images") -> None:
    """torch-fidelity extractors take uint8 (N, 3, H, W) only; fail here with a clear message instead."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")


class FeatureExtractor:
    """A registered torch-fidelity extractor producing ``layers`` on ``device`` from uint8 (N, 3, H, W) images."""

    def __init__(self, name: str, layers: Sequence[str], weights: ExtractorWeights, device: torch.device):
        self.name = name
        self.layers = list(dict.fromkeys(layers))  # unique, in order
        self.weights = weights
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if cuda and self.device.index is not None:
            torch.cuda.set_device(self.device)  # torch-fidelity moves the network with .cuda()
        source = weights_for_fidelity(name, weights.path)
        try:
            self.network = create_feature_extractor(name, self.layers,
                                                    **fidelity_kwargs(cuda, feature_extractor_weights_path=source))
        except RuntimeError as error:  # load_state_dict: missing / unexpected / misshapen keys
            if weights.path is None or "state_dict" not in str(error):
                raise
            reason = " ".join(str(error).split())[:200]
            raise ValueError(f"{weights.path} does not hold the weights of extractor '{name}' ({reason})") from None
        self.shares: list[int] = []  # images each process extracted in the last call (see extract)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @torch.no_grad()
    def extract(
        self,
        images: torch.Tensor | Dataset | None,
        batch_size: int = 100,
        progress: bool = True,
        desc: str = "features",
        state: PartialState | None = None,
    ) -> dict[str, torch.Tensor] | None:
        """Features per layer (N, D), float32 on the CPU, of a uint8 tensor or a Dataset of uint8 (3, H, W).

        Under several processes (``state``) the work is sharded like sampling: the images are cut into the
        batches one process would use and process p extracts batches p, p+P, ..., so every feature is computed
        exactly as by one process.  A Dataset is read by every process; a tensor is needed on the main process
        only (pass None on the others), which scatters its batches.  The main process returns every feature in
        order, the others None; ``shares`` then lists how many images each process extracted.
        """
        processes = 1 if state is None else state.num_processes
        if processes == 1:
            if isinstance(images, torch.Tensor):
                check_uint8_images(images, desc)
                batches = images.split(batch_size)
            else:
                batches = self._loader(images, batch_size)
            features = self._run(batches, len(images), progress, desc)
            self.shares = [len(images)]
            return _concatenate(features, desc)
        if images is None or isinstance(images, torch.Tensor):
            count, batches = _scattered_batches(images, batch_size, state, desc)
        else:
            count = len(images)
            mine = range(state.process_index, math.ceil(count / batch_size), processes)
            indices = [i for b in mine for i in range(b * batch_size, min((b + 1) * batch_size, count))]
            batches = self._loader(Subset(images, indices), batch_size)
        local = self._run(batches, None, progress and state.is_main_process, f"{desc} (process 0 of {processes})")
        rows = sum(len(value) for value in local[self.layers[0]])
        arrays = {layer: torch.cat(values).numpy() for layer, values in local.items()} if rows else None
        gathered = gather_object([(state.process_index, rows, arrays)])  # numpy: pickles on every backend
        if not state.is_main_process:
            return None
        gathered.sort(key=lambda item: item[0])
        self.shares = [rows for _, rows, _ in gathered]
        by_rank = [arrays for _, _, arrays in gathered]
        ordered: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        for batch in range(math.ceil(count / batch_size)):
            rank, nth = batch % processes, batch // processes
            rows = slice(nth * batch_size, (nth + 1) * batch_size)
            for layer in self.layers:
                ordered[layer].append(torch.from_numpy(by_rank[rank][layer][rows]))
        return _concatenate(ordered, desc)

    def _loader(self, images: Dataset, batch_size: int) -> DataLoader:
        workers = 0 if small_host() else min(4, os.cpu_count() or 1)
        return DataLoader(images, batch_size=batch_size, num_workers=workers, pin_memory=self.cuda)

    def _run(self, batches, total: int | None, progress: bool, desc: str) -> dict[str, list[torch.Tensor]]:
        """The network over ``batches`` of uint8 images: per layer, one float32 CPU tensor per batch."""
        outputs: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        with strict_fp32(), tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
            for batch in batches:
                check_uint8_images(batch, desc)
                features = self.network(batch.to(self.device, non_blocking=True))
                for layer, value in zip(self.layers, features, strict=True):
                    outputs[layer].append(value.float().cpu())
                bar.update(len(batch))
        return outputs


def _concatenate(outputs: dict[str, list[torch.Tensor]], desc: str) -> dict[str, torch.Tensor]:
    if not next(iter(outputs.values())):
        raise ValueError(f"no {desc} to extract features from")
    return {layer: torch.cat(values) for layer, values in outputs.items()}


def _scattered_batches(images: torch.Tensor | None, batch_size: int, state: PartialState, desc: str
                       ) -> tuple[int, Iterator[torch.Tensor]]:
    """(image count, this process's batches) of a uint8 tensor held by the main process, scattered round by round.

    Round r sends global batch r*P + p to process p (zero-padded to ``batch_size`` rows); every process takes part
    in every round, also when it has no batch left in the last one.
    """
    header = [None]
    if state.is_main_process:
        check_uint8_images(images, desc)
        header = [tuple(images.shape)]
    broadcast_object_list(header)
    count, *item_shape = header[0]
    processes, rank = state.num_processes, state.process_index

    def batches() -> Iterator[torch.Tensor]:
        num_batches = math.ceil(count / batch_size)
        for first in range(0, num_batches, processes):
            starts = [(first + p) * batch_size for p in range(processes)]
            sizes = [max(0, min(batch_size, count - start)) for start in starts]
            received = torch.empty(batch_size, *item_shape, dtype=torch.uint8, device=state.device)
            pieces = None
            if state.is_main_process:
                pieces = [torch.zeros_like(received) for _ in range(processes)]
                for piece, start, size in zip(pieces, starts, sizes, strict=True):
                    piece[:size] = images[start: start + size]
            torch.distributed.scatter(received, pieces, src=0)
            if sizes[rank]:
                yield received[: sizes[rank]]

    return count, batches()
