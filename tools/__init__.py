"""Tools users run, from the repository root: `python -m tools.NAME --help` (convert_embedding, inspect_checkpoint,
evaluate_ti, editability_study, check_full_size, benchmark_train_step, benchmark_sampling, benchmark_ops). Dev tools are in tools/dev/."""
import os

# the repository, for the tools' default paths (tests/fixtures, models/, output/), wherever they are run from
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
