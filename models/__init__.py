"""The engine: models, their loading, batching, decoding and scoring.

OpenMP's wait policy is set here, before anything loads PyTorch (GNU OpenMP reads it once, when
it is loaded; every module that imports torch is in this package or imports it first). Each
thread that runs PyTorch work gets a team of OpenMP threads of its own; once a second team
exists (a scoring or a style being learned in a server thread, a second model's worker), there
are more OpenMP threads than the 2 cores, and OpenMP then stops spinning between parallel
regions and sleeps instead. A Tab press is hundreds of small parallel regions, and waking from
sleep for each made it ~45 % slower for as long as the process lived (Gemma, 200-token prompt,
4/12/32 tokens, AMD EPYC 2 cores: 661 -> 970 ms p50 once a /score had run beside it; five
writers' p95 1.4-2x with one hostile visitor). ACTIVE with the default spin count keeps the
short spin whatever the count of teams: 669 / 690 ms calm / beside a scoring, and the OpenMP
threads of an idle app use no CPU (0 ticks in 3 s; what an idle app uses, ~1.4 % of a core, is
Gradio's queue loops: editor/ui.py calm_queue). An operator's own settings win (setdefault).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "300000")
