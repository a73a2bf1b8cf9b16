"""Parameters and MACs as the organizers counted them: ``ptflops.get_model_complexity_info``.

Their check (``torch/check_model.py`` of their helper repository, April 2022) calls
``get_model_complexity_info(model, (3, 224, 224), as_strings=False, print_per_layer_stat=False)``
and asserts ``params < 30e6`` and ``flops < 5e9``. The ptflops of that time (0.6.8 / 0.6.9)
counted with module hooks only: convolutions, linear layers, norms, pools and activations
that are ``nn.Module`` instances; a ``torch.matmul`` or an ``F.*`` call inside a forward was
free. ptflops 0.7.5 (pinned here) keeps that counter as ``backend='pytorch'`` and adds the
functional calls by default, so :func:`count_ptflops` passes ``count_functional=False`` to
mirror 2022. Its "FLOPs" are multiply-accumulates; its parameters are the trainable
``nn.Parameter`` elements (buffers are not counted).
"""

from __future__ import annotations

import io

import torch
from torch import nn

ORGANIZERS_INPUT = (3, 224, 224)
# The keyword arguments of every ptflops call here (also handed to the zip check's clean process).
PTFLOPS_KWARGS = {
    "as_strings": False,
    "print_per_layer_stat": False,
    "backend": "pytorch",
    "backend_specific_config": {"count_functional": False},
}


def count_ptflops(model: nn.Module, input_res: tuple[int, int, int] = ORGANIZERS_INPUT) -> tuple[int, int]:
    """``(macs, params)`` of one forward of ``model`` on a 1 x ``input_res`` batch, as the organizers counted.

    Raises:
        RuntimeError: ptflops could not run the model (it prints the exception and returns None).
    """
    from ptflops import get_model_complexity_info

    with torch.no_grad():
        macs, params = get_model_complexity_info(model, tuple(input_res), ost=io.StringIO(), **PTFLOPS_KWARGS)
    if macs is None or params is None:
        raise RuntimeError("ptflops could not run the model")
    return int(macs), int(params)
