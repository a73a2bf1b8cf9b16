"""Phase II: the model submission, the organizers' way.

``export`` writes the files (the ``model.py`` zip from ``model_template``, the ONNX file, the
in-process ``.pt2``) with their budget report and ``parity`` checks; ``codegen`` runs the organizers'
ONNX converter; ``legacy_env`` checks a file against their Python 3.6 / torch 1.5 / onnx 1.11
without them; ``check`` runs the organizers' checks on a file (``check_child`` in an ``isolated``
process); ``files`` loads a file back as a
model; ``score`` attacks it (``./run.sh evaluate eval.file=FILE``) and ``draws`` gives the
Phase-II-like score over randomly drawn white-box attacks.
"""
