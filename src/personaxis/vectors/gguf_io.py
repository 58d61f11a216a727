"""llama.cpp control vectors: GGUF files with `general.architecture = "controlvector"`.

How llama.cpp reads them (its common control-vector loader and its adapter code): every tensor must be named
`direction.N`, 1-D float32 of the model's width, and is added, times the user's strength, to the output of block N
at every position. `direction.0` makes the whole file invalid ("there's never a tensor for layer 0"), so block 0
cannot be steered this way; export skips layer 0 with a warning (the command line says so in one line), or refuses it
when asked for. Otherwise `direction.N` is exactly personaxis layer N, with no shift. `strength` pre-scales the
directions so that llama.cpp's strength 1.0 is personaxis steering at that strength. llama.cpp ignores other
metadata keys, so the full personaxis metadata rides along under
`personaxis.*` and comes back on import.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from personaxis.errors import PersonaxisError
from personaxis.vectors._io import atomic_path, one_line
from personaxis.vectors.artifact import VectorMeta, Vectors, opposite, parse_meta

ARCH = "controlvector"
_DIRECTION = re.compile(r"direction\.(\d+)")


def export_gguf(
    vectors: Vectors,
    path: str | os.PathLike[str],
    name: str | None = None,
    scale: float = 1.0,
    *,
    layers: Sequence[int] | None = None,
    strength: float | None = None,
    units: str = "relative",
) -> Path:
    """Write one direction of `vectors` as a llama.cpp control vector, atomically.

    llama.cpp adds `its strength × direction.N` to the output of block N. Without `strength` the directions are
    written as stored (times `scale`), so llama.cpp's strength multiplies the raw vector. With `strength` they are
    pre-scaled to the shift personaxis steering adds at that strength, `strength · mean_norm_N · v̂_N` in relative units
    (the default) or `strength · v_N` in raw units, so that `--control-vector-scaled FILE 1.0` steers exactly as
    `steer_op(vectors, strength, layers, units=units)` does. How the file was scaled is written in its metadata
    (`personaxis.scaling`, and `gguf_scaling` in the restored artifact's `meta.extra`).

    `layers` defaults to every layer but 0 (left out with a warning); asking for layer 0, or for a layer the vectors
    do not cover, is refused.
    """
    from gguf import GGUFWriter

    name = vectors.resolve(name)
    if not math.isfinite(scale) or scale == 0:
        raise PersonaxisError(f"scale must be finite and non-zero, got {scale}")
    if strength is not None and not math.isfinite(strength):
        raise PersonaxisError(f"strength must be finite, got {strength}")
    if units not in ("relative", "raw"):
        raise PersonaxisError(f"units must be 'relative' or 'raw', got {units!r}")
    if layers is None:
        chosen = [i for i in vectors.layers if i > 0]
        if 0 in vectors.layers:
            warnings.warn(
                "llama.cpp control vectors cannot hold layer 0 (direction.0 is rejected): layer 0 left out",
                stacklevel=2,
            )
    else:
        chosen = sorted(set(layers))
        if 0 in chosen:
            raise PersonaxisError("llama.cpp control vectors cannot hold layer 0 (direction.0 is rejected)")
        missing = [i for i in chosen if i not in vectors.layers]
        if missing:
            raise PersonaxisError(f"the vectors have no direction at layer(s) {missing} (they cover {vectors.layers})")
    if not chosen:
        raise PersonaxisError("nothing to export: llama.cpp control vectors cannot hold layer 0, the only layer here")
    norms = vectors.meta.mean_norms or {}
    if strength is not None and units == "relative":
        missing = [i for i in chosen if i not in norms]
        if missing:
            raise PersonaxisError(
                f"no mean residual norm for layer(s) {missing}: give the strength in raw units (--units raw)"
            )
    rows: dict[int, torch.Tensor] = {}
    for layer in chosen:
        v = vectors.direction(layer, name).float()
        if strength is None:
            rows[layer] = v * scale
        elif units == "relative":
            rows[layer] = strength * float(norms[layer]) * scale * (v / v.norm())
        else:
            rows[layer] = strength * scale * v
        if not bool(torch.isfinite(rows[layer]).all()):  # float32 overflows past ~3.4e38
            factor = scale if strength is None else strength * scale
            raise PersonaxisError(
                f"refusing to write {path}: the direction at layer {layer} times {factor:g} is not finite in float32 "
                "(NaN or inf): use a smaller scale or strength"
            )
        if not bool(rows[layer].any()):  # float32 underflows below ~1e-45: a file that steers nothing
            factor = scale if strength is None else strength * scale
            raise PersonaxisError(
                f"refusing to write {path}: the direction at layer {layer} times {factor:g} is zero in float32: "
                "use a larger scale or strength"
            )
    sign = scale if strength is None else scale * strength
    if strength is None:
        scaling = {"mode": "unscaled", "scale": scale, "layers": chosen,
                   "note": "the stored vectors times scale; llama.cpp's strength multiplies them"}  # fmt: skip
    else:
        scaling = {"mode": "prescaled", "strength": strength, "units": units, "scale": scale, "layers": chosen,
                   "note": "llama.cpp strength 1.0 adds what personaxis steering adds at this strength"}  # fmt: skip
    meta = vectors.meta.model_copy(deep=True)
    meta.extra = {**meta.extra, "gguf_scale": scale}
    if strength is not None:
        meta.extra["gguf_scaling"] = scaling
    if sign < 0:
        meta.points_toward = opposite(meta.points_toward)
    with atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", str(meta.extra.get("model_type") or meta.model_id))
        writer.add_int32(f"{ARCH}.layer_count", len(chosen))
        writer.add_string("personaxis.name", name)
        writer.add_string("personaxis.meta", meta.model_dump_json())
        writer.add_string("personaxis.scaling", json.dumps(scaling))
        for layer in chosen:
            writer.add_tensor(f"direction.{layer}", rows[layer].numpy())
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return Path(path)


def import_gguf(
    path: str | os.PathLike[str],
    *,
    model_id: str | None = None,
    n_layers: int | None = None,
    name: str | None = None,
) -> Vectors:
    """Read a llama.cpp control vector back as `Vectors` (direction.N → layer N).

    Files written by `export_gguf` restore their metadata; others get what the file says (model hint, width) and
    `n_layers` defaults to one past the highest direction. All-zero directions steer nothing and are left out.
    """
    from gguf import GGMLQuantizationType, GGUFReader

    path = Path(path)
    if not path.is_file():
        raise PersonaxisError(f"no such file: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on foreign files
        raise PersonaxisError(f"{path} is not a readable GGUF file: {one_line(e)}") from None

    fields = {key: value.contents() for key, value in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise PersonaxisError(f"{path} is a GGUF for architecture {arch!r}, not a llama.cpp control vector")
    rows: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = _DIRECTION.fullmatch(tensor.name)
        if not match:
            raise PersonaxisError(f"{path}: unexpected tensor {tensor.name!r} in a control vector")
        if tensor.tensor_type != GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise PersonaxisError(f"{path}: {tensor.name} is not a 1-D float32 tensor")
        rows[int(match[1])] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    del reader  # release the memory map
    hint, stored_name, stored_meta = (
        fields.get(f"{ARCH}.model_hint"),
        fields.get("personaxis.name"),
        fields.get("personaxis.meta"),
    )
    if not rows:
        raise PersonaxisError(f"{path} holds no direction tensors")
    zero = sorted(i for i, v in rows.items() if not v.any())
    if zero:
        warnings.warn(f"{path}: all-zero directions at layers {zero} left out", stacklevel=2)
    layers = sorted(i for i in rows if i not in zero)
    if not layers:
        raise PersonaxisError(f"{path}: every direction is zero")
    hidden = rows[layers[0]].numel()
    if isinstance(stored_meta, str):
        meta = parse_meta(VectorMeta, stored_meta, path)
    else:
        meta = VectorMeta(
            model_id=str(hint or "unknown"),
            hidden_size=hidden,
            n_layers=max(rows) + 1,
            method="import:gguf",
            points_toward="the control vector's + direction, as llama.cpp adds it",
            aggregation="unknown",
            extra={"model_hint": hint} if hint else {},
        )
    updates: dict[str, object] = {}
    if model_id:
        updates["model_id"] = model_id
    if n_layers:
        updates["n_layers"] = n_layers
    meta = meta.model_copy(update=updates)
    if any(v.numel() != meta.hidden_size for v in rows.values()):
        raise PersonaxisError(f"{path}: directions do not all have width {meta.hidden_size}")
    key = name or (stored_name if isinstance(stored_name, str) else None) or "control"
    try:
        return Vectors(layers, {key: torch.stack([rows[i] for i in layers])}, meta)
    except PersonaxisError as e:
        raise PersonaxisError(f"{path}: {e}") from None
