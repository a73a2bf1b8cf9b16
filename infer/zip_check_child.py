"""The organizers' zip check, run by ``check-submission`` in a fresh ``python -I`` process.

``python -I infer/zip_check_child.py ZIP WORKDIR SETTINGS_JSON``. Nothing of this project is
imported here, and an import hook makes ``timm`` and the project's packages unimportable (the
organizers' environment had neither), so a ``model.py`` that needs them fails as it would
there. The steps are theirs (``torch/check_model.py`` of their helper repository):
``shutil.unpack_archive``, ``sys.path.append``, ``from model import Model; Model().float()``,
ptflops at 3 x S x S, and the output size for a zero input. One JSON object on stdout.
"""

import importlib.abc
import json
import shutil
import sys
import traceback


class Blocker(importlib.abc.MetaPathFinder):
    """Refuses the named top-level packages, as an environment without them would."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named '{fullname}' (not in the organizers' environment)")
        return None


def last_line(exc):
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"


def main(zip_path, workdir, settings):
    sys.meta_path.insert(0, Blocker(settings["blocked"]))
    result = {}
    try:
        shutil.unpack_archive(zip_path, workdir, "zip")
        sys.path.append(workdir)
        from model import Model

        model = Model().float()
        result["load"] = "ok"
    except BaseException as exc:  # every failure is the check's result
        result["load"] = last_line(exc)
        result["trace"] = traceback.format_exc(limit=3)
        return result
    import torch
    from ptflops import get_model_complexity_info

    size = settings["image_size"]
    try:
        macs, params = get_model_complexity_info(model, (3, size, size), **settings["ptflops"])
        result["macs"], result["params"] = macs, params
    except BaseException as exc:
        result["macs_error"] = last_line(exc)
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.zeros(1, 3, size, size))
        result["numel"] = int(output.numel())
    except BaseException as exc:
        result["output_error"] = last_line(exc)
    return result


if __name__ == "__main__":
    out = main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    sys.stdout.write("\nRESULT " + json.dumps(out) + "\n")
