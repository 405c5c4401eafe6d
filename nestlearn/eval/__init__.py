"""The evaluation suite: trained runs back in memory, text generation that keeps learning, language-model scores,
and the reports every evaluation writes.

What this is: the package, read in this order:
    load.py       load_run(RUN) -> Loaded (model, tokenizer, checkpoint, step, info); export_hf(loaded, DIR)
    report.py     write_report(path, kind, config, numbers, loaded, seed): the JSON every eval command writes;
                  progress(message): a progress line on stderr
    generate.py   `nestlearn generate`: streamed text, the learning state saved and continued
    lm.py         `nestlearn eval lm`: loss, perplexity, bits per byte over windows and whole documents
    niah.py, babilong.py, longctx.py   `nestlearn eval niah | babilong`: long-context recall, streamed
    mc.py         `nestlearn eval mc`: zero-shot multiple choice by log-likelihood (lm_eval_adapter.py: lm-eval)
    continual.py  `nestlearn eval continual`: class- and domain-incremental protocols, BWT and forgetting
    synth/        `nestlearn synth`: MQAR, the MAD tasks, the formal languages of Table 5
    command.py    the command lines (`generate`, `eval TASK`, `synth`) and the table of eval modules
What it is not: training (`nestlearn.train`) or data preparation (`nestlearn data`).
"""

from .load import Loaded, export_hf, load_run
from .report import progress, write_report

__all__ = ["Loaded", "export_hf", "load_run", "progress", "write_report"]
