"""The headline GPU cases: one short list that says how every family does on a big GPU.

``python -m benchmarks --headline`` (what ``bash .ci/gpu`` runs, with ``--budget``) takes
the target workloads of the GPU verification issue, every provider each, then
``torch.compile`` of naive PyTorch for one case per family, in this order, so a run cut
short by its time budget has measured the sslops kernels first:

=====================  ========================  =========  ===========================
family                 case                      dtype      compile pass
=====================  ========================  =========  ===========================
InfoNCE / NT-Xent      N = 32768, K = 256        bf16       yes
InfoNCE                N = 262144, K = 256       bf16       no (naive: out of memory)
VICReg                 N = 2048, K = 8192        bf16, fp32 bf16
Barlow Twins           N = 2048, K = 8192        bf16, fp32 bf16
Matrix-SSL             N = 4096, K = 2048        fp32       yes
VICReg over G          N = 65536, K = 256        fp32       no (labels and pairs)
MCE(P, Q)              K = 2048                  fp32       no
CLIP, SigLIP           N = 65536, K = 512        bf16       no (naive: dense, ~17 GB)
RankMe                 N = 65536, K = 2048       fp32       no (naive: svdvals)
=====================  ========================  =========  ===========================
"""

from __future__ import annotations

import dataclasses

import torch

from .bench_barlow_twins import barlow_case
from .bench_clip import clip_case
from .bench_infonce import info_nce_case
from .bench_mce import mce_case, mce_pq_case
from .bench_metrics import rankme_case
from .bench_siglip import siglip_case
from .bench_vicreg import relation_case, vicreg_case

COMPILE_PASS_NOTE = "compile pass: the sslops providers of this case were timed in the headline pass above"


def _named(case, name):
    """The case under a name of its own (two relation cases would otherwise share one title)."""
    return dataclasses.replace(case, name=name)


def headline_cases():
    """Every headline case with every provider but ``compile`` (first pass)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    return [
        info_nce_case(32768, 256, bf16, compile=False, note="headline"),
        info_nce_case(262144, 256, bf16, compile=False, note="headline: naive runs out of memory"),
        vicreg_case(2048, 8192, bf16, compile=False, note="headline"),
        vicreg_case(2048, 8192, fp32, compile=False, note="headline"),
        barlow_case(2048, 8192, bf16, compile=False, note="headline"),
        barlow_case(2048, 8192, fp32, compile=False, note="headline"),
        mce_case(4096, 2048, compile=False, note="headline"),
        _named(relation_case(65536, 256, fp32, relation="labels", compile=False), "vicreg_relation[labels]"),
        _named(relation_case(65536, 256, fp32, relation="pairs", compile=False), "vicreg_relation[pairs]"),
        mce_pq_case(2048, compile=False, note="headline"),
        clip_case(65536, 512, bf16, compile=False, note="headline"),
        siglip_case(65536, 512, bf16, compile=False, note="headline"),
        rankme_case(65536, 2048, fp32, note="headline"),
    ]


def compile_cases(device):
    """One case per family again, with naive PyTorch and ``torch.compile`` of it only (second pass)."""
    import sslops

    picks = [info_nce_case(32768, 256, torch.bfloat16), vicreg_case(2048, 8192, torch.bfloat16),
             barlow_case(2048, 8192, torch.bfloat16), mce_case(4096, 2048)]
    out = []
    for case in picks:
        skip = {b: "timed in the headline pass above" for b in sslops.kernel_backends(case.loss, device)}
        out.append(dataclasses.replace(case, compile=True, extra={}, skip_backends=skip, note=COMPILE_PASS_NOTE))
    return out


def cases(device):
    """[(stem, case)]: the headline pass, then the compile pass."""
    stems = {"info_nce": "infonce", "vicreg": "vicreg", "vicreg_relation": "vicreg", "barlow_twins": "barlow_twins",
             "matrix_ssl": "mce", "matrix_cross_entropy": "mce", "clip": "clip", "siglip": "siglip",
             "rankme": "metrics"}
    return [(stems[c.loss], c) for c in headline_cases() + compile_cases(device)]
