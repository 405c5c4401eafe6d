"""The evaluation suite: trained runs back in memory, text generation that keeps learning, language-model scores,
and the reports every evaluation writes.

What this is: the package, read in this order:
    load.py       load_run(RUN) -> Loaded (model, tokenizer, checkpoint, step, info); export_hf(loaded, DIR)
    report.py     write_report(path, kind, config, numbers, loaded, seed): the JSON every eval command writes;
                  progress(message): a progress line on stderr
    generate.py   `nestlearn generate`: streamed text, the learning state saved and continued
    lm.py         `nestlearn eval lm`: loss, perplexity, bits per byte over windows and whole documents
    command.py    the command lines (`generate`, `eval TASK`, `synth`) and the table of eval modules
Long-context tasks (`longctx.py`: NIAH, BABILong) and synthetic tasks (`synth/`) plug into `command.py`.
What it is not: training (`nestlearn.train`) or data preparation (`nestlearn data`).
"""

from .load import Loaded, export_hf, load_run
from .report import progress, write_report

__all__ = ["Loaded", "export_hf", "load_run", "progress", "write_report"]
