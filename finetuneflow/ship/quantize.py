"""GGUF quantization with llama.cpp's own quantizer, the types people ship to Ollama and LM Studio.

Two tools make GGUF files, and each output type comes from one of them (OUTTYPES below):
- llama.cpp's converter (`convert_hf_to_gguf.py`, ship/export.py `run_converter`) reads the
  Hugging Face folder and writes f32, f16, bf16 or q8_0 directly;
- llama.cpp's quantizer rewrites an f32/f16/bf16 GGUF as Q6_K, Q5_K_M, Q4_K_M, IQ4_XS or Q3_K_M (the
  types the converter cannot write), or q8_0. Without an importance matrix it runs in-process
  (`llama_model_quantize`, through llama-cpp-python's bindings); with one (`imatrix=`: llama.cpp's
  importance matrix, ship/imatrix.py) it runs as llama.cpp's own `llama-quantize` program (built by
  `make install-llama-tools` from the bindings' llama.cpp source; the bindings cannot load an
  importance matrix). Several types can be made from one source file in one call (`quantize_many`).

The source must be a 16- or 32-bit GGUF: quantizing an already-quantized file rounds twice.
Each output is written under a temporary name and renamed into place when llama.cpp succeeds,
so a failed or interrupted run leaves nothing half-written.
"""
from __future__ import annotations

import ctypes
import time
from pathlib import Path

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_path

