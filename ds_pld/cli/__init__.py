"""The command-line programs: `ds-pld-train`, `ds-pld-finetune`, `ds-pld-export` and `ds-pld-prepare` once
installed, and launch/*.py (thin wrappers) in a checkout."""
