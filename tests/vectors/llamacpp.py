"""Real llama.cpp through ctypes, from the prebuilt library in the `xllamacpp` wheel.

Only what the control-vector tests need: load a GGUF model, load a control vector with llama.cpp's own loader
(`common_control_vector_load`, the code behind `--control-vector-scaled FILE S`), attach it to a context with
`llama_set_adapter_cvec` exactly as llama.cpp's common init does (layers 1..n_layer), and decode greedily from token
ids.

The C structs passed by value (model, context and batch parameters) are handled as opaque blocks larger than the
real structs: on x86-64 such structs travel in memory (returned through a hidden pointer, passed as a copy on the
stack), so the library reads and writes only its own leading bytes. `common_control_vector_load` is C++: the library
is built with the pre-C++11 libstdc++ ABI (its symbols name `std::string` as `Ss`), in which a string is one pointer to
its characters preceded by a header {length, capacity, refcount}; a vector is {begin, end, end of storage}.
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import numpy as np

_CVEC_LOAD = "_Z26common_control_vector_loadRKSt6vectorI31common_control_vector_load_infoSaIS0_EE"
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _Blob(ctypes.Structure):
    """An opaque by-value struct, larger than any of the real ones it stands for."""

    _fields_ = [("raw", ctypes.c_ubyte * 1024)]


class _CvecData(ctypes.Structure):  # common_control_vector_data {int n_embd; std::vector<float> data;}
    _fields_ = [
        ("n_embd", ctypes.c_int),
        ("begin", ctypes.POINTER(ctypes.c_float)),
        ("end", ctypes.POINTER(ctypes.c_float)),
        ("cap", ctypes.POINTER(ctypes.c_float)),
    ]


class _LoadInfo(ctypes.Structure):  # common_control_vector_load_info {float strength; std::string fname;}
    _fields_ = [("strength", ctypes.c_float), ("fname", ctypes.c_void_p)]


class _Vector(ctypes.Structure):  # std::vector<common_control_vector_load_info>
    _fields_ = [("begin", ctypes.c_void_p), ("end", ctypes.c_void_p), ("cap", ctypes.c_void_p)]


def library_path() -> Path | None:
    """The llama.cpp shared library inside xllamacpp, or None where it cannot be used here."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    try:
        import xllamacpp
    except ImportError:
        return None
    found = sorted(Path(xllamacpp.__file__).parent.glob("xllamacpp*.so"))
    return found[0] if found else None


def _old_abi_string(text: bytes) -> tuple[ctypes.Array, int]:
    """A pre-C++11-ABI std::string's storage: header, characters, NUL. Refcount -1 marks it unshareable, so any
    copy llama.cpp makes is a fresh allocation of its own and ours is never freed by it."""
    header = 24  # size_t length, size_t capacity, int refcount (padded)
    buf = ctypes.create_string_buffer(header + len(text) + 1)
    ctypes.memmove(ctypes.addressof(buf) + header, text, len(text))
    ctypes.c_size_t.from_buffer(buf, 0).value = len(text)
    ctypes.c_size_t.from_buffer(buf, 8).value = len(text)
    ctypes.c_int.from_buffer(buf, 16).value = -1
    return buf, ctypes.addressof(buf) + header


