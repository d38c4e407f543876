"""Several models in one server: `--model_dir` holding one directory per model, each what
`save_pretrained` writes, each served under its directory's name with its own labels, engine file
and engine choice.

kserve's `ModelRepository` is the extension point: its V2 repository endpoints (`load`, `unload`)
call it, and kserve 0.21's `load` is a stub, so `AudioModelRepository.load` builds the model from
its directory (a model added to the volume after the start serves without a restart). The models
share what makes them one server: the thread every forward pass runs on, so that their passes
take turns (two busy models alternate pass by pass, each request's windows in turn within its
model's queue), and the numbers admission reads, so that a request's wait counts every model's
windows ahead of it.
"""

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

from kserve.errors import InvalidInput, ModelNotReady
from kserve.model_repository import ModelRepository
from kserve.protocol.model_repository_extension import ModelRepositoryExtension

from .checkpoint import ModelLoadError, is_model_directory, model_directories
from .config import Config
from .model import ASTModel, Threads
from .protocol.kserve import NotServed
from .queue_state import QueueState

logger = logging.getLogger(__name__)


def model_names(model_dir: str) -> Optional[list[str]]:
    """The models of a repository: a directory holding two or more model directories (each with a
    config.json), in name order. None where `model_dir` is one model: a model directory, one model
    directory one level down (served under --model_name, as KServe's storage initializer may copy
    a single model there), or a hub id."""
    directory = Path(model_dir)
    if not directory.is_dir() or (directory / "config.json").is_file():
        return None
    names = on_volume(directory)
    return names if len(names) > 1 else None


def on_volume(directory: Path) -> list[str]:
    """The model directories in `directory`, by name."""
    return sorted(entry.name for entry in model_directories(directory))


class AudioModelRepository(ModelRepository):
    def __init__(self, config: Config, threads: int, device: str, latency_logging: bool = False):
        """`latency_logging`: kserve's --enable_latency_logging, which kserve hands only to the
        models it is given at the start; a model loaded later gets it here."""
        super().__init__(config.model_dir)
        self.config, self.threads, self.device = config, threads, device
        self.latency_logging = latency_logging
        self.state = QueueState.local()
        self.shared = Threads.make(threads)
        self.loading: dict[str, asyncio.Task] = {}  # one load of a name at a time, whoever waits for it
        self.failed: dict[str, str] = {}  # why the last load of a name failed, until one succeeds: for the index

    def model(self, name: str) -> ASTModel:
        """The model in the repository's `name` directory, not loaded yet."""
        config = replace(self.config, model_dir=str(Path(self.models_dir) / name), model_name=name)
        return ASTModel(config, threads=self.threads, device=self.device, state=self.state, shared=self.shared)

    async def load(self, name: str) -> bool:
        """The V2 repository API's load of a model directory (`VolumeIndex` checks that it is one):
        the model, built and loaded (its engine exported and timed where its cache has none, off the
        event loop), then served. A model already served is left as it is; a load under way is
        waited for. A load goes on when its caller stops waiting (a client's timeout, during an
        export that takes minutes): it ends served, as asked, rather than thrown away for the next
        try to start over."""
        if name in self.models:
            return True
        if name not in self.loading:
            self.loading[name] = asyncio.get_running_loop().create_task(self._load(name))
            self.loading[name].add_done_callback(lambda _: self.loading.pop(name))
        return await asyncio.shield(self.loading[name])

    async def _load(self, name: str) -> bool:
        model = self.model(name)
        try:
            await asyncio.to_thread(model.load)
        except Exception as exc:  # said here too: its caller may have stopped waiting
            logger.exception("Loading model %s from the repository %s failed", name, self.models_dir)
            self.failed[name] = f"load failed: {exc}"
            raise
        self.failed.pop(name, None)
        model.enable_latency_logging = self.latency_logging
        self.update(model)
        logger.info("Loaded model %s from the repository %s", name, self.models_dir)
        return model.ready


class VolumeIndex(ModelRepositoryExtension):
    """kserve's V2 repository API, whose index also lists the model directories on the volume that
    are not served (unloaded, or copied there after the start), `NotReady` and "not loaded", as
    Triton's index lists a repository's unloaded models: what a client may load (the reason says
    "loading" while a load is under way, and why the last load failed). Loading a name that is no
    model directory there is a 404, and a model that cannot be loaded from its files a 400 that
    says why: kserve answers both 503 "not ready", which invites retries that fail the same way.
    An unload waits for a load of the name under way: else it would be a 404, and the model would
    be served a moment later all the same."""

    def __init__(self, repository: AudioModelRepository):
        super().__init__(repository)
        self.repository = repository

    async def load(self, model_name: str) -> None:
        if not is_model_directory(Path(self.repository.models_dir) / model_name):
            raise NotServed(f"no model directory '{model_name}' (a name of letters, digits, '.', '_' or '-', holding "
                            f"a config.json) in {self.repository.models_dir}")
        try:
            loaded = await self.repository.load(model_name)
        except ModelLoadError as exc:
            raise InvalidInput(f"model {model_name} cannot be loaded from {self.repository.models_dir}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - as kserve answers it: not ready (503)
            raise ModelNotReady(model_name, f"{type(exc).__name__}: {exc}") from exc
        if not loaded:
            raise ModelNotReady(model_name)

    async def unload(self, model_name: str) -> None:
        loading = self.repository.loading.get(model_name)
        if loading is not None:
            await asyncio.wait([loading])  # however it ends: its outcome is its own caller's
        await super().unload(model_name)

    async def index(self, filter_ready: Optional[bool] = False) -> list[dict[str, str]]:
        listed = await super().index(filter_ready)
        if not filter_ready:
            served = {entry["name"] for entry in listed}
            listed += [{"name": name, "state": "NotReady", "reason": self._reason(name)}
                       for name in on_volume(Path(self.repository.models_dir)) if name not in served]
        return sorted(listed, key=lambda entry: entry["name"])

    def _reason(self, name: str) -> str:
        """Why a model directory on the volume is not served."""
        if name in self.repository.loading:
            return "loading"
        return self.repository.failed.get(name, "not loaded")
