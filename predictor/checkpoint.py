"""Where a checkpoint is and what comes with it: the model directory KServe mounts (or a hub id), its
config, the feature extractor saved beside the weights, and the torch module only when something
asks for it. Shared by the server, the export and calibration children, `compare` and
`pack_model`, none of which needs the server's kserve.Model to find them.

The torch module is loaded lazily because a server whose engine file is packed or cached never
runs it: ONNX Runtime and OpenVINO read their own files. Not importing transformers' modeling code
and not reading the weights into torch is a large part of the time to ready (`make bench`, section
8), and keeps a second copy of the weights out of the server's memory.
"""

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from transformers import ASTFeatureExtractor, AutoConfig, PretrainedConfig

if TYPE_CHECKING:
    from transformers import ASTForAudioClassification

logger = logging.getLogger(__name__)

AST_MODEL_TYPE = "audio-spectrogram-transformer"


class ModelLoadError(RuntimeError):
    """Nothing loadable at the configured location; the message says where we looked."""


@dataclass
class Checkpoint:
    source: str
    """A local model directory, or a hub id."""
    config: PretrainedConfig
    loaded: Optional["ASTForAudioClassification"] = None
    """The torch module once `module()` has loaded it (or as a caller that has one hands it over)."""

    @classmethod
    def open(cls, model_dir: str, weights: bool = True) -> "Checkpoint":
        """The checkpoint at `model_dir` (see `resolve_model_source`), its config read and checked.

        A hub id's weights are fetched now, as the export's child process runs offline; with
        `weights` False (a frontend, which runs no engine), its config and extractor alone."""
        source = resolve_model_source(model_dir)
        local = Path(source).is_dir()
        if local:
            check_readable(source)
        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001 - JSON, a value of the wrong type (transformers' strict config), ...
            if local:
                raise ModelLoadError(f"{Path(source, 'config.json')} is not a model config transformers can read: "
                                     f"{type(exc).__name__}: {exc}") from None
            raise ModelLoadError(
                f"could not load an AST model from '{model_dir}': it is not a local directory holding "
                f"config.json and weights, and fetching it as a hub id failed ({exc}). Point --model_dir "
                "(or AST_MODEL_DIR) at a local directory, e.g. one written by save_pretrained."
            ) from exc
        if config.model_type != AST_MODEL_TYPE:
            raise ModelLoadError(f"'{model_dir}' holds a {config.model_type} model, not AST")
        checkpoint = cls(source, config)
        if weights and not local:
            checkpoint.module()
        return checkpoint

    def module(self) -> "ASTForAudioClassification":
        """The transformers model in eval mode, loaded on first use."""
        if self.loaded is None:
            from transformers import ASTForAudioClassification

            logger.info("Loading the torch model from %s", self.source)
            try:
                self.loaded = ASTForAudioClassification.from_pretrained(self.source, attn_implementation="sdpa").eval()
            except Exception as exc:  # noqa: BLE001 - a truncated file (safetensors' own error), shapes unlike the config, ...
                files = ", ".join(path.name for path in weight_files(self.source)) or "none found"
                raise ModelLoadError(f"could not load the weights of '{self.source}' ({files}): "
                                     f"{type(exc).__name__}: {exc}") from None
        return self.loaded

    def unloaded(self) -> "Checkpoint":
        """The same checkpoint, whose module will be loaded afresh: torch's bf16 and int8 engines
        convert a module in place, so each engine built in turn needs its own."""
        return replace(self, loaded=None)


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A model directory's name is a model's in URL paths (`repository`): letters, digits, '.', '_' and
'-' (no ':', which V1 paths use before the verb; no hidden directories)."""


def is_model_directory(path: Path) -> bool:
    return bool(MODEL_NAME.fullmatch(path.name)) and (path / "config.json").is_file()


def model_directories(directory: Path) -> list[Path]:
    """The model directories in `directory`: what the one-model-one-level-down rule and a
    repository both count, so that they agree on how many there are."""
    return [entry for entry in directory.iterdir() if is_model_directory(entry)]


def resolve_model_source(model_dir: str) -> str:
    """A local directory (or the one model directory inside it), else the string as a hub id.

    KServe's storage initializer copies a bucket prefix into /mnt/models as is, so a model saved
    one level down (`gs://bucket/models/` holding `ast/config.json`) is found too.
    """
    scheme = re.match(r"([a-z][a-z0-9+.-]*)://", model_dir)
    if scheme:
        raise ModelLoadError(
            f"--model_dir '{model_dir}' is a {scheme.group(1)}:// URI, which this server does not fetch: set it as the "
            "InferenceService's storageUri (KServe's storage initializer copies it into /mnt/models before the "
            "server starts) and pass --model_dir=/mnt/models"
        )
    path = Path(model_dir)
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        nested = model_directories(path)
        if len(nested) == 1:
            return str(nested[0])
        raise ModelLoadError(
            f"'{model_dir}' is a directory but holds no config.json (nor one subdirectory with one); "
            f"it contains: {sorted(p.name for p in path.iterdir())[:20]}"
        )
    if path.is_absolute() or model_dir.startswith(("./", "../", "~")) or os.sep * 2 in model_dir:
        raise ModelLoadError(f"model directory '{model_dir}' does not exist")
    return model_dir


def weight_files(source: str) -> list[Path]:
    """The weight files of a model directory, or of the local snapshot a hub id was loaded from."""
    directory = Path(source)
    if not directory.is_dir():
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(source, "config.json")
        if not isinstance(config, str):  # not cached (None), or cached as missing
            return []
        directory = Path(config).parent
    return sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin"))


def check_readable(directory: str) -> None:
    """Weights missing, or a file there that the server's user may not read (a root-owned file of
    mode 600, as a copy from a root-owned volume leaves it), said as such: transformers would report
    a failed download, or quietly use default features for an unreadable preprocessor config."""
    files = weight_files(directory)
    if not files:
        raise ModelLoadError(f"'{directory}' holds config.json but no weights (*.safetensors or *.bin): "
                             "copy the whole directory save_pretrained wrote")
    configs = [Path(directory) / name for name in ("config.json", "preprocessor_config.json")]
    for path in [p for p in configs if p.is_file()] + files:
        try:
            with open(path, "rb"):
                pass
        except PermissionError:
            raise ModelLoadError(
                f"{path} exists, but this server's user (uid {os.getuid()}, gid {os.getgid()}) may not read it. "
                "Make it readable: set the pod's securityContext.fsGroup, or chmod a+r the file where the "
                "model is stored"
            ) from None


def load_feature_extractor(source: str, config: Any) -> ASTFeatureExtractor:
    """The saved preprocessor config if there is one, else AST's defaults sized to the model. One
    that is there but cannot be read is refused: its normalisation (mean, std) and rate are the
    fine-tune's, and AST's defaults in their place would serve wrong features without a word."""
    try:
        extractor = ASTFeatureExtractor.from_pretrained(source)
    except OSError as exc:
        saved = Path(source, "preprocessor_config.json")
        if saved.is_file():
            raise ModelLoadError(f"{saved} is not a feature extractor's config transformers can read: {exc}") from None
        extractor = ASTFeatureExtractor(num_mel_bins=config.num_mel_bins, max_length=config.max_length)
    if (extractor.num_mel_bins, extractor.max_length) != (config.num_mel_bins, config.max_length):
        raise ModelLoadError(
            f"feature extractor makes {extractor.num_mel_bins} mel bins x {extractor.max_length} frames "
            f"but the model expects {config.num_mel_bins} x {config.max_length}"
        )
    return extractor