class LlamaCpp:
    def __init__(self, library: Path, model_path: Path, n_ctx: int = 512) -> None:
        lib = ctypes.CDLL(str(library))
        self.lib = lib
        p, i32 = ctypes.c_void_p, ctypes.c_int32
        lib.llama_backend_init.restype = None
        lib.llama_model_default_params.restype = _Blob
        lib.llama_context_default_params.restype = _Blob
        lib.llama_model_load_from_file.argtypes = [ctypes.c_char_p, _Blob]
        lib.llama_model_load_from_file.restype = p
        lib.llama_init_from_model.argtypes = [p, _Blob]
        lib.llama_init_from_model.restype = p
        lib.llama_model_n_embd.argtypes = [p]
        lib.llama_model_n_embd.restype = i32
        lib.llama_model_n_layer.argtypes = [p]
        lib.llama_model_n_layer.restype = i32
        lib.llama_model_get_vocab.argtypes = [p]
        lib.llama_model_get_vocab.restype = p
        lib.llama_vocab_n_tokens.argtypes = [p]
        lib.llama_vocab_n_tokens.restype = i32
        lib.llama_vocab_is_eog.argtypes = [p, i32]
        lib.llama_vocab_is_eog.restype = ctypes.c_bool
        lib.llama_batch_get_one.argtypes = [ctypes.POINTER(i32), i32]
        lib.llama_batch_get_one.restype = _Blob
        lib.llama_decode.argtypes = [p, _Blob]
        lib.llama_decode.restype = i32
        lib.llama_get_logits_ith.argtypes = [p, i32]
        lib.llama_get_logits_ith.restype = ctypes.POINTER(ctypes.c_float)
        lib.llama_get_memory.argtypes = [p]
        lib.llama_get_memory.restype = p
        lib.llama_memory_clear.argtypes = [p, ctypes.c_bool]
        lib.llama_memory_clear.restype = None
        lib.llama_set_adapter_cvec.argtypes = [p, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, i32, i32, i32]
        lib.llama_set_adapter_cvec.restype = i32
        self._load_cvec = getattr(lib, _CVEC_LOAD)
        self._load_cvec.argtypes = [ctypes.POINTER(_Vector)]
        self._load_cvec.restype = _CvecData

        self._quiet = _LOG_CALLBACK(lambda level, text, user: None)  # llama.cpp's loading chatter, per tensor
        lib.llama_log_set.argtypes = [_LOG_CALLBACK, p]
        lib.llama_log_set.restype = None
        lib.llama_log_set(self._quiet, None)
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(str(model_path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.ctx = lib.llama_init_from_model(self.model, lib.llama_context_default_params())
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_embd = lib.llama_model_n_embd(self.model)
        self.n_layer = lib.llama_model_n_layer(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)

    def load_control_vector(self, path: Path, strength: float) -> np.ndarray:
        """llama.cpp's own loader on `path` at `strength` (what `--control-vector-scaled path strength` runs); returns
        the flat data it builds (layers 1..n, n_embd each) and attaches it to the context."""
        storage, chars = _old_abi_string(str(path).encode())
        info = _LoadInfo(strength, chars)
        start = ctypes.addressof(info)
        vec = _Vector(start, start + ctypes.sizeof(info), start + ctypes.sizeof(info))
        data = self._load_cvec(ctypes.byref(vec))
        del storage
        if data.n_embd == -1:
            raise RuntimeError(f"llama.cpp's control-vector loader refused {path}")
        count = (ctypes.addressof(data.end.contents) - ctypes.addressof(data.begin.contents)) // 4
        flat = np.ctypeslib.as_array(data.begin, shape=(count,)).copy()
        self.set_control_vector(flat)
        return flat

    def set_control_vector(self, flat: np.ndarray | None) -> None:
        if flat is None:  # detach: llama.cpp clears the adapter when given no data
            code = self.lib.llama_set_adapter_cvec(self.ctx, None, 0, self.n_embd, 1, self.n_layer)
        else:
            self._flat = np.ascontiguousarray(flat, dtype=np.float32)
            ptr = self._flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            code = self.lib.llama_set_adapter_cvec(self.ctx, ptr, self._flat.size, self.n_embd, 1, self.n_layer)
        if code != 0:
            raise RuntimeError(f"llama_set_adapter_cvec failed ({code})")

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Greedy decoding from token ids, on a cleared KV cache."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        tokens = (ctypes.c_int32 * len(prompt))(*prompt)
        out: list[int] = []
        batch = self.lib.llama_batch_get_one(tokens, len(prompt))
        for _ in range(max_tokens):
            if self.lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            token = int(np.argmax(logits))
            if self.lib.llama_vocab_is_eog(self.vocab, token):
                break
            out.append(token)
            tokens = (ctypes.c_int32 * 1)(token)
            batch = self.lib.llama_batch_get_one(tokens, 1)
        return out
