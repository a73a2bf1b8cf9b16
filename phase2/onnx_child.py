"""What ``check-submission`` runs of an .onnx file, in the boxed process of
:func:`phase2.isolated.run_isolated`: onnxruntime and the organizers' converter (its generated
code is executed too), under the same time limit and box as a zip's ``model.py``; a graph can
compute without end (a ``Loop`` of 1e15 iterations) and the generated code is code.

``python -I -c ... ONNX WORKDIR REQUEST --result-fd=N`` (:func:`command`): ONNX and REQUEST are
``/proc/self/fd/M`` names of open unnamed files (the file's bytes; a ``torch.save`` of the
settings and the images to record outputs on). Each step's result is one JSON line on N, as in
:mod:`phase2.check_child`: the output size of each for a zero input, the generated source,
ptflops and FlopCounterMode on the converted module, and each one's log-probabilities on the
images (``calls`` times on ``x``, then ``pad_calls`` times on ``x[:2]``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(onnx_path: str, workdir: str, request_path: str) -> list[str]:
    """The argv that runs :func:`main` in a fresh ``python -I`` with only this project importable."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from phase2.onnx_child import main; main()"
    return [sys.executable, "-I", "-c", code, onnx_path, workdir, request_path]


def record(report, key: str, fn) -> object | None:
    """``fn()`` reported as ``key`` (its error as ``key_error``); returns it, or None after an error."""
    from phase2.check_child import last_line

    try:
        value = fn()
    except Exception as exc:  # onnxruntime, the generator and generated code raise their own types
        report(**{f"{key}_error": last_line(exc)})
        return None
    report(**{key: value})
    return value


def outputs(fn, torch, request: dict) -> dict:
    with torch.no_grad():
        x = request["x"]
        return {
            "on_x": [fn(x).tolist() for _ in range(request["calls"])],
            "in_a_row": [fn(x[:2]).tolist() for _ in range(request["pad_calls"])],
        }


def main() -> None:
    from phase2.check_child import last_line, reporter, take_result_channel

    report = reporter(take_result_channel())
    onnx_path, workdir, request_path = sys.argv[1:4]
    import onnx
    import torch

    from phase2 import codegen, onnx_file

    request = torch.load(request_path, weights_only=True)
    data = Path(onnx_path).read_bytes()
    try:
        session = onnx_file.create_session(data)
    except Exception as exc:  # onnxruntime raises its own types on a graph it cannot load
        report(ort_numel_error=last_line(exc))
    else:
        run_onnxruntime(report, session, request)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    try:
        model, source = codegen.convert(onnx.load_from_string(data), Path(workdir))
    except Exception as exc:  # the generator, or the generated code on import, whatever it raises
        report(converted_error=f"{exc}"[:300])
    else:
        report(source=source)
        run_converted(report, model, request)
    report(done=True)


def run_onnxruntime(report, session, request: dict) -> None:
    import torch

    from phase2 import onnx_file

    size = request["image_size"]
    zeros = torch.zeros(1, 3, size, size)
    if record(report, "ort_numel", lambda: int(onnx_file.run_session(session, zeros).numel())) is not None:
        record(report, "ort_outputs", lambda: outputs(lambda v: onnx_file.run_session(session, v), torch, request))


def run_converted(report, model, request: dict) -> None:
    import torch

    from phase2.complexity import count_ptflops
    from phase2.export import count_gmacs

    size = request["image_size"]
    with torch.no_grad():
        if record(report, "gen_numel", lambda: int(model(torch.zeros(1, 3, size, size)).numel())) is None:
            return
    record(report, "ptflops", lambda: list(count_ptflops(model, (3, size, size))))
    record(report, "our_gmacs", lambda: count_gmacs(model, size))
    record(report, "gen_outputs", lambda: outputs(model, torch, request))
