"""fmsaccel: the CLI (recipes, run, bench), the training entry point and its helpers.

Kept empty of imports: ``fmsaccel --help`` and shell completion must stay fast.
"""

PROGRESS_TAG = "FMSACCEL_PROGRESS"  # prefix of the training process's progress lines, which the bench parses
