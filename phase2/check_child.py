"""The organizers' zip check, run by ``check-submission`` in a fresh ``python -I`` process.

``python -I phase2/check_child.py ZIP WORKDIR REQUEST --result-fd=N`` (started by
:func:`phase2.isolated.run_isolated`, in its box; ZIP and REQUEST: ``/proc/self/fd/M`` names of
open files, the zip and an unnamed ``torch.save`` file).
Nothing of this project is imported here, and an import hook makes ``timm`` and the project's
packages unimportable (the organizers' environment had neither), so a ``model.py`` that needs
them fails as it would there. The steps are theirs
(``torch/check_model.py`` of their helper repository): ``shutil.unpack_archive``,
``sys.path.append``, ``from model import Model; Model().float()``, ptflops at 3 x S x S, the
output size for a zero input; then what ``check-submission`` compares in its own process
without running ``model.py`` there: the model's outputs on the images of REQUEST (a
``torch.save`` file), under the given seeds, and a few calls in a row (the random pad's draws).

Each step's result is one JSON line on the descriptor N, which is taken out of ``sys.argv`` and
made non-inheritable before ``model.py`` is imported; stdout and stderr are only a log.
"""

import importlib.abc
import json
import os
import resource
import shutil
import sys
import traceback
import zipfile


class Blocker(importlib.abc.MetaPathFinder):
    """Refuses the named top-level packages, as an environment without them would."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named '{fullname}' (not in the organizers' environment)")
        return None


def last_line(exc):
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1][:300] if text else ''}"


def take_result_channel():
    """The result descriptor from ``--result-fd=N``, removed from argv and closed to children."""
    for arg in sys.argv[1:]:
        if arg.startswith("--result-fd="):
            fd = int(arg.split("=", 1)[1])
            sys.argv.remove(arg)
            os.set_inheritable(fd, False)
            return fd
    raise SystemExit("usage: check_child.py ZIP WORKDIR REQUEST --result-fd=N")


def reporter(fd):
    def report(**fields):
        data = (json.dumps(fields) + "\n").encode("utf-8")
        while data:
            data = data[os.write(fd, data) :]

    return report


def unpack(zip_path, workdir, limit):
    """``shutil.unpack_archive`` as the organizers call it, once the declared sizes are known to fit."""
    with zipfile.ZipFile(zip_path) as zf:
        total = sum(i.file_size for i in zf.infolist())
    if total > limit:
        raise ValueError(f"the members unpack to {total} bytes, more than {limit}")
    shutil.unpack_archive(zip_path, workdir, "zip")


def outputs(model, torch, x, seeds, calls):
    """The model's output on ``x`` after ``torch.manual_seed(s)`` for each of ``seeds`` (None: no
    reseed), then ``calls`` more calls in a row on ``x[:2]`` (a random layer draws anew each)."""
    out = {"seeded": [], "in_a_row": []}
    with torch.no_grad():
        for seed in seeds:
            if seed is not None:
                torch.manual_seed(seed)
            out["seeded"].append(model(x).tolist())
        for _ in range(calls):
            out["in_a_row"].append(model(x[:2]).tolist())
    return out


def main(zip_path, workdir, request_path, report):
    import torch  # what the organizers' environment had (with ptflops)

    request = torch.load(request_path, weights_only=True)  # read before any code of the zip runs
    settings = request["settings"]
    # No file it writes may grow past what the zip may unpack to (a model.py printing without end).
    limit = settings["max_unpacked"] + (64 << 20)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.meta_path.insert(0, Blocker(settings["blocked"]))
    try:
        os.makedirs(workdir, exist_ok=True)
        unpack(zip_path, workdir, settings["max_unpacked"])
        sys.path.append(workdir)
        from model import Model

        model = Model().float()
    except BaseException as exc:  # every failure, SystemExit included, is the check's result
        report(load=last_line(exc), trace=traceback.format_exc(limit=3))
        return
    report(load="ok")
    from ptflops import get_model_complexity_info
    from torch.utils.flop_counter import FlopCounterMode

    size = settings["image_size"]
    try:
        macs, params = get_model_complexity_info(model, (3, size, size), **settings["ptflops"])
        report(macs=macs, params=params)
    except BaseException as exc:
        report(macs_error=last_line(exc))
    try:
        model.eval()
        with torch.no_grad():
            report(numel=int(model(torch.zeros(1, 3, size, size)).numel()))
    except BaseException as exc:
        report(output_error=last_line(exc))
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.rand(1, 3, size, size))
        report(our_gmacs=counter.get_total_flops() / 2 / 1e9)
    except BaseException as exc:
        report(our_gmacs_error=last_line(exc))
    if request.get("x") is not None:
        try:
            report(outputs=outputs(model, torch, request["x"], request["seeds"], request["calls"]))
        except BaseException as exc:
            report(outputs_error=last_line(exc))
    report(done=True)


if __name__ == "__main__":
    channel = take_result_channel()
    args = list(sys.argv[1:4])
    del sys.argv[1:]
    # `python -I script` puts the script's folder (this project's infer/) first on sys.path: a
    # model.py importing a module from there would pass here and fail at the organizers'.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    main(*args, reporter(channel))
