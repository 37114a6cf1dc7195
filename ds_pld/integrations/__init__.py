"""Integrations of ds_pld's algorithms into other training loops (Hugging Face `Trainer`: `ds_pld.integrations.
transformers`). Nothing is imported here, so `import ds_pld.integrations` does not pull in transformers."""