# Every GGUF type the project writes: which tool makes it, and why a user picks it.
OUTTYPES = {
    "f32": {"made_by": "converter", "why": "exact copy of the weights (4 bytes each): the reference for parity checks"},
    "f16": {"made_by": "converter", "why": "half the size of f32, near-exact; the usual source for the quantizer"},
    "bf16": {"made_by": "converter",
             "why": "f32's range in 2 bytes, for models trained in bf16; a quantizer source too"},
    "q8_0": {"made_by": "converter or quantizer",
             "why": "8-bit, about a quarter of f32, close to f16 quality; the safe CPU default"},
    "q6_k": {"made_by": "quantizer", "why": "6.6 bits per weight, nearly q8_0 quality at 80% of its size"},
    "q5_k_m": {"made_by": "quantizer", "why": "5.7 bits per weight, a common quality/size balance in LM Studio"},
    "q4_k_m": {"made_by": "quantizer",
               "why": "4.9 bits per weight, Ollama's default download: smallest that usually keeps quality"},
    "iq4_xs": {"made_by": "quantizer",
               "why": "4.25 bits per weight (non-linear): smaller than q4_k_m; wants an importance matrix"},
    "q3_k_m": {"made_by": "quantizer", "why": "3.9 bits per weight: the smallest k-quant here; wants an importance "
                                              "matrix and a gate that passes"},
}
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
SOURCE_TYPES = ("f32", "f16", "bf16")
# llama.cpp's llama_ftype values (include/llama.h) for the types its quantizer writes here
QUANTIZER_FTYPES = {"q8_0": 7, "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "iq4_xs": 30}
IMATRIX_TYPES = ("q6_k", "q5_k_m", "q4_k_m", "iq4_xs", "q3_k_m")    # the types an importance matrix changes


def normalize_qtype(qtype: str) -> str:
    name = str(qtype).strip().lower().replace("-", "_")
    if name not in QUANTIZER_FTYPES:
        choices = ", ".join(q.upper() for q in QUANTIZER_FTYPES)
        hint = (f"; {name} comes from the converter: python export_gguf.py --OUTTYPE={name}"
                if name in CONVERTER_TYPES else "")
        raise UserError(f"quantization type {qtype!r} is not one llama.cpp's quantizer writes here ({choices}){hint}")
    return name


def source_type(path: Path) -> str:
    """The source GGUF's file type, read by llama.cpp with the vocabulary only (no weights)."""
    from finetuneflow.model.backends.llamacpp_bindings import bindings, file_type_name, llama_log, load_error
    llama_cpp = bindings()
    from llama_cpp import _internals
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with llama_log() as log:
        try:
            model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError:
            raise UserError(f"llama.cpp cannot read {path.name}: {load_error(log)}") from None
    try:
        return file_type_name(model.metadata())
    finally:
        model.close()


def quantize(source_gguf: str | Path, out_gguf: str | Path, qtype: str, *, n_threads: int | None = None,
             imatrix: str | Path | None = None, log=print) -> dict:
    """Write `out_gguf` as `qtype` (one of QUANTIZER_FTYPES) from an f32/f16/bf16 `source_gguf`,
    with llama.cpp's importance matrix `imatrix` when given (k-quants and iq types only)."""
    from finetuneflow.contract.paths import resolve
    from finetuneflow.model.backends.llamacpp_bindings import (bindings, default_threads, gguf_file, llama_log,
                                                               load_error)
    qtype = normalize_qtype(qtype)
    if imatrix is not None and qtype in IMATRIX_TYPES:
        return quantize_with_tool(source_gguf, out_gguf, qtype, imatrix, n_threads=n_threads, log=log)
    llama_cpp = bindings()
    source = gguf_file(source_gguf)
    kind = source_type(source)
    if kind not in SOURCE_TYPES:
        raise UserError(f"{source.name} is already {kind}: quantize from an f16, bf16 or f32 GGUF so the weights are "
                        f"rounded once (python export_gguf.py --OUTTYPE=f16 writes one)")
    out = resolve(out_gguf)
    if out.resolve() == source.resolve():
        raise UserError(f"the output {out} is the source file; choose another name")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZER_FTYPES[qtype]
    params.nthread = n_threads or default_threads()
    start = time.perf_counter()
    log(f"quantizing {source.name} ({kind}) -> {out.name} ({qtype.upper()}) with llama.cpp's quantizer")
    with atomic_path(out) as tmp, llama_log() as messages:
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0 or not tmp.is_file():
            raise UserError(f"llama.cpp's quantizer failed on {source.name} -> {qtype}: {load_error(messages)}")
        fallback = _fallbacks(list(messages))
    report = {"source": str(source), "source_type": kind, "output": str(out), "qtype": qtype,
              "bytes": out.stat().st_size, "source_bytes": source.stat().st_size,
              "seconds": round(time.perf_counter() - start, 2), "why": OUTTYPES[qtype]["why"]}
    if fallback:   # k-quant blocks span 256 weights: narrower rows get another type
        report["fallback"] = fallback
    log(f"wrote {out.name}: {report['bytes'] / 1e6:.1f} MB ({report['bytes'] / report['source_bytes']:.0%} of the "
        f"source) in {report['seconds']} s")
    return report


def _fallbacks(messages: list[str]) -> dict | None:
    """The tensors llama.cpp wrote in another type (k-quant blocks span 256 weights)."""
    fallbacks = sorted({line.split("falling back to", 1)[1].strip() for line in messages
                        if "-> falling back to" in line})
    summary = next((line.split("WARNING:", 1)[1].strip() for line in messages
                    if "required fallback quantization" in line), None)
    if not fallbacks and not summary:
        return None
    return {"tensors": summary, "types": fallbacks,
            "why": "rows not divisible by 256 (a k-quant block) use another type"}


def quantize_with_tool(source_gguf: str | Path, out_gguf: str | Path, qtype: str, imatrix: str | Path, *,
                       n_threads: int | None = None, log=print) -> dict:
    """`llama-quantize --imatrix <file> <source> <out> <TYPE> <threads>` (the bindings cannot load an
    importance matrix); written under a temporary name like `quantize`."""
    import subprocess

    from finetuneflow.contract.paths import resolve
    from finetuneflow.model.backends.llamacpp_bindings import default_threads, gguf_file
    from finetuneflow.ship.llama_tools import find_tool, missing
    program = find_tool("llama-quantize")
    if program is None:
        raise UserError(f"quantizing with an importance matrix needs llama.cpp's llama-quantize: "
                        f"{missing('llama-quantize')}")
    source, out = gguf_file(source_gguf), resolve(out_gguf)
    start = time.perf_counter()
    log(f"quantizing {source.name} -> {out.name} ({qtype.upper()}) with llama-quantize and the importance matrix "
        f"{Path(imatrix).name}")
    with atomic_path(out) as tmp:
        result = subprocess.run([str(program), "--imatrix", str(imatrix), str(source), str(tmp), qtype.upper(),
                                 str(n_threads or default_threads())], capture_output=True, text=True, timeout=7200)
        lines = (result.stdout + result.stderr).splitlines()
        if result.returncode != 0 or not tmp.is_file():
            reason = next((line.strip() for line in reversed(lines) if "error" in line.lower() or "failed" in line),
                          lines[-1].strip() if lines else f"exit code {result.returncode}")
            raise UserError(f"llama-quantize failed on {source.name} -> {qtype} with {Path(imatrix).name}: "
                            f"{reason[:300]}")
    report = {"source": str(source), "source_type": source_type(source), "output": str(out), "qtype": qtype,
              "bytes": out.stat().st_size, "source_bytes": source.stat().st_size, "tool": str(program),
              "imatrix": str(imatrix), "seconds": round(time.perf_counter() - start, 2), "why": OUTTYPES[qtype]["why"]}
    if fallback := _fallbacks(lines):
        report["fallback"] = fallback
    log(f"wrote {out.name}: {report['bytes'] / 1e6:.1f} MB ({report['bytes'] / report['source_bytes']:.0%} of the "
        f"source) in {report['seconds']} s")
    return report


def quantize_many(source_gguf: str | Path, out_dir: str | Path, qtypes, *, stem: str | None = None,
                  n_threads: int | None = None, log=print) -> list[dict]:
    """Several types from one source: `<out_dir>/<stem>-<qtype>.gguf` each (stem: the source's name
    without its own type suffix). All types are checked before the first file is written."""
    from finetuneflow.contract.paths import resolve
    from finetuneflow.model.backends.llamacpp_bindings import gguf_file
    names = [normalize_qtype(q) for q in ([qtypes] if isinstance(qtypes, str) else qtypes)]
    if not names:
        raise UserError("no quantization type given; pick from " + ", ".join(q.upper() for q in QUANTIZER_FTYPES))
    source = gguf_file(source_gguf)
    if stem is None:
        stem = source.stem
        for suffix in SOURCE_TYPES:
            stem = stem.removesuffix(f"-{suffix}")
    folder = resolve(out_dir)
    return [quantize(source, folder / f"{stem}-{name}.gguf", name, n_threads=n_threads, log=log)
            for name in dict.fromkeys(names)]
